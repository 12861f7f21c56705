"""Convergence, Liger style: the demo-size model trains a few SFT and TraceRL steps once on the
native kernels and once on the pure-torch references (``use_backend("reference")``: dense
masks, full logits, eager loss) from the same seed; losses, log-probs and parameters agree.

Tolerances (fp32): losses rtol 1e-4; log-probs atol 1e-4; the last SFT and the last RL step's
gradients within 1e-4 of their largest entry; parameters atol 1e-3 after 8 optimizer steps that
move them by more than 5e-3 (Adam turns the kernels' ~1e-6 differences in small gradients into
larger differences of the updates; measured 2026-12-03: 3.7e-4)."""

import random

import pytest
import torch
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import use_backend
from dlmkern.ops.backend import current
from dlmkern.rl import Rows
from dlmkern.trainers import SFT, SFTConfig, TraceRL
from dlmkern.trainers.update import selected_logp

from .rl_helpers import rl_config

TOK = CharTokenizer("0123456789+=")


def addition_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(rng.randrange(100), rng.randrange(100)) for _ in range(n)]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


def digits_right(prompts, completions, answer, **_):
    """Partial credit (share of answer digits in place): groups have spread, every step trains."""
    return [sum(a == b for a, b in zip(c, ans, strict=False)) / len(ans)
            for c, ans in zip(completions, answer, strict=True)]


def _train(backend: str, tmp_path):
    train, test = addition_rows(200, seed=0), addition_rows(16, seed=1)
    torch.manual_seed(0)
    cfg = tiny_config("sdar", vocab_size=TOK.vocab_size, hidden_size=128, intermediate_size=384,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                      mask_token_id=TOK.mask_token_id, max_position_embeddings=64)
    model = DiffusionLM(cfg)
    start = [p.detach().clone() for p in model.parameters()]  # "moved" is measured from here
    losses = []
    with use_backend(backend):
        sft = SFT(model, TOK, train, SFTConfig(batch_size=16, lr=2e-3, total_steps=5, seed=0,
                                               output_dir=str(tmp_path / backend / "sft")))
        losses += [sft.train_step()["loss"] for _ in range(5)]
        grads = [_grads(model)]  # of the last SFT step
        rl = TraceRL(model, TOK, train, digits_right, rl_config(
            prompts_per_step=4, group_size=4, max_new_tokens=4, steps_per_block=2,
            temperature=1.0, lr=5e-4, seed=0, output_dir=str(tmp_path / backend / "rl"),
            progress_bar=False, pass_rate_low=0.0, pass_rate_high=1.0, kl_coef=0.01))
        seen = {}  # the update frees its gradients after the step: read them just before
        hook = rl.opt.register_step_pre_hook(lambda *_: seen.update(grads=_grads(model)))
        steps = [rl.train_step() for _ in range(3)]
        hook.remove()
        grads.append(seen["grads"])  # of the last RL step
        trajs = rl.rollout(test[:4]).trajs
        with torch.no_grad():
            logp = selected_logp(model, Rows.cat(rl.rows(trajs)), rl.device,
                                 temperature=rl.cfg.sampling.temperature)
    assert not any("skipped" in s for s in steps), steps
    losses += [s["loss"] for s in steps]
    return (losses, [s["reward_mean"] for s in steps], [t.token_ids for t in trajs], logp,
            grads, model, start)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.slow
def test_native_and_reference_backends_train_the_same_model(tmp_path):
    native = _train("native", tmp_path)
    ref = _train("reference", tmp_path)
    assert current() == "native"  # the with-block restored it
    loss_n, reward_n, tok_n, logp_n, grads_n, model_n, start_n = native
    loss_r, reward_r, tok_r, logp_r, grads_r, model_r, start_r = ref
    assert all(torch.equal(a, b) for a, b in zip(start_n, start_r, strict=True))
    assert reward_n == reward_r and tok_n == tok_r  # the same rollouts: sampling agreed
    torch.testing.assert_close(torch.tensor(loss_n), torch.tensor(loss_r), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logp_n, logp_r, atol=1e-4, rtol=0)
    for gn, gr in zip(grads_n, grads_r, strict=True):  # same step, same data: same gradient
        assert float((gn - gr).abs().max()) < 1e-4 * float(gr.abs().max())
    diff = max(float((a - b).detach().abs().max())
               for a, b in zip(model_n.parameters(), model_r.parameters(), strict=True))
    # from its own starting weights (a fresh random init differs from any model: no test)
    moved = max(float((p.detach() - p0).abs().max())
                for p, p0 in zip(model_n.parameters(), start_n, strict=True))
    print(f"max |param native - reference| = {diff:.2e}, moved {moved:.2e}; losses {loss_n}")
    assert diff < 1e-3 and moved > 5e-3


def test_use_backend_switches_every_op_and_restores():
    from dlmkern.ops import block_attention, layouts, masked_logprobs, reference

    lay = layouts.bd3([9], 4)
    q = torch.randn(lay.num_tokens, 2, 64)
    with use_backend("reference"):
        assert current() == "reference"
        out, _ = block_attention(q, q, q, lay)
        want, _ = reference.block_attention(q, q, q, lay.cu_seqlens, lay.block, lay.stream)
        assert torch.equal(out, want)  # bit-equal: the reference itself ran
        h, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
        assert torch.equal(masked_logprobs(h, w, t), reference.masked_logprobs(h, w, t))
    assert current() == "native"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        use_backend("cuda")
    assert current() == "native"
