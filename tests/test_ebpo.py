"""EBPO (issue #28; the SPG family's third member, beside tests/test_spg_family.py): the
all-block stratified masks, the per-block ELBO weights, the loss and gradient against a
plain-torch composite-ELBO PPO written here from the LLaDA2.1 report and DARE (never dlmkern's
loss code), a trainer step on the block family, the full-attention refusal and the config-time
refusals."""

import math

import pytest
import torch
from dlmkern.ops import Objective, policy_value_loss
from dlmkern.ops.objective import response_block_lengths, response_blocks, token_weights
from dlmkern.rl.estimators import BlockStratified, from_config
from dlmkern.rl.rows import Rows, build_rows
from dlmkern.trainers import RLConfig, build_config
from dlmkern.trainers.presets import PRESETS, EBPOConfig
from dlmkern.trainers.rl import RLTrainer

from .test_rl_stages import DATA, TOK, _cfg, _model
from .test_spg_family import SPECS, _blocks, _traj


def test_every_block_of_every_copy_is_masked_at_a_stratified_level():
    est = BlockStratified(num_masks=3)
    for seed in range(20):
        P, n = 2 + seed % 5, 6 + seed % 8
        blk = _blocks(P, n, "block")
        for cp in est.copies(_traj(P, n), SPECS["block"], torch.Generator().manual_seed(seed)):
            m = cp.masked.tolist()
            for b in set(blk):
                assert any(m[i] for i in range(n) if blk[i] == b)  # >= 1 token per block
    # one block of 4 tokens and 4 copies: levels (u + i/4) mod 1 give k = floor(4 level) + 1,
    # one copy for each count 1..4
    est = BlockStratified(num_masks=4)
    for seed in range(20):
        cps = est.copies(_traj(4, 4), SPECS["block"], torch.Generator().manual_seed(seed))
        assert sorted(int(c.masked.sum()) for c in cps) == [1, 2, 3, 4]
        for c, cp in enumerate(cps):
            assert cp.step.tolist() == [c if x else -1 for x in cp.masked.tolist()]


def test_block_elbo_weights_are_one_over_each_blocks_rate():
    # one trajectory, prompt 3, 6 generated tokens, block size 4: blocks [3] and [4..7] and [8]
    gen = torch.arange(6)
    P, L = torch.full((6,), 3), torch.full((6,), 6)
    blk = response_blocks(gen, P, 4, 99)
    assert blk.tolist() == [0, 1, 1, 1, 1, 2]
    assert response_block_lengths(gen, P, L, 4, 99).tolist() == [1, 4, 4, 4, 4, 1]
    assert response_block_lengths(gen, P, L, None, 4).tolist() == [4, 4, 4, 4, 2, 2]
    # copy 0 masks tokens 0, 1, 2 (block 1: 2 of 4 -> w 2), copy 1 masks 3 and 5
    traj, step = torch.zeros(5, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1])
    g = torch.tensor([0, 1, 2, 3, 5])
    w = token_weights("block_elbo", traj, step, torch.tensor([6]), blocks=blk[g],
                      block_lengths=response_block_lengths(g, P[:5], L[:5], 4, 99))
    assert w.tolist() == [1.0, 2.0, 2.0, 4.0, 1.0]


ADV = [0.9, -0.6, -1.1, 0.3]


def _fixed(kind):
    est, spec = BlockStratified(num_masks=3, gen_block_length=4), SPECS[kind]
    trajs = [_traj(3, 9), _traj(5, 6), _traj(2, 11), _traj(4, 7)]
    copies = [est.copies(t, spec, torch.Generator().manual_seed(21 + i))
              for i, t in enumerate(trajs)]
    rows = Rows.cat([build_rows(t, c, spec) for t, c in zip(trajs, copies, strict=True)])
    g = torch.Generator().manual_seed(9)
    logp = -0.2 - 1.5 * torch.rand(rows.traj.numel(), generator=g)
    # log-ratios ~ L_s * drift_s (1/t sums to L per copy): two clipped, two inside [0.8, 1.2]
    drift = torch.tensor([0.05, -0.05, 0.01, 0.005])[rows.traj]
    old = logp - drift + 0.002 * torch.randn(logp.shape, generator=g)
    return trajs, copies, rows, logp, old


