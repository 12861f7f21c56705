"""SPG and BGPO (issue #28): their estimators' masks (block-wise, stratified), each loss and
gradient against plain-torch formulas written here from the papers and the authors' code (never
dlmkern's loss code), on rows built for block and full-attention models, a trainer step of each
preset on both tiny families, and the config-time refusals."""

import math
from types import SimpleNamespace

import pytest
import torch
from dlmkern.ops import Objective, policy_value_loss
from dlmkern.ops.objective import token_weights
from dlmkern.rl import RowSpec
from dlmkern.rl.estimators import Blockwise, Stratified, from_config
from dlmkern.rl.rows import Rows, build_rows
from dlmkern.trainers import RLConfig, build_config
from dlmkern.trainers.presets import PRESETS, BGPOConfig, SPGConfig
from dlmkern.trainers.rl import RLTrainer

from .test_rl_stages import DATA, TOK, _cfg, _model

MASK = 99
SPECS = {"block": RowSpec(MASK, 4), "full": RowSpec(MASK, None)}


def _traj(P, n):
    return SimpleNamespace(prompt_ids=list(range(1, P + 1)), token_ids=list(range(10, 10 + n)),
                           step_map=[0] * n, after_eos_ids=[])


def _blocks(P, n, kind, bl=4):
    """Each generated token's block, written out: block models P + i in blocks of 4 (the
    sampler's alignment), full attention i in blocks of gen_block_length."""
    if kind == "block":
        return [(P + i) // 4 - P // 4 for i in range(n)]
    return [i // bl for i in range(n)]


# ---- the estimator -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["block", "full"])
def test_blockwise_masks_clean_blocks_then_one_at_a_rate_then_all(kind):
    est = Blockwise(num_masks=3, gen_block_length=4)
    for seed in range(30):
        P, n = 3 + seed % 4, 5 + seed % 9
        blk = _blocks(P, n, kind)
        copies = est.copies(_traj(P, n), SPECS[kind], torch.Generator().manual_seed(seed))
        assert len(copies) == 3
        chosen = []
        for c, cp in enumerate(copies):
            m = cp.masked.tolist()
            b = min(blk[i] for i in range(n) if m[i])  # the boundary block
            inside = [m[i] for i in range(n) if blk[i] == b]
            assert all(m[i] == (blk[i] > b) for i in range(n) if blk[i] != b)
            assert 1 <= sum(inside) <= len(inside)
            assert cp.step.tolist() == [c if x else -1 for x in m]  # trains what it masks
            chosen.append(b)
        n_blocks = blk[-1] + 1
        assert len(set(chosen)) == min(3, n_blocks)  # distinct blocks while there are enough


def test_blockwise_rates_block_uniform_and_count_uniform():
    # the block is uniform over the completion's blocks, the masked count k ~ U{1..len(block)}
    est, spec = Blockwise(num_masks=1, gen_block_length=4), SPECS["full"]
    g = torch.Generator().manual_seed(0)
    picks, fracs = [], []
    for _ in range(3000):
        m = est.copies(_traj(2, 12), spec, g)[0].masked
        b = int(m.nonzero()[0]) // 4
        picks.append(b)
        fracs.append(float(m[4 * b:4 * b + 4].float().mean()))
    freq = torch.bincount(torch.tensor(picks), minlength=3).float() / len(picks)
    torch.testing.assert_close(freq, torch.full((3,), 1 / 3), atol=0.04, rtol=0)
    assert abs(sum(fracs) / len(fracs) - (1 + 2 + 3 + 4) / 4 / 4) < 0.03  # E[k / 4] = 5 / 8


def test_the_config_keys_reach_the_estimator():
    est = from_config(SPGConfig(num_masks=3, gen_block_length=8))
    assert isinstance(est, Blockwise) and (est.num_masks, est.gen_block_length) == (3, 8)


# ---- the loss against the paper's formulas -------------------------------------------------------

BETA, OMEGA = 1.5, 0.5
ADV = [0.9, -0.6, -1.1, 0.3]  # one per sequence: two ELBO, two EUBO / mixture sequences


def _fixed(kind):
    """Four trajectories' block-wise copies (2 each), rows built from them, and a log-prob for
    every trained token."""
    est, spec = Blockwise(num_masks=2, gen_block_length=4), SPECS[kind]
    trajs = [_traj(3, 9), _traj(5, 6), _traj(2, 11), _traj(4, 7)]
    copies = [est.copies(t, spec, torch.Generator().manual_seed(7 + i))
              for i, t in enumerate(trajs)]
    rows = Rows.cat([build_rows(t, c, spec) for t, c in zip(trajs, copies, strict=True)])
    g = torch.Generator().manual_seed(3)
    logp = -0.2 - 1.5 * torch.rand(rows.traj.numel(), generator=g)
    return trajs, copies, rows, logp


def _seq_bounds(lp, masks, L):
    """One sequence's bounds from its copies' masks [M][L] and log-probs lp[(m, j)], written
    from SPG (Wang et al. 2025), sec. 3 and the authors' spg_trainer._get_per_seq_logps:
    ELBO = (1/M) sum_m (1/|S_m|) sum_{j in S_m} log p_mj;
    EUBO = (1/beta) mean_{j in J} log((1/M) sum_m 1[j in S_m] p_mj^beta / t_m), t_m = |S_m| / L,
    J = the positions some copy masks."""
    M = len(masks)
    elbo = sum(sum(lp[(m, j)] for j in range(L) if masks[m][j]) / sum(masks[m])
               for m in range(M)) / M
    logs = []
    for j in range(L):
        terms = [torch.exp(BETA * lp[(m, j)]) / (sum(masks[m]) / L)
                 for m in range(M) if masks[m][j]]
        if terms:
            logs.append(torch.log(sum(terms) / M))
    eubo = sum(logs) / len(logs) / BETA
    return elbo, eubo


def _truth_loss(lp_flat, trajs, copies, rows, bound):
    """-mean_s A_s v_s, v_s the ELBO for A_s > 0, else the EUBO / mixture / ELBO (bound)."""
    at = {(int(s), int(m), int(j)): i for i, (s, m, j) in
          enumerate(zip(rows.traj, rows.step, rows.gen_index, strict=True))}
    total = 0.0
    for s, (t, cps) in enumerate(zip(trajs, copies, strict=True)):
        L = len(t.token_ids)
        masks = [c.masked.tolist() for c in cps]
        lp = {(m, j): lp_flat[at[(s, m, j)]] for m in range(len(masks)) for j in range(L)
              if masks[m][j]}
        elbo, eubo = _seq_bounds(lp, masks, L)
        neg = {"elbo": elbo, "sandwich": eubo, "mixture": OMEGA * eubo + (1 - OMEGA) * elbo}
        total = total - ADV[s] * (elbo if ADV[s] > 0 else neg[bound])
    return total / len(trajs)


@pytest.mark.parametrize("kind", ["block", "full"])
@pytest.mark.parametrize("bound", ["elbo", "sandwich", "mixture"])
def test_spg_loss_and_gradient_equal_the_papers_bounds(kind, bound):
    trajs, copies, rows, logp = _fixed(kind)
    obj = Objective(ratio_level="none", token_weights="elbo", likelihood_bound=bound,
                    eubo_beta=BETA, mixture_weight=OMEGA, reduction="seq_mean")
    n = torch.tensor([len(t.token_ids) for t in trajs])
    lp = logp.clone().requires_grad_()
    loss, _ = policy_value_loss(
        lp, logp.detach(), torch.tensor(ADV)[rows.traj], torch.ones_like(lp, dtype=torch.bool),
        objective=obj, weights=token_weights("elbo", rows.traj, rows.step, n),
        seq_ids=rows.traj, num_seqs=len(trajs), copy_ids=rows.step, positions=rows.gen_index)
    loss.backward()
    ref = logp.clone().requires_grad_()
    want = _truth_loss(ref, trajs, copies, rows, bound)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.grad, ref.grad, atol=1e-6, rtol=1e-5)
    assert lp.grad.abs().sum() > 0


def test_the_bound_needs_its_ids_and_runs_on_the_reference():
    obj = SPGConfig()
    o = Objective.from_config(obj)
    assert "likelihood_bound=mixture" in o.unfused() and "likelihood_bound" in o.path_note()
    x = torch.zeros(3)
    ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`copy_ids` missing: .*likelihood_bound=mixture"):
        policy_value_loss(x, x, x, x > -1, objective=o, weights=x + 1, seq_ids=ids)
    with pytest.raises(ValueError, match=r"`positions` missing: .*likelihood_bound=mixture"):
        policy_value_loss(x, x, x, x > -1, objective=o, weights=x + 1, seq_ids=ids,
                          copy_ids=ids)
    with pytest.raises(ValueError, match=r"`copy_ids` given: .*ratio_level=token"):
        policy_value_loss(x, x, x, x > -1, copy_ids=ids, positions=ids)


# ---- the preset ----------------------------------------------------------------------------------


def test_the_preset_is_the_papers():
    c = SPGConfig().validate()
    assert PRESETS["spg"] is SPGConfig
    assert (c.estimator, c.num_masks, c.likelihood_bound, c.eubo_beta, c.mixture_weight,
            c.ratio_level, c.token_weights, c.kl_coef) == (
        "blockwise", 2, "mixture", 1.5, 0.5, "none", "elbo", 0.0)


@pytest.mark.parametrize("family, over", [
    ("sdar", {}),
    ("llada", {"gen_block_length": 4}),
    ("sdar", {"likelihood_bound": "sandwich", "num_masks": 3}),
])
def test_spg_trains_through_the_update(tmp_path, family, over):
    def alternate(prompts, completions, **_):  # both signs of advantage in every group
        return [float(i % 2) for i in range(len(completions))]

    tr = RLTrainer(_model(family), TOK, DATA, alternate, _cfg(tmp_path, SPGConfig, **over))
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


@pytest.mark.parametrize("over, keys", [
    ({"likelihood_bound": "sandwich", "ratio_level": "token", "token_weights": "elbo",
      "estimator": "blockwise"}, ("likelihood_bound=sandwich", "ratio_level=token")),
    ({"likelihood_bound": "mixture", "ratio_level": "none", "token_weights": "none"},
     ("likelihood_bound=mixture", "token_weights=none")),
    ({"likelihood_bound": "upper"}, ("likelihood_bound must be one of",)),
    ({"eubo_beta": 0.5}, ("eubo_beta",)),
    ({"mixture_weight": 1.5}, ("mixture_weight",)),
    ({"num_masks": 0}, ("num_masks",)),
])
def test_bad_spg_settings_are_refused_at_config_time(over, keys):
    for make in (lambda: RLConfig(**over).validate(),
                 lambda: build_config(SPGConfig, {}, [f"{k}={v}" for k, v in over.items()])):
        with pytest.raises(ValueError) as e:
            make()
        assert all(k in str(e.value) for k in keys), str(e.value)


# ---- BGPO ----------------------------------------------------------------------------------------


def test_stratified_counts_are_evenly_spread_from_a_random_start():
    est, g = Stratified(num_masks=4), torch.Generator().manual_seed(0)
    starts = []
    for _ in range(400):
        cps = est.copies(_traj(3, 10), SPECS["block"], g)
        k = [int(c.masked.sum()) for c in cps]
        assert all(1 <= x <= 10 for x in k)
        # k_i = ((round(k_0 + 2.5 i) - 1) mod 10) + 1: consecutive counts 2.5 apart, mod 10
        for i in range(4):
            assert k[i] == (round(k[0] + 2.5 * i + 1e-9) - 1) % 10 + 1 or \
                k[i] == (int(k[0] + 2.5 * i) - 1) % 10 + 1  # round half to even
        for c, cp in enumerate(cps):
            assert cp.step.tolist() == [c if x else -1 for x in cp.masked.tolist()]
        starts.append(k[0])
    freq = torch.bincount(torch.tensor(starts), minlength=11)[1:].float() / len(starts)
    assert freq.min() > 0.04 and freq.max() < 0.17  # the start k_0 ~ U{1..10}


C_DUAL = 3.0
ADV_B = [0.9, -0.6, -1.1, 0.3]


def _bgpo_fixed(kind, on_policy=False):
    est, spec = Stratified(num_masks=4), SPECS[kind]
    trajs = [_traj(3, 9), _traj(5, 6), _traj(2, 11), _traj(4, 7)]
    copies = [est.copies(t, spec, torch.Generator().manual_seed(11 + i))
              for i, t in enumerate(trajs)]
    rows = Rows.cat([build_rows(t, c, spec) for t, c in zip(trajs, copies, strict=True)])
    g = torch.Generator().manual_seed(5)
    logp = -0.2 - 1.5 * torch.rand(rows.traj.numel(), generator=g)
    # off-policy: per-sequence drifts so that ratios leave [0.8, 1.2] and the dual clip binds
    drift = torch.tensor([0.5, -0.4, 1.6, 0.02])[rows.traj]
    old = logp.clone() if on_policy else logp - drift + 0.2 * torch.randn(logp.shape, generator=g)
    return trajs, copies, rows, logp, old


def _elbo_samples(lp_flat, trajs, copies, rows):
    """l[s][m] = (sum_{j in S_m} log p_mj / t_m) / L_s, t_m = |S_m| / L_s: copy m's ELBO
    sample over the completion's length (BGPO, Lin et al. 2025, eq. 3; DARE llada_dp_actor_bgpo
    loss_per_sample / response_length)."""
    at = {(int(s), int(m), int(j)): i for i, (s, m, j) in
          enumerate(zip(rows.traj, rows.step, rows.gen_index, strict=True))}
    out = []
    for s, (t, cps) in enumerate(zip(trajs, copies, strict=True)):
        L = len(t.token_ids)
        per = []
        for m, cp in enumerate(cps):
            S = [j for j in range(L) if cp.masked[j]]
            per.append(sum(lp_flat[at[(s, m, j)]] for j in S) / (len(S) / L) / L)
        out.append(per)
    return out


def _bgpo_truth(lp, old, trajs, copies, rows, lo=0.2, hi=0.2):
    """BGPO's loss (Lin et al. 2025, sec. 3.2; DARE compute_policy_loss_bgpo): per copy
    x = l - l_old, r = 1 + x for A > 0 (tangent lower bound of exp), exp(x) for A <= 0;
    -min(r A, clip(r) A), at most -c A for A < 0; mean over copies, then over sequences."""
    new, ref = _elbo_samples(lp, trajs, copies, rows), _elbo_samples(old, trajs, copies, rows)
    total = 0.0
    for s, A in enumerate(ADV_B):
        terms = []
        for l_new, l_old in zip(new[s], ref[s], strict=True):
            x = l_new - l_old
            r = 1 + x if A > 0 else torch.exp(x)
            pg = torch.maximum(-A * r, -A * torch.clamp(r, 1 - lo, 1 + hi))
            if A < 0:
                pg = torch.minimum(pg, torch.tensor(-C_DUAL * A))
            terms.append(pg)
        total = total + sum(terms) / len(terms)
    return total / len(ADV_B)


def _bgpo_ours(rows, logp, old, n_seqs):
    obj = Objective.from_config(BGPOConfig())
    lp = logp.clone().requires_grad_()
    loss, stats = policy_value_loss(
        lp, old, torch.tensor(ADV_B)[rows.traj], torch.ones_like(lp, dtype=torch.bool),
        objective=obj, seq_ids=rows.traj, num_seqs=n_seqs, copy_ids=rows.step)
    loss.backward()
    return loss.detach(), lp.grad, stats


@pytest.mark.parametrize("kind", ["block", "full"])
def test_bgpo_loss_and_gradient_equal_the_papers_bound(kind):
    trajs, copies, rows, logp, old = _bgpo_fixed(kind)
    loss, grad, stats = _bgpo_ours(rows, logp, old, len(trajs))
    ref = logp.clone().requires_grad_()
    want = _bgpo_truth(ref, old, trajs, copies, rows)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref.grad, atol=1e-6, rtol=1e-5)
    assert 0 < stats["clip_frac"] < 1 and stats["dual_clip_frac"] > 0  # both clips exercised


