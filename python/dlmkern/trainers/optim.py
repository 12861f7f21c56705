"""AdamW with fp32 master weights for bf16 / fp16 parameters.

On a GPU the trainers hold the model in bfloat16 (the kernels compute in it, and the sampler's KV
cache uses it). Plain AdamW on bf16 parameters rounds every update to bf16: an update of
lr = 1e-6 on a weight of 0.02 is about 1 % of its bf16 spacing (1.2e-4) and is lost entirely, so
RL at the usual learning rates would not move the model at all. This optimizer keeps, for each
low-precision parameter, an fp32 master copy and fp32 moments in its state (so checkpoints carry
them), applies the AdamW update to the master and writes the rounded result back into the
parameter. fp32 parameters get torch's AdamW unchanged.

If a parameter is changed outside the optimizer (loaded weights, a manual edit), the elements
whose value no longer equals the rounded master are adopted into the master at the next step.
With gradient accumulation, stash_grads / unstash_grads sum the micro-batch gradients in fp32.

With ``offload=True`` the masters, moments and gradient sums of low-precision parameters (of each
rank's local shard under FSDP2) live on the host: of the 20 bytes per bf16 parameter (weight,
gradient, master, two moments, gradient sum), 16 leave the GPU. A step copies each parameter and
its gradient to the host (bf16, into pinned buffers; the next parameter's copy runs while this
one updates), applies the same AdamW arithmetic there and copies the rounded master back. The
fp32 state never crosses the bus itself, so it stays in pageable memory. Checkpoints are the same
either way: a run resumes with or without offload whichever wrote the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from dlmkern._host import HOST

_LOW = (torch.bfloat16, torch.float16)
_FP32_STATE = ("master", "exp_avg", "exp_avg_sq")


def trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer of `model` steps: those that require gradients (with LoRA,
    the adapters and a value model's head; the frozen base gets no optimizer state)."""
    return [p for p in model.parameters() if p.requires_grad]


