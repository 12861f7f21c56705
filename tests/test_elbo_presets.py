"""ESPO and GDPO (issue #28): the ELBO estimators elbo_mc and quadrature (their masks, rates,
coupling and ELBO weights), each preset's loss and gradient on a small fixed batch against its
paper's formula written here in plain torch (never dlmkern's loss code), for a block (SDAR) and a
full-attention (LLaDA) tiny model, one trainer step of each preset on both, and the refusals.

The formulas (ESPO: Ou et al. 2025, github.com/ML-GSAI/ESPO espo/espo_trainer.py compute_loss,
and DARE verl/trainer/ppo/dllm_core_algos.py compute_policy_loss_espo / compute_espo_kl;
GDPO: Rojas et al. 2025, arXiv 2510.08554), per sequence y of length L with M ELBO copies c:
  ELBO(y) = (1 / M) * sum_c sum_{i masked in c} logp_i / t_c        (t_c = |c| / L)
  quadrature: ELBO(y) = sum_k w_k / t_k * sum_{i masked in copy k} logp_i
  rho = exp((ELBO - ELBO_old) / L), pg = -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
  kl = 0.5 * (ELBO - ELBO_ref)^2 / L (ESPO's k2), loss = mean over sequences of pg + beta kl.
"""

import math

import numpy as np
import pytest
import torch
from dlmkern.ops import Objective, policy_value_loss
from dlmkern.ops.objective import token_weights
from dlmkern.rl import Rows, RowSpec, batch_rows, get_estimator
from dlmkern.rl.estimators import Estimator
from dlmkern.rl.estimators import from_config as estimator_from_config
from dlmkern.rl.estimators.base import EPS
from dlmkern.sampling import Trajectory
from dlmkern.trainers import PRESETS, ESPOConfig, GDPOConfig, RLConfig, RLTrainer, build_config
from dlmkern.trainers.update import selected_logp

from .test_rl_stages import DATA, TOK, _cfg, _model

MASK = TOK.mask_token_id


