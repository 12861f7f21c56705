"""The five original presets against their papers' formulas (issue #28): TraceRL (with and without
its value model), DiPO, random masking, coupled-GRPO (DiffuCoder) and diffu-GRPO (d1).

Each runs the real trainer path (rollout and group filter -> rows -> update) on tiny block
("sdar") and full-attention ("llada") models; the test rebuilds every state the model must see
from the trajectory's own record (trace rounds, SPEC 4.1) or from the estimator's seeded draws
(the baselines: the same generator seed as the trainer, the paper's draw written here), runs the
plain model on it and computes log-probs, ratios, advantages (group z-scores, or GAE over trace
steps, SPEC 4.3), clipping, KL, the value loss and the reduction itself. Loss and every parameter
gradient (policy and value model) are compared just before the optimizer step; old log-probs
(and old values) are offset so that the clips are active."""

import math

import pytest
import torch
from dlmkern.ops import layouts
from dlmkern.trainers import (
    PRESETS,
    CoupledGRPOConfig,
    DiffuGRPOConfig,
    DiPOConfig,
    RandomMaskConfig,
    RLTrainer,
    TraceRLConfig,
)
from dlmkern.trainers.plan import plan_step
from dlmkern.trainers.rollout import collect

from .test_rl_stages import DATA, TOK, _model
from .test_trace_presets import _config, _delta, _grads, _grpo_advantages, _logp_at, _state

G = 4  # group_size of _config


def alternate(prompts, completions, **_):
    return [float(i % 2) for i in range(len(completions))]


def first_group_passes():
    """A reward whose first rollout's first group all pass (pass rate 1: dropped by TraceRL's
    [0.2, 0.8] filter and by DAPO's dynamic sampling); every other group alternates 0 / 1."""
    calls = []

    def reward(prompts, completions, **_):
        calls.append(1)
        return [1.0 if len(calls) == 1 and i < G else float(i % 2)
                for i in range(len(completions))]
    return reward


def _vdelta(i, j):
    """A fixed offset of the old value of trajectory i's token j: the value clip (0.2) active."""
    return 0.3 * math.sin(0.4 + 1.3 * i + 2.9 * j)


# ---- the states the model must see ---------------------------------------------------------------


def _block_size(model):
    c = model.config
    return c.block_size if c.block_causal else None


