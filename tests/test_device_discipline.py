"""Device discipline (issue 17): every tensor and generator the samplers, rows, trainers and
checkpoints create follows the model's device or is explicitly a host tensor.

A CPU test cannot see a CUDA device, but it can see the class of defect: with the default device
set to "meta", any factory call that relies on the default device (``torch.rand(n,
generator=g)``, ``torch.zeros(n)``, ...) makes a meta tensor, which fails as soon as it meets
real data or a CPU generator, exactly where a CUDA run (model on cuda, or a user's
``torch.set_default_device("cuda")``) would fail or silently move work to the wrong device."""

import os

import pytest
import torch
from dlmkern.doctor import e2e_checks as e2e
from dlmkern.sampling import BlockSampler, FullSampler, SamplingConfig, sample_tokens
from dlmkern.trainers import SFT, DiPO, DiPOConfig, RLTrainer, SFTConfig, TraceRL
from dlmkern.trainers.presets import BGPOConfig, EBPOConfig, MDPOConfig, SPGConfig
from torch.overrides import TorchFunctionMode

PROMPTS = [e2e.TOK.encode(r["prompt"]) for r in e2e.DATA[:3]]
HOT = SamplingConfig(temperature=1.0, steps=2)


def _tokens(trajs):
    return [(t.token_ids, t.step_map) for t in trajs]


@pytest.mark.parametrize("kind", ["block", "block_graph_buffers", "block_uncached", "full",
                                  "full_cached", "full_recorded"])
def test_samplers_make_no_tensor_on_the_default_device(kind):
    # FullSampler drew its uniforms with torch.rand(n, generator=g) on the default device while
    # g lived on the model's device: on CUDA every LLaDA / Dream rollout at temperature > 0 died.
    family = "llada" if kind.startswith("full") else "sdar"
    model = e2e.model("cpu", family)
    if family == "llada":
        make = lambda: FullSampler(model, HOT, gen_length=8, block_length=4,  # noqa: E731
                                   use_cache=kind == "full_cached",
                                   record_predictions=kind == "full_recorded")
    else:
        make = lambda: BlockSampler(model, HOT, max_new_tokens=8,  # noqa: E731
                                    use_cache=kind != "block_uncached",
                                    cuda_graphs=True if kind == "block_graph_buffers" else None)
    want = make().generate(PROMPTS, n_samples=2, seed=5)
    with torch.device("meta"):
        got = make().generate(PROMPTS, n_samples=2, seed=5)
    assert _tokens(got) == _tokens(want)
    if kind == "full_recorded":
        assert all(torch.equal(a.step_predictions, b.step_predictions)
                   for a, b in zip(got, want, strict=True))