def _composite_elbo(lp_flat, trajs, copies, rows, kind):
    """(1/M) sum_m sum_b sum_{j in S_mb} log p_mj / t_mb, t_mb = |S_mb| / |block b| (the
    report's eq. 4: all blocks' ELBO terms in one input per timestep, uniform w_n; DARE
    compute_ebpo_composite_elbo over token ELBOs log p / p_mask)."""
    at = {(int(s), int(m), int(j)): i for i, (s, m, j) in
          enumerate(zip(rows.traj, rows.step, rows.gen_index, strict=True))}
    out = []
    for s, (t, cps) in enumerate(zip(trajs, copies, strict=True)):
        L, blk = len(t.token_ids), _blocks(len(t.prompt_ids), len(t.token_ids), kind)
        total = 0.0
        for m, cp in enumerate(cps):
            for b in set(blk):
                inside = [j for j in range(L) if blk[j] == b]
                S = [j for j in inside if cp.masked[j]]
                total = total + sum(lp_flat[at[(s, m, j)]] for j in S) / (len(S) / len(inside))
        out.append(total / len(cps))
    return out


@pytest.mark.parametrize("kind", ["block", "full"])
def test_ebpo_loss_and_gradient_equal_the_composite_elbo_ppo(kind):
    # the loss op is model-agnostic (rows of either kind); the preset refuses full attention
    trajs, copies, rows, logp, old = _fixed(kind)
    P = torch.tensor([len(t.prompt_ids) for t in trajs])[rows.traj]
    L = torch.tensor([len(t.token_ids) for t in trajs])
    bs = 4 if kind == "block" else None
    w = token_weights("block_elbo", rows.traj, rows.step, L,
                      blocks=response_blocks(rows.gen_index, P, bs, 4),
                      block_lengths=response_block_lengths(rows.gen_index, P, L[rows.traj], bs, 4))
    lp = logp.clone().requires_grad_()
    loss, stats = policy_value_loss(
        lp, old, torch.tensor(ADV)[rows.traj], torch.ones_like(lp, dtype=torch.bool),
        objective=Objective.from_config(EBPOConfig()), weights=w, seq_ids=rows.traj,
        num_seqs=len(trajs), copy_ids=rows.step)
    loss.backward()

    ref = logp.clone().requires_grad_()
    new, base = (_composite_elbo(ref, trajs, copies, rows, kind),
                 _composite_elbo(old, trajs, copies, rows, kind))
    # DARE compute_policy_loss_ebpo: r = exp(E - E_old), -A r clipped in [0.8, 1.2] once per
    # sequence (max(-A r, -A clip(r))), mean over sequences
    want = sum(torch.maximum(-A * torch.exp(e - e0), -A * torch.clamp(torch.exp(e - e0), 0.8, 1.2))
               for A, e, e0 in zip(ADV, new, base, strict=True)) / len(ADV)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.grad, ref.grad, atol=1e-6, rtol=1e-5)
    assert 0 < stats["clip_frac"] < 1  # some sequences clipped, some not


def test_the_preset_is_the_reports_and_refuses_full_attention(tmp_path):
    c = EBPOConfig().validate()
    assert PRESETS["ebpo"] is EBPOConfig
    assert (c.estimator, c.num_masks, c.ratio_level, c.token_weights, c.dual_clip, c.lr) == (
        "block_stratified", 16, "elbo", "block_elbo", 0.0, 5e-7)
    assert isinstance(from_config(c), BlockStratified)
    with pytest.raises(ValueError, match=r"token_weights=block_elbo / estimator="
                                         r"block_stratified .*full-attention"):
        RLTrainer(_model("llada"), TOK, DATA, lambda p, c, **_: [0.0] * len(c),
                  _cfg(tmp_path, EBPOConfig, num_masks=2, gen_block_length=4))


def test_ebpo_trains_through_the_update_on_a_block_model(tmp_path):
    def alternate(prompts, completions, **_):
        return [float(i % 2) for i in range(len(completions))]

    tr = RLTrainer(_model("sdar"), TOK, DATA, alternate,
                   _cfg(tmp_path, EBPOConfig, lr=1e-3, num_masks=4))
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


@pytest.mark.parametrize("over, keys", [
    ({"ratio_level": "elbo", "token_weights": "step", "estimator": "block_stratified"},
     ("ratio_level=elbo", "token_weights=step")),
    ({"ratio_level": "token", "token_weights": "block_elbo", "estimator": "trace",
      "num_masks": 1},  # (trace reads no num_masks: refused on its own)
     ("token_weights=block_elbo", "estimator=trace")),
])
def test_bad_ebpo_settings_are_refused_at_config_time(over, keys):
    for make in (lambda: RLConfig(**over).validate(),
                 lambda: build_config(EBPOConfig, {}, [f"{k}={v}" for k, v in over.items()])):
        with pytest.raises(ValueError) as e:
            make()
        assert all(k in str(e.value) for k in keys), str(e.value)