def _trajs():
    return [Trajectory([1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [0] * 7),
            Trajectory([4, 5], [12, 13, 14, 15, 16], [0] * 5),
            Trajectory([6, 7, 8, 9, 10], [17, 18, 19, 3, 4, 5, 6, 7, 8], [0] * 9),
            Trajectory([2], [11, 12, 13, 14], [0] * 4)]


def _spec(block_size):
    return RowSpec(MASK, block_size)


# ---- the estimators ------------------------------------------------------------------------------


def _uniform_masks(n, seed, draws):
    """The masks t ~ U(EPS, 1), each token masked with probability t, drawn here."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        t = EPS + (1 - EPS) * float(torch.rand((), generator=g))
        out.append(torch.rand(n, generator=g) < t)
    return out


@pytest.mark.parametrize("coupling", ["independent", "complementary"])
def test_elbo_mc_draws_m_masks_at_uniform_rates(coupling):
    n, m = 40, 3
    est = get_estimator("elbo_mc", num_masks=m, mask_coupling=coupling)
    copies = est.copies(Trajectory([1], list(range(n)), [0] * n), _spec(None),
                        torch.Generator().manual_seed(7))
    drawn = _uniform_masks(n, 7, m)
    if coupling == "complementary":
        assert len(copies) == 2 * m
        for j in range(m):  # each pair: a mask and its complement, every token trained once
            a, b = copies[2 * j].masked, copies[2 * j + 1].masked
            assert torch.equal(a, drawn[j]) and torch.equal(b, ~drawn[j])
    else:
        assert [c.masked.tolist() for c in copies] == [d.tolist() for d in drawn]
    for k, c in enumerate(copies):  # trains what it masks, as copy k, weight 1 / K
        assert torch.equal(c.step >= 0, c.masked) and set(c.step[c.masked].tolist()) == {k}
        assert c.weight == pytest.approx(1 / len(copies))


def test_elbo_mc_rates_spread_over_eps_to_one():
    n, draws = 400, 200
    est = get_estimator("elbo_mc", num_masks=draws, mask_coupling="independent")
    copies = est.copies(Trajectory([1], [2] * n, [0] * n), _spec(None),
                        torch.Generator().manual_seed(0))
    share = torch.tensor([float(c.masked.float().mean()) for c in copies])
    # t ~ U(eps, 1): mean ~ 1/2, quartiles ~ 1/4 and 3/4
    assert abs(float(share.mean()) - 0.5) < 0.06
    q = torch.quantile(share, torch.tensor([0.25, 0.75]))
    assert abs(float(q[0]) - 0.25) < 0.08 and abs(float(q[1]) - 0.75) < 0.08


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_quadrature_copies_mask_round_tk_n_tokens_with_gauss_legendre_weights(k):
    x, w = np.polynomial.legendre.leggauss(k)  # on [-1, 1]: t = (x + 1) / 2, weight w / 2
    nodes, weights = (x + 1) / 2, w / 2
    for n in (1, 4, 7, 50):
        copies = get_estimator("quadrature", quadrature_nodes=k).copies(
            Trajectory([1], [3] * n, [0] * n), _spec(None), torch.Generator().manual_seed(n))
        assert len(copies) == k
        for c, t, wk in zip(copies, nodes, weights, strict=True):
            assert int(c.masked.sum()) == min(n, max(1, round(t * n)))
            assert c.weight == pytest.approx(wk, abs=1e-12)
            assert torch.equal(c.step >= 0, c.masked)


@pytest.mark.parametrize("block_size", [4, None])
@pytest.mark.parametrize("name, opts", [
    ("elbo_mc", {"num_masks": 2, "mask_coupling": "complementary"}),  # every token trained
    ("quadrature", {"quadrature_nodes": 3}),
])
def test_rows_carry_the_copy_weights_and_elbo_weights_sum_to_the_length(name, opts, block_size):
    trajs = _trajs()
    est = opts if isinstance(opts, Estimator) else get_estimator(name, **opts)
    gens = [torch.Generator().manual_seed(i) for i in range(len(trajs))]
    rows = batch_rows(est, trajs, _spec(block_size), gens)
    n = torch.tensor([len(t.token_ids) for t in trajs])
    w = token_weights("elbo", rows.traj, rows.step, n, rows.copy_weight)
    for b, t in enumerate(trajs):
        copies = est.copies(t, _spec(block_size), torch.Generator().manual_seed(b))
        for k, c in enumerate(copies):  # each trained token: its copy's weight / its share
            sel = (rows.traj == b) & (rows.step == k)
            assert sorted(rows.gen_index[sel].tolist()) == c.masked.nonzero().squeeze(1).tolist()
            want = c.weight * len(t.token_ids) / int(c.masked.sum())
            torch.testing.assert_close(w[sel], torch.full((int(sel.sum()),), want))
        if name == "elbo_mc":  # quadrature: only up to the rounding of t_k n
            assert float(w[rows.traj == b].sum()) == pytest.approx(len(t.token_ids), rel=1e-6)
    # carried through Rows.cat (an empty trajectory's rows too) and .to
    empty = est.rows(Trajectory([1, 2], [], []), _spec(block_size), torch.Generator())
    both = Rows.cat([rows, empty, rows]).to("cpu")
    assert torch.equal(both.copy_weight, torch.cat([rows.copy_weight, rows.copy_weight]))
    assert get_estimator("coupled").rows(trajs[0], _spec(block_size),
                                         torch.Generator()).copy_weight is None


# ---- the losses against the papers' formulas -----------------------------------------------------


def _batch(family, name, opts, seed=0):
    # opts: the estimator's options, or the estimator itself (estimators.from_config)
    """The estimator's rows of four trajectories through a tiny model: per trained token its
    log-prob (with gradient), fixed old / reference log-probs (the old ones shifted per sequence
    so that sequences 0 and 2 leave the clip range), one advantage per sequence."""
    model = _model(family, seed=seed)
    block = model.config.block_size if model.config.block_causal else None
    trajs = _trajs()
    est = opts if isinstance(opts, Estimator) else get_estimator(name, **opts)
    copies = [est.copies(t, _spec(block), torch.Generator().manual_seed(10 + b))
              for b, t in enumerate(trajs)]
    rows = batch_rows(est, trajs, _spec(block),
                      [torch.Generator().manual_seed(10 + b) for b in range(len(trajs))])
    logp = selected_logp(model, rows, "cpu", temperature=1.0).detach()
    g = torch.Generator().manual_seed(seed)
    shift = torch.tensor([0.9, 0.02, -0.9, -0.03])[rows.traj]
    old = (logp - shift / torch.tensor([len(t.token_ids) for t in trajs])[rows.traj] * 8
           + 0.1 * torch.randn(logp.shape, generator=g))  # per token: the weights matter
    ref = logp + 0.2 * torch.randn(logp.shape, generator=g)
    adv = torch.tensor([1.0, -0.6, -1.2, 0.5])
    return dict(rows=rows, trajs=trajs, copies=copies, logp=logp, old=old, ref=ref, adv=adv)


def _elbo(b, lp, quadrature):
    """Per sequence, its ELBO estimate from the copies' masks (the papers' formula): the copies'
    mean of sum_{masked} logp / t (Monte Carlo) or sum_k w_k / t_k sum_{masked} logp
    (quadrature weights w_k read from numpy's Gauss-Legendre rule)."""
    rows, out = b["rows"], []
    for s, (t, copies) in enumerate(zip(b["trajs"], b["copies"], strict=True)):
        L = len(t.token_ids)
        if quadrature:
            x, w = np.polynomial.legendre.leggauss(len(copies))
            coef = [float(wk) / 2 for wk in w]
        else:
            coef = [1 / len(copies)] * len(copies)
        total = lp.new_zeros(())
        for k, (c, wk) in enumerate(zip(copies, coef, strict=True)):
            tk = int(c.masked.sum()) / L
            lp_k = lp[(rows.traj == s) & (rows.step == k)]
            assert lp_k.numel() == int(c.masked.sum())
            total = total + wk / tk * lp_k.sum()
        out.append(total)
    return torch.stack(out)


def _paper_loss(b, lp, quadrature, eps, beta, kl):
    L = torch.tensor([float(len(t.token_ids)) for t in b["trajs"]])
    elbo, old = _elbo(b, lp, quadrature), _elbo(b, b["old"], quadrature)
    rho = torch.exp((elbo - old) / L)
    pg = -torch.minimum(rho * b["adv"], torch.clamp(rho, 1 - eps, 1 + eps) * b["adv"])
    loss = pg.mean()
    if beta:
        d = elbo - _elbo(b, b["ref"], quadrature)
        pen = 0.5 * d**2 / L if kl == "quadratic" else (torch.exp(-d) + d - 1) / L
        loss = loss + beta * pen.mean()
    return loss, rho


def _ours(b, objective):
    rows = b["rows"]
    n = torch.tensor([len(t.token_ids) for t in b["trajs"]])
    w = token_weights("elbo", rows.traj, rows.step, n, rows.copy_weight)
    lp = b["logp"].clone().requires_grad_()
    loss, stats = policy_value_loss(
        lp, b["old"], b["adv"][rows.traj], torch.ones_like(lp, dtype=torch.bool),
        objective=objective, ref_logp=b["ref"] if objective.kl_coef else None, weights=w,
        seq_ids=rows.traj, num_seqs=rows.num_trajectories)
    loss.backward()
    return loss.detach(), lp.grad, stats


@pytest.mark.parametrize("family", ["sdar", "llada"])
@pytest.mark.parametrize("preset, name, quadrature, over", [
    (ESPOConfig, "elbo_mc", False, {}),
    (ESPOConfig, "elbo_mc", False, {"mask_coupling": "independent", "num_masks": 3,
                                    "kl_coef": 0.2}),
    (GDPOConfig, "quadrature", True, {}),
    (GDPOConfig, "quadrature", True, {"kl_coef": 0.1, "kl_kind": "k3", "kl_level": "sequence",
                                      "kl_to": "ref", "quadrature_nodes": 4}),
])
def test_the_presets_loss_and_gradient_are_their_papers_formula(family, preset, name,
                                                                 quadrature, over):
    cfg = preset(**over).validate()
    obj = Objective.from_config(cfg)
    b = _batch(family, name, estimator_from_config(cfg))
    loss, grad, stats = _ours(b, obj)
    lp = b["logp"].clone().requires_grad_()
    want, rho = _paper_loss(b, lp, quadrature, cfg.eps_low, cfg.kl_coef, cfg.kl_kind)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, lp.grad, atol=1e-6, rtol=1e-5)
    # the batch reaches both branches: some sequences clipped (no gradient), others not
    clipped = (rho < 1 - cfg.eps_low) | (rho > 1 + cfg.eps_high)
    assert bool(clipped.any()) and bool((~clipped).any())
    if obj.kl_coef:
        assert float(stats["kl"]) > 0