def _trainers(out):
    rl = lambda **kw: e2e._rl_cfg(out, **kw)  # noqa: E731
    return {
        "sft": lambda: SFT(e2e.model("cpu"), e2e.TOK, e2e.DATA,
                           SFTConfig(batch_size=8, total_steps=2, output_dir=out)),
        "tracerl_value": lambda: TraceRL(e2e.model("cpu"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                         rl(use_value_model=True, micro_batch_tokens=30)),
        "dipo_ref_kl": lambda: DiPO(e2e.model("cpu"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                    rl(preset=DiPOConfig, kl_coef=0.1, dynamic_sampling=False)),
        "llada": lambda: TraceRL(e2e.model("cpu", "llada"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                 rl(gen_block_length=4, shrinkage=8)),
        "coupled": lambda: TraceRL(e2e.model("cpu"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                   rl(estimator="coupled")),
        "diffu_grpo": lambda: TraceRL(e2e.model("cpu"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                      rl(estimator="diffu_grpo")),
        # the SPG family: block-wise / stratified masks, the per-copy objectives, split copies
        "spg": lambda: RLTrainer(e2e.model("cpu", "llada"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                 rl(preset=SPGConfig, gen_block_length=4)),
        "bgpo": lambda: RLTrainer(e2e.model("cpu"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                  rl(preset=BGPOConfig, num_masks=3, micro_batch_tokens=40)),
        "ebpo": lambda: RLTrainer(e2e.model("cpu"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                  rl(preset=EBPOConfig, num_masks=3)),
        # MDPO: every step's decoded completion recorded, rewarded, and its step's rows trained
        "mdpo": lambda: RLTrainer(e2e.model("cpu", "llada"), e2e.TOK, e2e.DATA, e2e.digit_share,
                                  rl(preset=MDPOConfig, gen_block_length=4, mdpo_train_steps=2)),
    }


@pytest.mark.parametrize("name", ["sft", "tracerl_value", "dipo_ref_kl", "llada", "coupled",
                                  "diffu_grpo", "spg", "bgpo", "ebpo", "mdpo"])
def test_trainer_steps_and_checkpoints_make_no_tensor_on_the_default_device(tmp_path, name):
    # SFT drew batch indices with torch.randint(generator=<cpu>) on the default device; rewards,
    # the data order and the baselines' masks were made on it too.
    def make(run):  # each trainer its own output_dir (existing_output_dir: refuse)
        return _trainers(str(tmp_path / run))[name]()

    ref, tr = make("ref"), make("tr")
    ref.train_step()
    with torch.device("meta"):
        tr.train_step()
        tr.save(os.path.join(tmp_path, "ckpt"))
    resumed = make("resumed")
    with torch.device("meta"):
        resumed.resume(os.path.join(tmp_path, "ckpt"))
    for a, b, c in zip(ref.model.parameters(), tr.model.parameters(),
                       resumed.model.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


class _HostSyncs(TorchFunctionMode):
    """Records calls that read device values back to the host (a sync on CUDA, and an error
    inside CUDA-graph capture)."""

    SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.cpu,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.numpy, torch.nonzero,
             torch.Tensor.nonzero, torch.Tensor.__index__, torch.masked_select,
             torch.Tensor.masked_select, torch.unique, torch.Tensor.unique}
    INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}  # a bool index: nonzero

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS or (func in self.INDEXING and _bool_index(args[1])):
            self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in parts)


def _watch(monkeypatch, cls, name) -> list:
    """Runs every call of cls.name under _HostSyncs; returns the list each call's findings go to."""
    calls, method = [], getattr(cls, name)

    def watched(*args, **kwargs):
        with _HostSyncs() as mode:
            method(*args, **kwargs)
        calls.append(mode.seen)

    monkeypatch.setattr(cls, name, watched)
    return calls


@pytest.mark.parametrize("rule", ["static", "dynamic", "entropy_bounded", "sequential"])
def test_block_sampler_step_reads_nothing_back_to_the_host(monkeypatch, rule):
    model = e2e.model("cpu")
    calls = _watch(monkeypatch, BlockSampler, "step")
    cfg = SamplingConfig(rule=rule, temperature=1.0, steps=2, threshold=0.5, top_k=5, top_p=0.9)
    BlockSampler(model, cfg, max_new_tokens=8, cuda_graphs=True).generate(PROMPTS, 2)
    assert calls and all(seen == [] for seen in calls), calls


def test_host_sync_detector_sees_a_sync():
    x = torch.ones(3)
    with _HostSyncs() as mode:
        x.sum().item()
        bool(x.any())
        x[x > 0]
        x[1:]  # no sync
    assert mode.seen == ["item", "__bool__", "__getitem__"]


def test_sample_tokens_never_draws_from_a_hidden_generator():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="needs `uniforms`"):
        sample_tokens(logits, HOT, mask_token_id=9, uniforms=None)
    with pytest.raises(ValueError, match="needs `uniforms`"):
        sample_tokens(logits, HOT, 9, torch.Generator().manual_seed(0))
    u = torch.full((4,), 0.5)
    assert torch.equal(sample_tokens(logits, HOT, 9, u)[0], sample_tokens(logits, HOT, 9, u)[0])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("use_cache, record", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("rule", ["static", "sequential"])
def test_full_sampler_steps_read_nothing_back_to_the_host(monkeypatch, family, use_cache, record,
                                                          rule):
    # Fixed-step rules run a block's steps without looking at the host at all (dynamic rules add
    # one lagged "all done?" read per step, which on CUDA waits only for the previous step);
    # MDPO's recorded completions are read with the block's tokens.
    model = e2e.model("cpu", family)
    calls = _watch(monkeypatch, FullSampler, "_denoise")
    cfg = SamplingConfig(rule=rule, temperature=1.0, steps=3,
                         schedule="dream" if family == "dream" else "even")
    FullSampler(model, cfg, gen_length=8, block_length=4, use_cache=use_cache,
                record_predictions=record).generate(PROMPTS, 2)
    assert len(calls) == 2 and all(seen == [] for seen in calls), calls


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["block", "block_eager", "full", "full_cached", "dream_cached"])
def test_samplers_on_cuda_are_deterministic_and_never_emit_the_mask(kind):
    family = {"full": "llada", "full_cached": "llada", "dream_cached": "dream"}.get(kind, "sdar")
    model = e2e.model("cuda", family)
    if family == "sdar":
        make = lambda: BlockSampler(model, HOT, max_new_tokens=8,  # noqa: E731
                                    cuda_graphs=kind == "block")
    else:
        make = lambda: FullSampler(model, HOT, gen_length=8, block_length=4,  # noqa: E731
                                   use_cache=kind.endswith("cached"))
    a = make().generate(PROMPTS, n_samples=2, seed=5)
    b = make().generate(PROMPTS, n_samples=2, seed=5)
    assert _tokens(a) == _tokens(b)
    assert all(model.config.mask_token_id not in t.token_ids for t in a)