@pytest.mark.parametrize("kind", ["block", "full"])
def test_bgpo_on_policy_equals_the_elbo_objective_in_value_and_gradient(kind):
    # the paper's equivalence (sec. 3.2): at l = l_old, the bound and the ELBO-based objective
    # -A exp(mean_m l_m - mean_m l_old_m) agree in value (-A) and gradient
    trajs, copies, rows, logp, old = _bgpo_fixed(kind, on_policy=True)
    loss, grad, _ = _bgpo_ours(rows, logp, old, len(trajs))
    ref = logp.clone().requires_grad_()
    new, base = (_elbo_samples(ref, trajs, copies, rows),
                 _elbo_samples(old, trajs, copies, rows))
    want = sum(-A * torch.exp(sum(new[s]) / len(new[s]) - sum(base[s]) / len(base[s]))
               for s, A in enumerate(ADV_B)) / len(ADV_B)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_bgpo_preset_is_the_papers():
    c = BGPOConfig().validate()
    assert PRESETS["bgpo"] is BGPOConfig
    assert (c.estimator, c.num_masks, c.ratio_level, c.ratio_form, c.dual_clip, c.lr) == (
        "stratified", 16, "copy", "tangent", 3.0, 5e-7)
    est = from_config(c)
    assert isinstance(est, Stratified) and est.num_masks == 16


