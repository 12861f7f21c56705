"""torch's MemTracker (torch.distributed._tools), used over a whole RL step.

Two things the stock tracker does not do, added here and nowhere else:
- a module may run any number of times at the top level (a sampler calls the model once per
  denoising step; the stock tracker refuses a second top-level call of a module);
- the peak is split by stage (`stage(name)`): each stage's peak, by category, starting from what
  is resident when it begins.
Categories are torch's (parameters, buffers, gradients, activations, temporaries, optimizer
state) plus `kv_cache` (tensors the caller tags, e.g. a sampler's KV cache) under torch's
"Other". Per device: under a fake process group every rank is this one.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _UpdateType

# torch's category -> the plan's name
CATEGORIES = {
    _MemRefType.PARAM: "params", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "grads",
    _MemRefType.OPT: "optimizer", _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries", _MemRefType.OTH: "kv_cache",
}


class StageTracker(MemTracker):
    """MemTracker with stages: ``with t: ... with t.stage("rollout"): ...``; ``t.stages`` maps
    each stage to {category: bytes, "total": bytes} at its peak (bytes of one rank)."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.stages: dict[str, dict[str, int]] = {}
        self._stage: tuple[str, bool] | None = None
        self._inv_peak = 0
        self.transient: dict[str, int] = {}  # stage -> most it ever rose above its entry
        self._host: dict[int, int] = {}  # excluded storages (host) -> bytes
        for attr in ("_peak_mem", "_peak_mem_snap", "_curr_mem_snap", "_mod_tracker"):
            if not hasattr(self, attr):  # torch internals this class relies on
                raise RuntimeError(f"dlmkern.plan: this torch's MemTracker has no {attr} "
                                   f"(torch {torch.__version__}); the plan cannot run")

    def _pre_fw_hook(self, module, inputs):
        if not self._mod_tracker.is_bw:  # per-module statistics are not used: start afresh
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        # a frozen parameter (the KL reference policy; a LoRA layer's base weight beside its
        # trained adapters) takes no gradient hook: torch refuses one. Torch's own loop hooks
        # every parameter of the module, so the hooks of the trained ones are installed here.
        out = super()._track_module_params_and_buffers(module, False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._hook_grads(p)
        return out

    def _hook_grads(self, p) -> None:
        """Count `p`'s gradient as it is made and accumulated (torch's own hooks, per tensor)."""
        def seen(grad):
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        self._param_to_grad_hook_handles[p] = (
            p.register_hook(seen), p.register_post_accumulate_grad_hook(lambda q: seen(q.grad)))

    def tag(self, tensors, category: str = "kv_cache") -> None:
        """Counts these (already tracked or new) tensors under `category` from now on."""
        ref = {v: k for k, v in CATEGORIES.items()}[category]
        for t in tensors:
            self._update_and_maybe_create_winfos(t, ref)

    def exclude(self, tensors) -> None:
        """These tensors live on the host (an offloaded optimizer state): not device memory, now
        or after any op that writes them in place; their bytes are counted in `host_bytes`."""
        from torch.distributed._tools.common_utils import get_untyped_storages

        for t in tensors:
            for winfo in self._update_and_maybe_create_winfos(t, _MemRefType.OTH):
                if winfo.mem_consumed > 0:  # kept with 0 bytes: later ops find it, add nothing
                    self._update_snap(_UpdateType.DEL, winfo)
                    winfo.mem_consumed = 0
            for st in get_untyped_storages(t):
                self._host[id(st)] = st.nbytes()

    @property
    def host_bytes(self) -> int:
        return sum(self._host.values())

    def current(self) -> dict[str, int]:
        return _named(self._curr_mem_snap.get(self.device))

    @contextlib.contextmanager
    def stage(self, name: str, split_backward: bool = False):
        """Peaks reached inside the block are recorded as `name` (`name`_backward while autograd
        runs backward, when split_backward); a stage run several times keeps its highest peak.
        Stages nest: the innermost one records."""
        outer, outer_peak = self._stage, self._inv_peak
        self._stage = (name, split_backward)
        entry = self._curr_mem_snap.get(self.device)
        self._inv_peak = entry["Total"] if entry else 0
        self._record(entry)  # what is resident on entry
        try:
            yield self
        finally:
            rise = self._inv_peak - (entry["Total"] if entry else 0)
            self.transient[name] = max(self.transient.get(name, 0), rise)
            self._stage, self._inv_peak = outer, max(outer_peak, self._inv_peak)

    def _update_peak_stats(self, peak_state) -> None:
        # the device peak and the stage peaks only: per-module peaks (the stock tracker walks
        # every module after every op) are not used and cost a third of the planned step
        snap = self._curr_mem_snap.get(self.device)
        if snap and snap["Total"] > self._peak_mem.get(self.device, 0):
            self._peak_mem[self.device] = snap["Total"]
            self._peak_mem_snap[self.device] = dict(snap)
        if self._stage is not None:
            self._record(snap)

    def _record(self, snap) -> None:
        if self._stage is None:
            return
        name, split = self._stage
        if split:
            name += "_backward" if self._mod_tracker.is_bw else "_forward"
        total = snap["Total"] if snap else 0
        self._inv_peak = max(self._inv_peak, total)
        if total >= self.stages.get(name, {}).get("total", -1):
            self.stages[name] = _named(snap)


def _named(snap) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES.values(), 0)
    out["total"] = 0
    for k, v in (snap or {}).items():
        if k in CATEGORIES:
            out[CATEGORIES[k]] += int(v)
        elif k == "Total":
            out["total"] = int(v)
    return out
