"""Host syncs (issue #25 item 6, the acceptance test): a fixed number of host reads per sampler
block and per optimizer step, none per micro-batch, whatever the number of sequences, micro-batches
and layers.

The model runs on the meta device, standing for the GPU: its tensors have no values, so nothing can
be read back from it, while host work on CPU tensors (layouts, rows, plans, draws) runs as usual and
is not counted. The sanctioned reads are counted: ``dlmkern._host.read`` ("read", replaced by a
stand-in that returns zeros of each shape, the planner's worst case: no EOS, no early finish, every
loss finite) and ``check_device_errors`` ("flag": the kernels' error flag, one read on CUDA).
``_DeviceReads``, the host-sync detector of test_device_discipline restricted to device values,
counts every other read (``.item()``, ``.tolist()``, ``bool()``, ``.cpu()``, a bool mask, ...),
naming its line, and answers it with zeros so that the run goes on; a read it does not know still
fails on meta.

Measured, the same at both batch sizes and 1 and 3 layers (the numbers asserted below):
- per sampler block: 2, the block's tokens / step map / log-probs / counters in one read and the
  flag (BlockSampler cached with graph buffers, cached eager, uncached; FullSampler cached and
  uncached; 4 and 12 sequences); the dynamic rule adds one "all done?" read per denoising step
  (4 here; on CUDA it lags a step, so the host never stalls the queue);
- per micro-batch: 0 (forward and backward; the rollout-time log-probs, values and GAE: 0 per
  mini-batch), with 8 and 24 micro-batches (micro_batch_tokens=30: one per trajectory);
- per optimizer step: 2, every micro-batch's statistics with the gradient norms in one read, and
  the flag; per train step 1 more with trace rows, the sampler-gap sums (TraceRL with and without
  a value model, DiPO with a reference KL, diffu-GRPO; 8 and 24 sequences).
On the CUDA emulator (bf16 model, CPU tensors) the C++ glue's own host reads (``_host_reads``) are
1 per sampler block and 1 per optimizer step, the flag's: nothing per op call, sequence or layer
(2 and 6 sequences, 1 and 3 layers).
"""

import sys
import traceback

import pytest
import torch
from dlmkern import _cuda_emu, _host, ops
from dlmkern.doctor import e2e_checks as e2e
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.models.transformer import Layer
from dlmkern.sampling import BlockSampler, FullSampler, SamplingConfig
from dlmkern.trainers import DiPO, DiPOConfig, TraceRL
from dlmkern.trainers.rl import RLTrainer
from dlmkern.trainers.update import Update
from torch.utils._pytree import tree_leaves, tree_map_only

from .test_device_discipline import _bool_index, _HostSyncs

SIZES = (2, 6)   # prompts: x 2 samples in the samplers, x group_size 4 in the trainers
DEPTHS = (1, 3)  # layers
PROMPTS = [e2e.TOK.encode(r["prompt"]) for r in e2e.DATA[:max(SIZES)]]
BLOCK = 4        # tiny_config's block_size; the full sampler's block_length
BLOCK_READS = ["read", "flag"]  # the block's one read-back, the kernels' flag


def _model(family: str, num_layers: int, device="meta", dtype=torch.float32,
           **kw) -> DiffusionLM:
    torch.manual_seed(0)
    cfg = tiny_config(family, vocab_size=e2e.TOK.vocab_size, mask_token_id=e2e.TOK.mask_token_id,
                      num_layers=num_layers, **kw)
    return DiffusionLM(cfg).to(device=device, dtype=dtype)


class _Tally:
    """A run's host reads, cut into units (a sampler block, a micro-batch, ...): a unit holds the
    reads made since the previous cut. `glue`: a counter whose increase between cuts is added as
    that many "glue" reads (the emulated CUDA glue's)."""

    def __init__(self, glue=None):
        self.glue = glue
        self._glue_seen = glue() if glue else 0
        self.pending, self.units = [], {}

    def add(self, what: str) -> None:
        self.pending.append(what)

    def cut(self, unit: str) -> None:
        if self.glue:
            now = self.glue()
            self.pending += ["glue"] * (now - self._glue_seen)
            self._glue_seen = now
        self.units.setdefault(unit, []).append(self.pending)
        self.pending = []

    def take(self) -> dict:
        """{unit: [each unit's reads]} of the run so far; starts a new run."""
        self.cut("after")  # whatever came after the last cut
        units, self.units = self.units, {}
        return units