def test_a_sequence_kl_without_weights_is_the_kind_of_the_summed_log_ratio():
    # kl_level=sequence on unweighted tokens: kind(sum of x) / (tokens), one per sequence
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    g = torch.Generator().manual_seed(1)
    logp, ref = -1 + 0.3 * torch.randn(9, generator=g), -1 + 0.3 * torch.randn(9, generator=g)
    obj = Objective(kl_coef=0.5, kl_kind="k3", kl_level="sequence", reduction="seq_mean")
    lp = logp.clone().requires_grad_()
    loss, _ = policy_value_loss(lp, logp, torch.zeros(9), torch.ones(9, dtype=torch.bool),
                                objective=obj, ref_logp=ref, seq_ids=seq, num_seqs=3)
    loss.backward()
    lp2 = logp.clone().requires_grad_()
    pen = []
    for s in range(3):
        x = (ref - lp2)[seq == s].sum()
        pen.append((torch.exp(x) - x - 1) / int((seq == s).sum()))
    want = 0.5 * torch.stack(pen).mean()
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(lp.grad, lp2.grad)
    assert "kl_level=sequence" in obj.path_note()


# ---- the presets train -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sdar", "llada"])
@pytest.mark.parametrize("preset", [ESPOConfig, GDPOConfig])
def test_one_step_of_each_preset_trains(tmp_path, family, preset):
    def alternate(prompts, completions, **_):  # a reward spread in every group
        return [float(i % 2) for i in range(len(completions))]

    over = {"gen_block_length": 4} if family == "llada" else {}
    if preset is ESPOConfig:
        over["kl_coef"] = 0.05  # the frozen reference is loaded and scored
    tr = RLTrainer(_model(family), TOK, DATA, alternate, _cfg(tmp_path, preset=preset, **over))
    assert tr.name == preset.algo and tr.estimator.name == preset().estimator
    if preset is ESPOConfig:  # the config's estimator options reach the estimator
        assert (tr.estimator.num_masks, tr.estimator.mask_coupling) == (2, "complementary")
    else:
        assert tr.estimator.quadrature_nodes == 3
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))
    assert PRESETS[preset.algo] is preset


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, over, keys", [
    (ESPOConfig, {"estimator": "random_mask"}, ("num_masks=2", "estimator=random_mask")),
    (RLConfig, {"quadrature_nodes": 5}, ("quadrature_nodes=5", "estimator=trace")),
    (GDPOConfig, {"mask_coupling": "complementary"},
     ("mask_coupling=complementary", "estimator=quadrature")),
    (GDPOConfig, {"token_weights": "none"}, ("estimator=quadrature", "token_weights=none")),
    (ESPOConfig, {"num_masks": 0}, ("num_masks must be >= 1",)),
    (ESPOConfig, {"kl_level": "block"}, ("kl_level must be one of",)),
])
def test_bad_settings_are_refused_at_config_time_naming_both_keys(preset, over, keys):
    for make in (lambda: preset(**over).validate(),  # and as a run file's overrides
                 lambda: build_config(preset, {}, [f"{k}={v}" for k, v in over.items()])):
        with pytest.raises(ValueError) as e:
            make()
        assert all(k in str(e.value) for k in keys), str(e.value)
