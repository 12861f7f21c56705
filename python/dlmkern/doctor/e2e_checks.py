"""End-to-end checks on one device: the CUDA-graph sampler against the eager one; each trainer on
a tiny model (SFT, TraceRL with a value model, DiPO with a reference KL, LLaDA TraceRL sampling at
temperature 1.0): two steps that move every trained model from its start, an update that follows
the advantage, updates that move a value model's values toward the returns (SFT: a step that
lowers the loss) and one step's gradients against the reference backend's on the same device (the
row's measured error); a save + resume round trip."""

from __future__ import annotations

import itertools
import math
import os
import tempfile

import torch

from dlmkern.data import CharTokenizer
from dlmkern.doctor.update_checks import (
    GRAD_TOL,
    advantages_order_as_rewards,
    gradients_vs_reference,
    sft_step_lowers_the_loss,
    update_follows_the_advantage,
    value_moves_toward_the_returns,
)
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.sampling import BlockSampler, SamplingConfig
from dlmkern.trainers import SFT, DiPO, DiPOConfig, RLConfig, SFTConfig, TraceRL, TraceRLConfig

TOK = CharTokenizer("0123456789+=")
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
SIGNS = (1.0, -1.0, 1.0, -1.0)  # the advantages of one group (group_size 4) in the direction check
# the direction check's learning rate: small enough for first order, large enough that a bf16
# weight moves (a bf16 weight rounds away steps under ~1/256 of itself)
DIRECTION_LR = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
VALUE_UPDATES = 3  # updates on fixed trajectories in the value check


def dtype(device: str) -> torch.dtype:
    """The trainers' weights on `device` (CUDA attention kernels take bf16 / fp16)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def digit_share(prompts, completions, **_):
    """A reward with spread inside every group (the share of '1' characters), so that no group
    is filtered and every step really updates the policy."""
    return [c.count("1") / max(len(c), 1) for c in completions]


def model(device: str, family: str = "sdar", seed: int = 0) -> DiffusionLM:
    torch.manual_seed(seed)
    m = DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size, hidden_size=64,
                                intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=64, mask_token_id=TOK.mask_token_id))
    return m.to(device=device, dtype=dtype(device))


def graphs_vs_eager(device: str):
    """BlockSampler with CUDA graphs (on CPU: the same static-buffer path, eager) against the
    plain eager sampler: the same tokens, step maps and log-probs for the same seeds."""
    m = model(device)
    prompts = [TOK.encode(r["prompt"]) for r in DATA[:5]]
    cfg = SamplingConfig(rule="dynamic", threshold=0.5, temperature=1.0, steps=2)
    out = {}
    for graphs in (True, False):
        s = BlockSampler(m, cfg, max_new_tokens=10, eos_token_id=TOK.eos_token_id,
                         cuda_graphs=graphs)
        out[graphs] = s.generate(prompts, n_samples=2, seed=3)
    a, b = out[True], out[False]
    if [t.token_ids for t in a] != [t.token_ids for t in b] or \
            [t.step_map for t in a] != [t.step_map for t in b]:
        raise AssertionError("graph and eager samplers chose different tokens or steps")
    err = max(abs(x - y) for t, u in zip(a, b, strict=True)
              for x, y in zip(t.logprobs, u.logprobs, strict=True))
    return err, err / 1e-3


def _rl_cfg(out: str, preset=TraceRLConfig, **kw) -> RLConfig:
    base = dict(prompts_per_step=2, group_size=4, max_new_tokens=8, total_steps=2, lr=1e-3,
                value_lr=1e-3, output_dir=out, progress_bar=False, pass_rate_low=0.0,
                pass_rate_high=1.0, sampling=SamplingConfig(steps=2, temperature=1.0))
    base.update(kw)
    return preset(**base)


def _trained(trainer) -> list[torch.nn.Module]:
    return [m for m in (trainer.model, getattr(trainer, "value_model", None)) if m is not None]


def _run_steps(trainer, steps: int = 2) -> float:
    """Runs `steps` training steps; returns the largest |loss| seen; fails on a non-finite loss,
    a skipped update or a trained model (policy, value model) left at its starting weights."""
    start = [[p.detach().clone() for p in m.parameters()] for m in _trained(trainer)]
    worst = 0.0
    for _ in range(steps):
        log = trainer.train_step()
        if "skipped" in log:
            raise AssertionError(f"step {trainer.step - 1} skipped: {log['skipped']}")
        loss = float(log["loss"])
        if not math.isfinite(loss):
            raise AssertionError(f"step {trainer.step - 1}: loss {loss}")
        worst = max(worst, abs(loss))
    for m, before in zip(_trained(trainer), start, strict=True):
        if all(torch.equal(b, p.detach()) for b, p in zip(before, m.parameters(), strict=True)):
            raise AssertionError(f"the {type(m).__name__}'s parameters did not change")
    return worst


def _maker(build, device: str, root: str):
    """make(**overrides) -> a fresh trainer of `build` (the same weights every call), each in its
    own output directory under `root`."""
    n = itertools.count()
    return lambda **kw: build(device, os.path.join(root, str(next(n))), **kw)


def _sft(device: str, out: str, **kw) -> SFT:
    cfg = dict(batch_size=8, lr=1e-3, total_steps=2, output_dir=out, log_every=1)
    return SFT(model(device), TOK, DATA, SFTConfig(**{**cfg, **kw}))


def _tracerl_value(device: str, out: str, **kw) -> TraceRL:
    return TraceRL(model(device), TOK, DATA, digit_share, _rl_cfg(out, use_value_model=True, **kw))


def _dipo_ref_kl(device: str, out: str, **kw) -> DiPO:
    # DiPO's preset, its reference KL on; without dynamic sampling, which could filter every
    # group of a 2-prompt step (the check needs an update)
    cfg = _rl_cfg(out, DiPOConfig, kl_coef=0.1, num_minibatches=2, dynamic_sampling=False, **kw)
    tr = DiPO(model(device), TOK, DATA, digit_share, cfg)
    if tr.ref_model is None:
        raise AssertionError("no reference model was built for kl_to='ref'")
    return tr


def _llada_tracerl(device: str, out: str, **kw) -> TraceRL:
    return TraceRL(model(device, "llada"), TOK, DATA, digit_share,
                   _rl_cfg(out, gen_block_length=4, shrinkage=8, **kw))


def sft(device: str):
    """Two steps; a step lowers the loss of fixed rows and masks; one step's gradients against
    the reference backend's."""
    with tempfile.TemporaryDirectory() as root:
        make = _maker(_sft, device, root)
        _run_steps(make())
        sft_step_lowers_the_loss(make(), DATA, list(range(len(DATA))))
        err = gradients_vs_reference(lambda: make(max_grad_norm=1e9), lambda t: t.train_step())
        return err, err / GRAD_TOL[dtype(device)]