def _trace_items(trajs, B, s, mask):
    """SPEC 4.1: per block (full attention: the whole response) its distinct decode steps, sorted
    and cut into runs of s; each run trains its tokens given what the sampler saw at the run's
    first step. Items (trajectory, shrunk step = the run's last, trained indices, token ids)."""
    items = []
    for i, t in enumerate(trajs):
        P, groups = len(t.prompt_ids), {}
        for j in range(len(t.token_ids)):
            groups.setdefault(0 if B is None else (P + j) // B, []).append(j)
        for js in groups.values():
            steps = sorted({t.step_map[j] for j in js})
            for c in range(0, len(steps), s):
                run = steps[c:c + s]
                items.append((i, run[-1], [j for j in js if t.step_map[j] in run],
                              _state(t, run[0], B, mask)))
    return items


def _uniform_mask(n, gen):
    """Random masking: t ~ U(1e-3, 1), each token masked with probability t."""
    t = 1e-3 + (1 - 1e-3) * float(torch.rand((), generator=gen))
    return (torch.rand(n, generator=gen) < t).tolist()


def _baseline_items(trajs, B, kind, mask, seed=0):
    """The baselines' noisy copies, drawn as the trainer draws them (a generator seeded by the
    run seed, the step (0) and the completion's place): random_mask one copy; coupled the mask
    and its complement; diffu_grpo the whole completion masked and the prompt at 15 %. A block
    model's block b of a copy is scored given the clean blocks before it (block diffusion)."""
    items = []
    for i, t in enumerate(trajs):
        gen = torch.Generator().manual_seed(seed * 31 * 1000003 + i + 1)
        P, n = len(t.prompt_ids), len(t.token_ids)
        prompt = [False] * P
        if kind == "random_mask":
            masks = [_uniform_mask(n, gen)]
        elif kind == "coupled":
            m = _uniform_mask(n, gen)
            masks = [m, [not x for x in m]]
        else:
            prompt = (torch.rand(P, generator=gen) < 0.15).tolist()
            masks = [[True] * n]
        ctx = [mask if pm else x for pm, x in zip(prompt, t.prompt_ids, strict=True)]
        for c, m in enumerate(masks):
            noisy = ctx + [mask if mj else x for mj, x in zip(m, t.token_ids, strict=True)]
            if B is None:  # a copy that masks nothing trains nothing
                items += [(i, c, [j for j in range(n) if m[j]], noisy)] if any(m) else []
                continue
            for b in sorted({(P + j) // B for j in range(n) if m[j]}):
                ids = ctx + [x if (P + j) // B < b else noisy[P + j]
                             for j, x in enumerate(t.token_ids)]
                items.append((i, c, [j for j in range(n) if m[j] and (P + j) // B == b],
                              ids[:(b + 1) * B]))
    return items


def _scored(model, trajs, items, temperature):
    """log pi(x_j | item's ids) at each item's trained tokens (softmax of logits / temperature)."""
    B = _block_size(model)
    return [_logp_at(model, ids, [len(trajs[i].prompt_ids) + j for j in js],
                     [trajs[i].token_ids[j] for j in js], B, temperature)
            for i, _, js, ids in items]


def _values(vm, trajs, items):
    """V_j read at token j's noisy position in its round."""
    B = _block_size(vm.trunk)
    out = []
    for i, _, js, ids in items:
        lay = layouts.full([len(ids)]) if B is None else layouts.block_causal([len(ids)], B)
        out.append(vm(torch.tensor(ids), lay)[torch.tensor(
            [len(trajs[i].prompt_ids) + j for j in js])])
    return out


# ---- the papers' losses ------------------------------------------------------------------------


def _surrogate(lps, items, adv, eps_low, eps_high, ref=None, beta=0.0):
    """Token mean over every trained token of -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    (+ beta k3(ref || pi), k3 = exp(ref - logp) - (ref - logp) - 1), r = pi / pi_old."""
    terms = []
    for k, (lp, (i, _, js, _)) in enumerate(zip(lps, items, strict=True)):
        old = lp.detach() + torch.tensor([_delta(i, j) for j in js])
        a = adv[k]
        r = torch.exp(lp - old)
        t = -torch.minimum(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
        if ref is not None:
            x = ref[k] - lp
            t = t + beta * (torch.exp(x) - x - 1)
        terms.append(t)
    return torch.cat(terms).mean()


def _group_adv(adv, items):
    return [adv[i].expand(len(js)) for i, _, js, _ in items]


def tracerl(tr, kept, s):
    """TraceRL without a value model: trace rounds (shrinkage s), group z-scores of the kept
    groups' rewards, clip 0.2, token mean."""
    B = _block_size(tr.model)
    items = _trace_items(kept.trajs, B, s, tr.model.config.mask_token_id)
    lps = _scored(tr.model, kept.trajs, items, tr.cfg.sampling.temperature)
    adv = _grpo_advantages(kept.rewards, G)
    return _surrogate(lps, items, _group_adv(adv, items), 0.2, 0.2), None


def _gae(items, values, rewards, g, lam):
    """SPEC 4.3 per trajectory over its trace steps k (by id): V*_k the mean of step k's V_j,
    the reward r*_k on the last step, R*_k = r*_k + g R*_{k+1}, delta*_k = r*_k - V*_k +
    g V*_{k+1}, A*_k = delta*_k + g l A*_{k+1}; per token A_j = r*_k - V_j + g V*_{k+1} +
    g l A*_{k+1} and return_j = r*_k + g R*_{k+1}."""
    adv, ret = [None] * len(items), [None] * len(items)
    for i in sorted({it[0] for it in items}):
        mine = sorted((it[1], k) for k, it in enumerate(items) if it[0] == i)
        steps = sorted({st for st, _ in mine})
        Vs = {st: torch.cat([values[k] for s2, k in mine if s2 == st]).mean() for st in steps}
        nxt = {"V": 0.0, "A": 0.0, "R": 0.0}
        for st in reversed(steps):
            r = float(rewards[i]) if st == steps[-1] else 0.0
            for s2, k in mine:
                if s2 == st:
                    adv[k] = r - values[k] + g * nxt["V"] + g * lam * nxt["A"]
                    ret[k] = torch.full_like(values[k], r + g * nxt["R"])
            nxt = {"A": r - Vs[st] + g * nxt["V"] + g * lam * nxt["A"], "V": Vs[st],
                   "R": r + g * nxt["R"]}
    return adv, ret


def tracerl_valued(tr, kept, s, g, lam):
    """TraceRL with its value model: GAE advantages over trace steps from the rollout-time
    values, the clipped surrogate (0.2), and the clipped value loss token mean of
    0.5 max((V - R)^2, (V_old + clip(V - V_old, +-0.2) - R)^2)."""
    B, vm = _block_size(tr.model), tr.value_model
    items = _trace_items(kept.trajs, B, s, tr.model.config.mask_token_id)
    lps = _scored(tr.model, kept.trajs, items, tr.cfg.sampling.temperature)
    with torch.no_grad():
        rollout_v = _values(vm, kept.trajs, items)
    adv, ret = _gae(items, rollout_v, kept.rewards, g, lam)
    loss = _surrogate(lps, items, adv, 0.2, 0.2)
    vl = []
    for v, v0, R, (i, _, js, _) in zip(_values(vm, kept.trajs, items), rollout_v, ret, items,
                                       strict=True):
        old = v0 + torch.tensor([_vdelta(i, j) for j in js])
        clipped = old + torch.clamp(v - old, -0.2, 0.2)
        vl.append(0.5 * torch.maximum((v - R) ** 2, (clipped - R) ** 2))
    return loss, torch.cat(vl).mean()


def dipo(tr, kept, s, beta):
    """DiPO: trace rounds, group z-scores, clip-higher [0.8, 1.28], beta k3 KL to the frozen
    reference policy, token mean."""
    B = _block_size(tr.model)
    items = _trace_items(kept.trajs, B, s, tr.model.config.mask_token_id)
    temp = tr.cfg.sampling.temperature
    lps = _scored(tr.model, kept.trajs, items, temp)
    with torch.no_grad():
        ref = _scored(tr.ref_model, kept.trajs, items, temp)
    adv = _grpo_advantages(kept.rewards, G)
    return _surrogate(lps, items, _group_adv(adv, items), 0.2, 0.28, ref, beta), None


def baseline(kind):
    def loss(tr, kept):
        """GRPO's clipped surrogate (0.2) with group z-scores, token mean over the copies'
        trained tokens, no KL (DARE's d1 / coupled-GRPO recipes: loss_agg_mode token-mean,
        kl_loss_coef 0). Not DiffuCoder's own estimate (its code adds a fully masked copy and
        weights the pair 1/t, 1/(1-t), t ~ U(0.2, 0.8)): the preset's SPEC 4.5 one is tested."""
        items = _baseline_items(kept.trajs, _block_size(tr.model), kind,
                                tr.model.config.mask_token_id)
        lps = _scored(tr.model, kept.trajs, items, tr.cfg.sampling.temperature)
        adv = _grpo_advantages(kept.rewards, G)
        return _surrogate(lps, items, _group_adv(adv, items), 0.2, 0.2), None
    return loss


# ---- ours: the trainer's own step, its gradients read before the optimizers move ---------------


def _run(tmp_path, preset, family, truth, reward=alternate, setup=None, **over):
    tr = RLTrainer(_model(family), TOK, DATA, reward, _config(tmp_path, preset, family, **over))
    if setup is not None:
        setup(tr)
    kept, sampled, _, _ = collect(tr.cfg, tr._next_rows, tr.rollout)
    positions, n_global = kept.positions()
    rows = tr.rows(kept.trajs, positions)
    (mb,) = plan_step(positions, n_global, rows, tr.cfg.reduction, 1, 0)
    (prep,) = tr.updater.prepare(mb, rows, kept.trajs, kept.advantages, kept.rewards,
                                 tr.estimator.trace_steps)
    r, order = prep.rows, prep.plan.traj
    tok = [(order[k], j) for k, j in zip(r.traj.tolist(), r.gen_index.tolist(), strict=True)]
    prep.old_logp = prep.old_logp + torch.tensor([_delta(i, j) for i, j in tok])
    if prep.old_v is not None:
        prep.old_v = prep.old_v + torch.tensor([_vdelta(i, j) for i, j in tok])
    vm = tr.value_model
    # the paper's formula on the same models, before the trainer's step
    tr.model.zero_grad(set_to_none=True)
    want_loss, want_vloss = truth(tr, kept)
    (want_loss + (0 if want_vloss is None else want_vloss)).backward()
    want = _grads(tr.model) + ([] if vm is None else _grads(vm))
    tr.model.zero_grad(set_to_none=True)
    if vm is not None:
        vm.zero_grad(set_to_none=True)
    got, got_v, step = [], [], tr.opt.step
    tr.opt.step = lambda: got.extend(_grads(tr.model)) or step()
    if vm is not None:
        vstep = tr.value_opt.step
        tr.value_opt.step = lambda: got_v.extend(_grads(vm)) or vstep()
    stats = tr.updater.step(mb, [prep])
    assert stats["clip_frac"] > 0  # the offsets put ratios outside the clip
    assert stats["loss"] == pytest.approx(want_loss.item(), rel=1e-4, abs=1e-6)
    if vm is not None:
        assert stats["vf_clip_frac"] > 0
        assert stats["value_loss"] == pytest.approx(want_vloss.item(), rel=1e-4, abs=1e-6)
    assert len(got + got_v) == len(want)
    for g, w in zip(got + got_v, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    return tr, kept, sampled, stats


def _kept_groups(sampled, keep):
    """Trajectories of the groups whose rewards `keep` accepts (by identity)."""
    r = sampled.rewards.view(-1, G)
    return [id(t) for g in range(r.shape[0]) if keep(r[g])
            for t in sampled.trajs[g * G:(g + 1) * G]]


# ---- the tests -------------------------------------------------------------------------------


def _in_range(r):  # TraceRL's code: groups with pass rate in [0.2, 0.8]
    return 0.2 <= float(r.mean()) <= 0.8


def _spread(r):  # DAPO's dynamic sampling: groups whose rewards differ
    return bool((r != r[0]).any())


@pytest.mark.parametrize("family, s, over", [
    ("sdar", 1, {"sampling": {"steps": 3}}),       # the paper's s = 1 (block), rounds of 2, 1, 1
    ("llada", 8, {}),                              # the paper's s = 8 (full attention)
    ("llada", 3, {"shrinkage": 3, "sampling": {"steps": 3}}),
])
def test_tracerl_is_the_clipped_surrogate_over_shrunk_trace_rounds(tmp_path, family, s, over):
    _, kept, sampled, _ = _run(tmp_path, TraceRLConfig, family,
                               lambda tr, kept: tracerl(tr, kept, s),
                               reward=first_group_passes(), **over)
    # the pass-rate filter dropped the all-pass group and kept the other
    assert [id(t) for t in kept.trajs] == _kept_groups(sampled, _in_range)
    assert len(kept.trajs) == G and len(sampled.trajs) == 2 * G


def _value_head(tr):
    """A non-zero value head (from_policy starts at V = 0): values that differ per token."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w = tr.value_model.value_head.weight
        w.copy_(0.3 * torch.randn(w.shape, generator=g))
        tr.value_model.value_head.bias.fill_(0.2)


@pytest.mark.parametrize("family, s, over", [
    ("sdar", 1, {"sampling": {"steps": 3}}),
    ("llada", 3, {"shrinkage": 3, "sampling": {"steps": 3}}),
])
def test_tracerl_value_model_is_gae_over_trace_steps_and_the_clipped_value_loss(
        tmp_path, family, s, over):
    g, lam = 0.9, 0.8
    tr, kept, _, _ = _run(tmp_path, TraceRLConfig, family,
                          lambda tr, kept: tracerl_valued(tr, kept, s, g, lam), setup=_value_head,
                          use_value_model=True, gamma=g, lam=lam, pass_rate_low=0.0,
                          pass_rate_high=1.0, **over)
    # more than one trace step per trajectory: the recursion is exercised
    items = _trace_items(kept.trajs, _block_size(tr.model), s, tr.model.config.mask_token_id)
    assert any(sum(it[0] == i for it in items) > 1 for i in range(len(kept.trajs)))


def _perturbed_reference(tr):
    """The frozen reference moved away from the policy: the KL term and its gradient are not
    0 at the first step."""
    assert tr.ref_model is not None  # loaded because kl_coef > 0
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in tr.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family, s", [("sdar", 1), ("llada", 8)])
def test_dipo_is_clip_higher_plus_k3_kl_to_the_reference_with_dynamic_sampling(tmp_path, family,
                                                                               s):
    beta = 0.1
    _, kept, sampled, stats = _run(tmp_path, DiPOConfig, family,
                                   lambda tr, kept: dipo(tr, kept, s, beta),
                                   reward=first_group_passes(), setup=_perturbed_reference,
                                   kl_coef=beta)
    assert stats["kl"] > 0 and stats["clip_frac_high"] > 0 and stats["clip_frac_low"] > 0
    # dynamic sampling: the all-pass group dropped, one more prompt drawn to fill the step
    assert [id(t) for t in kept.trajs] == _kept_groups(sampled, _spread)
    assert len(kept.trajs) == 2 * G and len(sampled.trajs) == 3 * G


@pytest.mark.parametrize("preset, kind", [(RandomMaskConfig, "random_mask"),
                                          (CoupledGRPOConfig, "coupled"),
                                          (DiffuGRPOConfig, "diffu_grpo")])
@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_baselines_are_grpo_on_their_noisy_copies(tmp_path, preset, kind, family):
    tr, kept, _, _ = _run(tmp_path, preset, family, baseline(kind))
    items = _baseline_items(kept.trajs, _block_size(tr.model), kind,
                            tr.model.config.mask_token_id)
    trained = [sorted(j for i2, _, js, _ in items if i2 == i for j in js)
               for i in range(len(kept.trajs))]
    full = [list(range(len(t.token_ids))) for t in kept.trajs]
    if kind == "random_mask":  # some tokens left clean: one copy at rate t < 1
        assert trained != full
    else:  # every token trained exactly once (coupled: across the pair)
        assert trained == full


def test_the_presets_are_registered_with_their_papers_defaults():
    assert [PRESETS[k] for k in ("tracerl", "dipo", "random_mask", "coupled_grpo",
                                 "diffu_grpo")] == [TraceRLConfig, DiPOConfig, RandomMaskConfig,
                                                    CoupledGRPOConfig, DiffuGRPOConfig]
    t = TraceRLConfig().validate()
    assert (t.estimator, t.resolved_shrinkage(True), t.resolved_shrinkage(False),
            t.pass_rate_low, t.pass_rate_high, t.eps_low, t.eps_high, t.value_lr) == (
        "trace", 1, 8, 0.2, 0.8, 0.2, 0.2, 5e-6)
    d = DiPOConfig().validate()
    assert (d.estimator, d.eps_low, d.eps_high, d.kl_kind, d.kl_to, d.kl_coef,
            d.dynamic_sampling, d.reduction) == ("trace", 0.2, 0.28, "k3", "ref", 0.0, True,
                                                 "token_mean")
    assert [p().validate().estimator for p in (RandomMaskConfig, CoupledGRPOConfig,
                                               DiffuGRPOConfig)] == ["random_mask", "coupled",
                                                                     "diffu_grpo"]