@pytest.mark.parametrize("family, over", [
    ("sdar", {"num_masks": 4}),
    ("llada", {"num_masks": 4, "gen_block_length": 4}),
])
def test_bgpo_trains_through_the_update(tmp_path, family, over):
    def alternate(prompts, completions, **_):
        return [float(i % 2) for i in range(len(completions))]

    tr = RLTrainer(_model(family), TOK, DATA, alternate,
                   _cfg(tmp_path, BGPOConfig, lr=1e-3, **over))
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


@pytest.mark.parametrize("over, keys", [
    ({"ratio_form": "tangent", "ratio_level": "none", "dual_clip": 0.0},
     ("ratio_form=tangent", "ratio_level=none")),
    ({"ratio_level": "copy", "token_weights": "elbo", "estimator": "stratified"},
     ("ratio_level=copy", "token_weights=elbo")),
    ({"ratio_level": "copy", "estimator": "trace", "num_masks": 1},  # (trace reads no num_masks)
     ("ratio_level=copy", "estimator=trace")),
    ({"ratio_form": "linear"}, ("ratio_form must be one of",)),
])
def test_bad_bgpo_settings_are_refused_at_config_time(over, keys):
    for make in (lambda: RLConfig(**over).validate(),
                 lambda: build_config(BGPOConfig, {}, [f"{k}={v}" for k, v in over.items()])):
        with pytest.raises(ValueError) as e:
            make()
        assert all(k in str(e.value) for k in keys), str(e.value)


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_bgpo_split_copies_is_the_same_step_one_copy_per_forward(tmp_path, family):
    # BGPO's memory claim: the loss is a mean of per-copy terms, so a forward per noisy copy
    # (micro_batch_tokens small, split_copies) gives the unsplit step's loss and update
    def alternate(prompts, completions, **_):
        return [float(i % 2) for i in range(len(completions))]

    out = []
    for split, budget in ((False, 0), (True, 1)):
        extra = {"gen_block_length": 4} if family == "llada" else {}
        cfg = _cfg(tmp_path / f"{split}", BGPOConfig, lr=1e-3, num_masks=3,
                   split_copies=split, micro_batch_tokens=budget, **extra)
        tr = RLTrainer(_model(family), TOK, DATA, alternate, cfg)
        log = tr.train_step()
        out.append((log, [p.detach().clone() for p in tr.model.parameters()]))
    (whole, p_whole), (split, p_split) = out
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5, abs=1e-7)
    assert split["train_tokens"] == whole["train_tokens"]
    if family == "sdar":  # each copy's rows carry their own clean stream: the split happened
        assert split["row_tokens"] > whole["row_tokens"]
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    # Adam's first step moves each weight by ~lr * sign(grad) = 1e-3: a wrong gradient would
    # show far above this tolerance (near-zero gradients round differently when summed per copy)
    for a, b in zip(p_whole, p_split, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_split_copies_needs_a_copy_ratio_and_seq_mean():
    with pytest.raises(ValueError, match=r"split_copies .*ratio_level=elbo, reduction=seq_mean"):
        build_config(BGPOConfig, {}, ["ratio_level=elbo", "token_weights=elbo"])