def rl_row(build, device: str):
    """Two steps; the rollout's advantages rank completions as their rewards; updates on fixed
    trajectories move a value model's values toward the returns; an update follows the
    advantage; one update's gradients (policy and value model) against the reference
    backend's, on trajectories sampled once."""
    with tempfile.TemporaryDirectory() as root:
        make = _maker(build, device, root)
        _run_steps(make())
        tr = make()
        batch = tr.rollout(DATA[:2])
        advantages_order_as_rewards(batch)
        trajs, signs = batch.trajs[:len(SIGNS)], torch.tensor(SIGNS)
        if tr.value_model is not None:
            value_moves_toward_the_returns(tr, trajs, batch.rewards[:len(SIGNS)], VALUE_UPDATES)
        update_follows_the_advantage(
            lambda: make(lr=DIRECTION_LR[dtype(device)], max_grad_norm=100.0), trajs, SIGNS)
        err = gradients_vs_reference(lambda: make(max_grad_norm=1e9),
                                     lambda t: t.update(trajs, signs, signs.clone()))
        return err, err / GRAD_TOL[dtype(device)]


def save_resume(device: str):
    """Two trainers from one checkpoint take the same next step (parameters bit-equal)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = _rl_cfg(out, use_value_model=True)
        tr = TraceRL(model(device), TOK, DATA, digit_share, cfg)
        tr.train_step()
        ckpt = os.path.join(out, "ckpt")
        tr.save(ckpt)
        tr.train_step()
        again = TraceRL(model(device, seed=1), TOK, DATA, digit_share,  # its own output_dir
                        _rl_cfg(os.path.join(out, "again"), use_value_model=True)).resume(ckpt)
        if again.step != 1:
            raise AssertionError(f"resumed at step {again.step}, expected 1")
        again.train_step()
        err = max(float((a.detach().float() - b.detach().float()).abs().max())
                  for a, b in zip(tr.model.parameters(), again.model.parameters(), strict=True))
        return err, err / 1e-6 if err else 0.0


def cases(device: str):
    return [("sampler: CUDA graphs == eager" if device == "cuda"
             else "sampler: graph-buffer path == eager", graphs_vs_eager),
            ("SFT (SDAR)", sft),
            ("TraceRL + value model (SDAR)", lambda d: rl_row(_tracerl_value, d)),
            ("DiPO + reference KL (SDAR)", lambda d: rl_row(_dipo_ref_kl, d)),
            ("TraceRL, temperature 1.0 (LLaDA)", lambda d: rl_row(_llada_tracerl, d)),
            ("save + resume: next step identical", save_resume)]