class MixedPrecisionAdamW(torch.optim.AdamW):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, offload: bool = False,
                 offload_grad_sums: bool = True, **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("MixedPrecisionAdamW: amsgrad is not supported")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **kwargs)
        self.offload = offload  # not a group setting: checkpoints must not depend on it
        # with offload, the fp32 gradient sums too (False: on the parameters' device, 4 bytes
        # per parameter there, none on the host)
        self.sums_on_host = offload and offload_grad_sums
        self._grad_acc = {}  # parameter -> fp32 gradient sum (outside state: never saved)

    def zero_grad(self, set_to_none: bool = True):
        self._grad_acc.clear()  # e.g. left over by a loop an exception interrupted
        super().zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict):
        # torch casts floating-point state to its parameter's dtype and device on load; the
        # masters and moments of low-precision parameters stay fp32 and are placed here instead
        # (no transient bf16 copy of them on the GPU).
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params, strict=False))  # sizes checked by torch below
        keep, rest = {}, {}
        for pid, st in state_dict["state"].items():
            p = by_id.get(pid)
            ours = {k: v for k, v in st.items() if k in _FP32_STATE and torch.is_tensor(v)
                    and v.dtype == torch.float32} if p is not None and p.dtype in _LOW else {}
            if ours:
                keep[p] = (list(st), ours)
            rest[pid] = {k: v for k, v in st.items() if k not in ours}
        super().load_state_dict({**state_dict, "state": rest})
        for p, (order, ours) in keep.items():  # in the saved order, as torch would keep it
            st = self.state[p]
            self.state[p] = {k: self._placed(ours[k], p) if k in ours else st[k] for k in order}

    def _placed(self, v, p):
        """A loaded fp32 master or moment of p where this optimizer keeps it: on the host with
        offload (laid out as p under FSDP2), else on p's device."""
        if not self.offload:
            return v.to(device=p.device, dtype=torch.float32)
        shard = _local(v)
        return v if shard.device.type == "cpu" else _like(shard.to(HOST), v)

    @torch.no_grad()
    def stash_grads(self):
        """Moves the gradients of low-precision parameters into fp32 accumulators (call after each
        backward of a gradient-accumulation loop but the last), so that summing many micro-batch
        gradients rounds once (unstash_grads) instead of once per backward in bf16."""
        if self.sums_on_host:
            return self._stash_on_host()
        for p in self._low_params():
            if p.grad is not None:
                acc = self._grad_acc.get(p)
                if acc is None:
                    self._grad_acc[p] = p.grad.float()
                else:
                    acc.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def unstash_grads(self):
        """Puts the fp32 sums back as the parameters' gradients (plus any gradient accumulated
        since the last stash), rounded once to the parameter dtype (under FSDP2 each backward's
        reduced gradient is itself stored in the parameter dtype before it is stashed)."""
        if self.sums_on_host:
            return self._unstash_from_host()
        for p in self._low_params():
            acc = self._grad_acc.pop(p, None)
            if acc is not None:
                if p.grad is not None:
                    acc.add_(p.grad)
                p.grad = acc.to(p.dtype)

    def _stash_on_host(self):
        """stash_grads with the sums on the host (local shards, plain tensors: never saved)."""
        low = [p for p in self._low_params() if p.grad is not None]
        for p, copies in _one_ahead(low, lambda p: _to_host(_local(p.grad))):
            (grad,) = copies.wait()
            acc = self._grad_acc.get(p)
            if acc is None:
                self._grad_acc[p] = grad.float()
            else:
                acc.add_(grad)
            p.grad = None

    def _unstash_from_host(self):
        low = [p for p in self._low_params() if p in self._grad_acc]
        for p, copies in _one_ahead(low, lambda p: _to_host(
                *(() if p.grad is None else (_local(p.grad),)))):
            acc = self._grad_acc.pop(p)
            for grad in copies.wait():
                acc.add_(grad)
            dst = _local(p)
            p.grad = _like(_staged(acc, dst).to(dst.device, dst.dtype, non_blocking=True), p)

    def _low_params(self):
        return [p for g in self.param_groups for p in g["params"] if p.dtype in _LOW]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        low = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
               if p.grad is not None and p.dtype in _LOW]
        if any(group["amsgrad"] for group, _, _ in low):
            raise ValueError("MixedPrecisionAdamW: amsgrad is not supported")
        for _, p, _ in low:  # AdamW skips parameters without a gradient
            p.grad = None
        self._init_state_on_host()
        try:
            # AdamW's own step without its hook wrapper (this step already ran the hooks)
            inner = torch.optim.AdamW.step
            getattr(inner, "__wrapped__", inner)(self)
        finally:
            for _, p, g in low:
                p.grad = g
        if self.offload:
            for (group, p, _), copies in _one_ahead(
                    low, lambda item: _to_host(_local(item[1]), _local(item[2]))):
                self._host_step(group, p, copies)
        else:
            for group, p, g in low:
                self._master_step(group, p, g)
        return loss

    def _init_state_on_host(self):
        """AdamW's state of parameters about to take their first step, made here as torch's
        AdamW makes it, but with the step counter on the CPU: torch 2.11 creates it on the
        default device (a torch.set_default_device("cuda") would then cost a read-back per
        parameter and step)."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for group in self.param_groups:
            if group.get("fused") or group.get("capturable"):
                continue  # torch keeps those counters on the parameter's device on purpose
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                state = self.state[p]
                state["step"] = torch.tensor(0.0, dtype=scalar, device="cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)

    def _master_step(self, group, p, grad):
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float()
            state.setdefault("step", torch.tensor(0.0, device="cpu"))  # as torch AdamW
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = (state[k].float() if k in state
                            else torch.zeros_like(p, dtype=torch.float32))
        master, exp_avg, exp_avg_sq = state["master"], state["exp_avg"], state["exp_avg_sq"]
        master.copy_(torch.where(master.to(p.dtype) == p, master, p.float()))
        _adamw(group, state, master, exp_avg, exp_avg_sq, grad.float())
        p.copy_(master)

    def _host_step(self, group, p, copies):
        """_master_step on the host, on p's local shard: `copies` holds its values and gradient
        there; the rounded master goes back asynchronously."""
        values, grad = copies.wait()
        state = self.state[p]
        if "master" not in state:
            state["master"] = _like(values.float(), p)
            state.setdefault("step", torch.tensor(0.0, device="cpu"))
            for k in ("exp_avg", "exp_avg_sq"):  # a loaded moment (on the device) moves over
                state[k] = _like(_local(state[k]).to(HOST, torch.float32) if k in state else
                                torch.zeros(values.shape, dtype=torch.float32, device=HOST), p)
        master, exp_avg, exp_avg_sq = (_local(state[k]) for k in _FP32_STATE)
        master.copy_(torch.where(master.to(p.dtype) == values, master, values.float()))
        _adamw(group, state, master, exp_avg, exp_avg_sq, grad.float())
        dst = _local(p)
        dst.copy_(_staged(master, dst), non_blocking=True)


def _adamw(group, state, master, exp_avg, exp_avg_sq, g):
    """torch's single-tensor AdamW, step for step, on fp32 tensors in place (an fp32 run gives
    the same masters; with a tensor lr torch computes in tensors: equal to an ulp)."""
    if group["maximize"]:
        g = -g
    state["step"] += 1
    step = float(state["step"])
    lr, (beta1, beta2) = float(group["lr"]), group["betas"]
    master.mul_(1 - lr * group["weight_decay"])
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _dtensor_type():
    # A DTensor exists only once torch.distributed.tensor is imported (FSDP2 imports it); not
    # importing it here keeps it out of runs that never shard.
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else mod.DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (an alias: in-place updates reach it), any other tensor itself."""
    dt = _dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def _like(shard: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`shard` laid out as `ref` (its mesh, placements and global shape) when ref is a DTensor,
    else `shard` itself. Built as FSDP2 builds its CPU-offloaded parameters: DTensor.from_local
    would move a host shard to a CUDA mesh's device."""
    dt = _dtensor_type()
    if dt is None or not isinstance(ref, dt):
        return shard
    meta = ref._spec.tensor_meta._replace(dtype=shard.dtype)
    return dt(shard, dataclasses.replace(ref._spec, tensor_meta=meta), requires_grad=False)


def _pins(device: torch.device) -> bool:
    """Whether host buffers exchanged with `device` are pinned: copies between CUDA and pinned
    memory are asynchronous (from pageable memory they are not)."""
    return device.type == "cuda"


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    """An empty host tensor shaped as `like` (a local tensor), pinned when it is on CUDA."""
    return torch.empty(like.shape, dtype=like.dtype, device=HOST, pin_memory=_pins(like.device))


def _staged(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The host tensor to copy into `dst`: `src` rounded to dst's dtype in a pinned buffer when
    dst is on CUDA (rounding on the host halves the bytes sent), `src` itself on the host."""
    if dst.device.type == "cpu":
        return src
    out = _host_buffer(dst)
    out.copy_(src)
    return out


@dataclasses.dataclass
class _HostCopies:
    """Local tensors copied to the host, asynchronously from CUDA: read them after wait()."""

    tensors: tuple
    ready: object = None  # CUDA event the copies complete at (None: nothing to wait for)

    def wait(self) -> tuple:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensors


def _to_host(*tensors: torch.Tensor) -> _HostCopies:
    """Starts copying local tensors to the host (pinned buffers); those already there are kept."""
    out = []
    for t in tensors:
        if t.device.type != "cpu":
            buf = _host_buffer(t)
            buf.copy_(t, non_blocking=True)
            t = buf
        out.append(t)
    device = next((t.device for t in tensors if t.device.type == "cuda"), None)
    # fake CUDA tensors without a GPU (dlmkern.plan) have no stream to wait for
    if device is None or not torch.cuda.is_available():
        return _HostCopies(tuple(out))
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return _HostCopies(tuple(out), event)


def _one_ahead(items, fetch):
    """(item, fetch(item)) for each item, the next item's fetch started before this one is
    yielded: its copies run while the caller updates this one on the host."""
    ahead = fetch(items[0]) if items else None
    for i, item in enumerate(items):
        current = ahead
        ahead = fetch(items[i + 1]) if i + 1 < len(items) else None
        yield item, current