def _assert_reads(got: dict, want: dict, counts: dict | None = None) -> None:
    """Every unit of every run in `got` ({(sequences, layers): Tally.take()}) read `want[unit]`
    and, where given, each run had `counts[unit]` units; the failure lists, per run, the units
    that read otherwise (each distinct list once)."""
    bad = []
    for (n, layers), units in got.items():
        run = f"{n} sequences, {layers} layers"
        for unit in {**units, **want}:
            lists = units.get(unit, [])
            if not lists or any(x != want.get(unit) for x in lists):
                distinct = [x for i, x in enumerate(lists) if x not in lists[:i]]
                bad.append(f"{run}: per {unit} {distinct or '-'}, want {want.get(unit, '-')}")
        if counts and _counts(units) != counts:
            bad.append(f"{run}: units {_counts(units)}, want {counts}")
    assert not bad, "host reads:\n" + "\n".join(bad)


def _counts(units: dict) -> dict:
    return {unit: len(lists) for unit, lists in units.items()}


def _cut_after(monkeypatch, tally: _Tally, cls, name: str, unit: str) -> None:
    method = getattr(cls, name)

    def cut(*args, **kwargs):
        out = method(*args, **kwargs)
        tally.cut(unit)
        return out

    monkeypatch.setattr(cls, name, cut)


@pytest.fixture
def tally(monkeypatch) -> _Tally:
    """Counts the sanctioned reads wherever dlmkern imported them; `read` answers zeros."""
    t, read, check = _Tally(), _host.read, ops.check_device_errors

    def stand_in(*tensors):  # one synchronisation on CUDA, counted as _host.read counts it
        _host.READS.count += 1
        t.add("read")
        return [torch.zeros(x.shape, dtype=x.dtype).tolist() for x in tensors]

    def flag(device=None):
        t.add("flag")
        return check(device)

    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] == "dlmkern":
            if getattr(mod, "read", None) is read:
                monkeypatch.setattr(mod, "read", stand_in)
            if getattr(mod, "check_device_errors", None) is check:
                monkeypatch.setattr(mod, "check_device_errors", flag)
    return t


class _DeviceReads(_HostSyncs):
    """_HostSyncs for device values only: a read of a meta tensor goes into the tally as "<call>
    at <the dlmkern line>" and is answered as if the tensor held zeros (a result that would stay
    on the device goes back to meta), so a run with extra reads completes and shows them."""

    SYNCS = _HostSyncs.SYNCS | {torch.equal, torch.allclose}
    ON_DEVICE = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select,
                 torch.Tensor.masked_select, torch.unique, torch.Tensor.unique,
                 torch.Tensor.__getitem__}

    def __init__(self, tally: _Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._reads_device(func, args, kwargs):
            return func(*args, **kwargs)
        self.tally.add(f"{getattr(func, '__name__', func)} at {_caller()}")
        args, kwargs = tree_map_only(torch.Tensor, _zeros_on_host, (args, kwargs))
        out = func(*args, **kwargs)
        if func in self.ON_DEVICE:
            out = tree_map_only(torch.Tensor, lambda x: x.to("meta"), out)
        return out

    def _reads_device(self, func, args, kwargs) -> bool:
        if not any(isinstance(x, torch.Tensor) and x.is_meta for x in tree_leaves((args, kwargs))):
            return False
        if func is torch.Tensor.to:  # to the host: a copy out of the device
            dev = kwargs.get("device", next((a for a in args[1:]
                                             if isinstance(a, str | torch.device)), None))
            return dev is not None and torch.device(dev).type != "meta"
        return func in self.SYNCS or (func in self.INDEXING and _bool_index(args[1]))


def _zeros_on_host(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape, dtype=x.dtype) if x.is_meta else x


def _caller() -> str:
    """The innermost dlmkern line of the stack (file:line under the package)."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/dlmkern/" in path:
            return f"{path.rsplit('/dlmkern/', 1)[1]}:{frame.lineno}"
    return "?"


# ---- samplers ------------------------------------------------------------------------------------

SAMPLERS = {
    "block_graph_buffers": lambda m, c: BlockSampler(m, c, max_new_tokens=8, cuda_graphs=True),
    "block_eager": lambda m, c: BlockSampler(m, c, max_new_tokens=8, cuda_graphs=False),
    "block_uncached": lambda m, c: BlockSampler(m, c, max_new_tokens=8, use_cache=False),
    "full_cached": lambda m, c: FullSampler(m, c, gen_length=8, block_length=BLOCK,
                                            use_cache=True),
    "full_uncached": lambda m, c: FullSampler(m, c, gen_length=8, block_length=BLOCK),
}


def _sampler_reads(monkeypatch, tally, kind: str, rule: str) -> dict:
    """{(sequences, layers): {unit: [each unit's reads]}} of one generate() per size and
    depth."""
    for cls in (BlockSampler, FullSampler):
        _cut_after(monkeypatch, tally, cls, "_finish_block", "block")
    cfg = SamplingConfig(rule=rule, steps=2, temperature=1.0, threshold=0.5)
    got = {}
    for layers in DEPTHS:
        model = _model("sdar" if kind.startswith("block") else "llada", layers)
        for n in SIZES:
            with _DeviceReads(tally):
                out = SAMPLERS[kind](model, cfg).generate(PROMPTS[:n], n_samples=2, seed=1)
            assert len(out) == 2 * n and all(len(t.token_ids) == 8 for t in out)
            got[(2 * n, layers)] = tally.take()
    return got


@pytest.mark.parametrize("rule", ["static", "dynamic"])
@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_sampler_reads_per_block_do_not_grow_with_sequences_or_layers(monkeypatch, tally, kind,
                                                                       rule):
    per_step = ["read"] * BLOCK if rule == "dynamic" else []  # "all done?" after each step
    got = _sampler_reads(monkeypatch, tally, kind, rule)
    _assert_reads(got, {"block": per_step + BLOCK_READS, "after": []}, {"block": 2, "after": 1})


def test_a_read_per_sequence_or_per_layer_is_seen(monkeypatch, tally):
    """The tally sees what this test exists to catch: a .item() per sequence after each block,
    and a .tolist() per layer in the prefill (what each layer did before #25)."""
    finish, prefill = BlockSampler._finish_block, Layer.prefill

    def per_sequence(self, seqs, spans, gen, st):
        for i in range(len(seqs)):
            st.counter[i].item()
        return finish(self, seqs, spans, gen, st)

    def per_layer(self, x, layout, cache, layer, slots):
        cache.seqlens[layer].tolist()
        return prefill(self, x, layout, cache, layer, slots)

    monkeypatch.setattr(BlockSampler, "_finish_block", per_sequence)
    monkeypatch.setattr(Layer, "prefill", per_layer)
    got = _sampler_reads(monkeypatch, tally, "block_eager", "static")
    seen = {key: [r.split(" at ")[0] for b in units["block"] for r in b]
            for key, units in got.items()}
    assert {key: (x.count("item"), x.count("tolist")) for key, x in seen.items()} == {
        (4, 1): (2 * 4, 1), (12, 1): (2 * 12, 1), (4, 3): (2 * 4, 3), (12, 3): (2 * 12, 3)}


# ---- trainers ------------------------------------------------------------------------------------

def _trainer(kind: str, out: str, model: DiffusionLM, prompts: int, group_size: int):
    cfg = dict(prompts_per_step=prompts, group_size=group_size, micro_batch_tokens=30)
    if kind == "tracerl":
        return TraceRL(model, e2e.TOK, e2e.DATA, e2e.digit_share,
                       e2e._rl_cfg(out, num_minibatches=2, **cfg))
    if kind == "tracerl_value":
        return TraceRL(model, e2e.TOK, e2e.DATA, e2e.digit_share,
                       e2e._rl_cfg(out, use_value_model=True, **cfg))
    if kind == "dipo_ref_kl":
        return DiPO(model, e2e.TOK, e2e.DATA, e2e.digit_share,
                    e2e._rl_cfg(out, DiPOConfig, kl_coef=0.1, dynamic_sampling=False, **cfg))
    return TraceRL(model, e2e.TOK, e2e.DATA, e2e.digit_share,
                   e2e._rl_cfg(out, estimator="diffu_grpo", **cfg))


def _train_step_reads(monkeypatch, tally, kind, tmp_path, device="meta", model_kw=None,
                      sizes=SIZES, group_size=4) -> dict:
    """{(trajectories, layers): {unit: [each unit's reads]}} of one train_step per size and
    depth."""
    for cls, name, unit in ((BlockSampler, "_finish_block", "block"),
                            (Update, "prepare", "prepare"),      # a mini-batch's no-grad part
                            (Update, "_pass", "micro-batch"),
                            (Update, "step", "optimizer step"),  # after its micro-batches
                            (RLTrainer, "update", "update")):    # after its optimizer steps
        _cut_after(monkeypatch, tally, cls, name, unit)
    got = {}
    for layers in DEPTHS:
        for n in sizes:
            model = _model("sdar", layers, device, **(model_kw or {}))
            tr = _trainer(kind, str(tmp_path / f"{kind}-{n}-{layers}"), model, n, group_size)
            with _DeviceReads(tally):
                log = tr.train_step()
            assert "skipped" not in log, log
            got[(group_size * n, layers)] = tally.take()
    return got


@pytest.mark.parametrize("kind", ["tracerl", "tracerl_value", "dipo_ref_kl", "diffu_grpo"])
def test_train_step_reads_per_optimizer_step_do_not_grow(monkeypatch, tally, tmp_path, kind):
    got = _train_step_reads(monkeypatch, tally, kind, tmp_path)
    gap = ["read"] if kind != "diffu_grpo" else []  # sampler-gap sums: trace rows only
    want = {"block": BLOCK_READS, "prepare": [], "micro-batch": [], "optimizer step": BLOCK_READS,
            "update": gap, "after": []}
    _assert_reads(got, want)
    counts = {key: _counts(units) for key, units in got.items()}
    steps = 2 if kind == "tracerl" else 1
    for n in counts.values():  # several micro-batches per optimizer step
        assert n["block"] == 2 and n["optimizer step"] == steps and n["prepare"] == steps
        assert n["micro-batch"] >= 2 * steps, n
    for layers in DEPTHS:  # and more of them in the larger batch
        assert counts[(24, layers)]["micro-batch"] > counts[(8, layers)]["micro-batch"]


# ---- the CUDA glue, on the emulator -------------------------------------------------------------

emulator = pytest.mark.skipif(not _cuda_emu.available(),
                              reason="dlmkern built without DLMKERN_CUDA_EMU=ON")
EMU_MODEL = dict(head_dim=64, num_heads=1, num_kv_heads=1,  # the emulated kernels' head size
                 dtype=torch.bfloat16)
EMU_SIZES = (1, 3)  # prompts: emulated kernels are slow


def _glue_tally() -> _Tally:
    return _Tally(glue=lambda: torch.ops.dlmkern_emu._host_reads())


@emulator
@pytest.mark.parametrize("kind", ["block_graph_buffers", "full_cached"])
def test_cuda_glue_reads_once_per_block(monkeypatch, kind):
    """On the emulated CUDA kernels (bf16, CPU tensors): the glue's only read is the flag."""
    tally = _glue_tally()
    for cls in (BlockSampler, FullSampler):
        _cut_after(monkeypatch, tally, cls, "_finish_block", "block")
    cfg = SamplingConfig(steps=2, temperature=1.0)
    got = {}
    with _cuda_emu.emulated_cuda():
        for layers in DEPTHS:
            family = "sdar" if kind.startswith("block") else "llada"
            model = _model(family, layers, "cpu", **EMU_MODEL)
            for n in EMU_SIZES:
                tally.take()  # start after building the model
                SAMPLERS[kind](model, cfg).generate(PROMPTS[:n], n_samples=2, seed=1)
                got[(2 * n, layers)] = tally.take()
    _assert_reads(got, {"block": ["glue"], "after": []}, {"block": 2, "after": 1})


@emulator
@pytest.mark.slow
def test_cuda_glue_reads_once_per_optimizer_step(monkeypatch, tmp_path):
    tally = _glue_tally()
    with _cuda_emu.emulated_cuda():
        tally.take()
        got = _train_step_reads(monkeypatch, tally, "tracerl_value", tmp_path, "cpu", EMU_MODEL,
                                sizes=EMU_SIZES, group_size=2)
    want = {"block": ["glue"], "prepare": [], "micro-batch": [], "optimizer step": ["glue"],
            "update": [], "after": []}
    _assert_reads(got, want)
    assert all(len(units["micro-batch"]) >= 2 for units in got.values())
