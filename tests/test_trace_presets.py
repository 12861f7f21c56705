"""The presets that replay the sampler's own trajectory (issue #28): CJ-GRPO and JustGRPO.

Each preset's loss and gradient through the real trainer path (rollout -> trace rows -> update)
equal a plain-torch implementation of its paper's formula written here: the tiny model is run on
the very state the sampler saw at each step, rebuilt from the trajectory's record (step map,
after-EOS steps), never from dlmkern's rows or loss code. Block ("sdar") and full-attention
("llada") models. Plus: JustGRPO's rows give the exact autoregressive-order likelihood; one
trainer step of each preset trains; settings that break a preset are refused at config time."""

import math

import pytest
import torch
import torch.nn.functional as F
from dlmkern.ops import layouts
from dlmkern.sampling import SamplingConfig
from dlmkern.trainers import PRESETS, CJGRPOConfig, JustGRPOConfig, RLTrainer, build_config
from dlmkern.trainers.plan import plan_step
from dlmkern.trainers.update import selected_logp

from .test_rl_stages import DATA, TOK, _model


def alternate(prompts, completions, **_):  # a reward spread in every group
    return [float(i % 2) for i in range(len(completions))]


def _config(tmp_path, preset, family, **over):
    """A small run: 2 prompts x 4 completions of at most 8 tokens; full-attention models decode
    in blocks of 4 (two semi-autoregressive blocks). `over`: preset keys and `sampling`."""
    sampling = over.pop("sampling", {})
    base = dict(prompts_per_step=2, group_size=4, max_new_tokens=8, total_steps=1,
                output_dir=str(tmp_path), progress_bar=False, lr=1e-3, max_grad_norm=1e9,
                gen_block_length=4)
    default = preset().sampling
    return preset(**{**base, **over},
                  sampling=SamplingConfig(**{**vars(default), "temperature": 0.9, **sampling}))


# ---- the sampler's states, rebuilt from the trajectory's record --------------------------------


def _state(traj, k, block_size, mask):
    """Token ids the sampler's forward saw at global step k, and where the response starts:
    prompt, then every generated / after-EOS position decoded before step k, [MASK] elsewhere.
    Block models: cut after the block holding the tokens of step k (later blocks did not exist
    yet)."""
    P = len(traj.prompt_ids)
    gen = list(traj.token_ids) + list(traj.after_eos_ids)
    steps = list(traj.step_map) + list(traj.after_eos_steps)
    ids = list(traj.prompt_ids) + [t if s < k else mask for t, s in zip(gen, steps, strict=True)]
    if block_size is not None:
        j = traj.step_map.index(k)
        ids = ids[:((P + j) // block_size + 1) * block_size]
    return ids


def _logp_at(model, ids, positions, targets, block_size, temperature):
    """log softmax(logits / temperature)[target] of the plain model on one sequence."""
    x = torch.tensor(ids)
    lay = layouts.full([len(ids)]) if block_size is None else layouts.block_causal(
        [len(ids)], block_size)
    logits = model.logits(model(x, lay)[torch.tensor(positions)]).float() / temperature
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None]).squeeze(-1)


def _per_step_logp(model, traj, cfg):
    """{global step k: (generated indices j decoded at k, their log-probs given state k)}."""
    c = model.config
    B = c.block_size if c.block_causal else None
    P, out = len(traj.prompt_ids), {}
    for k in sorted(set(traj.step_map)):
        js = [j for j, s in enumerate(traj.step_map) if s == k]
        ids = _state(traj, k, B, c.mask_token_id)
        out[k] = (js, _logp_at(model, ids, [P + j for j in js],
                               [traj.token_ids[j] for j in js], B, cfg.sampling.temperature))
    return out


def _grpo_advantages(rewards, group_size):
    """GRPO: (r - group mean) / (unbiased group std + 1e-6), 0 where a group's rewards are equal."""
    r = rewards.view(-1, group_size)
    std = r.std(-1, keepdim=True)
    return torch.where(std > 0, (r - r.mean(-1, keepdim=True)) / (std + 1e-6), 0 * r).view(-1)


def _delta(i, j):
    """A fixed offset of trajectory i's token j's old log-prob: ratios on both sides of the clip."""
    return 0.35 * math.sin(1.7 + 2.3 * i + 1.1 * j)


def _clipped(lp, old, a, eps=0.2):
    r = torch.exp(lp - old)
    return -torch.minimum(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)


# ---- the papers' losses ------------------------------------------------------------------------


def cj_grpo_loss(model, trajs, adv, cfg):
    """CJ-GRPO, Eq. 11 (DARE tests/test_cj_grpo_paper_exact.py `paper_exact_cj_loss`): per
    completion, the mean over its transitions (denoising steps) of the token mean of the clipped
    surrogate, each token scored given the state it was unmasked from; then the mean over
    completions."""
    per_sample = []
    for i, t in enumerate(trajs):
        steps = _per_step_logp(model, t, cfg)
        means = [_clipped(lp, lp.detach() + torch.tensor([_delta(i, j) for j in js]),
                          adv[i]).mean() for js, lp in steps.values()]
        per_sample.append(torch.stack(means).mean())
    return torch.stack(per_sample).mean()


def justgrpo_loss(model, trajs, adv, cfg):
    """JustGRPO (the authors' grpo.py `logprob_loss`, DARE llada_dp_actor_justgrpo.py): token t
    scored given prompt + tokens before t + [MASK] after (exact autoregressive order), the
    clipped surrogate, token mean over the batch (DARE's loss_agg_mode token-mean)."""
    terms = []
    for i, t in enumerate(trajs):
        for j, lp in enumerate(_ar_logp(model, t, cfg)):
            terms.append(_clipped(lp, lp.detach() + _delta(i, j), adv[i]))
    return torch.stack(terms).mean()


def _ar_logp(model, traj, cfg):
    """log p(x_j | prompt, x_<j, [MASK] up to the end of x_j's block (block models) or of the
    canvas (full attention)), token by token: the autoregressive-order likelihood."""
    c, P = model.config, len(traj.prompt_ids)
    B = c.block_size if c.block_causal else None
    end = P + cfg.max_new_tokens
    out = []
    for j, tok in enumerate(traj.token_ids):
        stop = end if B is None else min(((P + j) // B + 1) * B, end)
        ids = list(traj.prompt_ids) + list(traj.token_ids[:j]) + [c.mask_token_id] * (
            stop - P - j)
        out.append(_logp_at(model, ids, [P + j], [tok], B, cfg.sampling.temperature)[0])
    return out


# ---- ours: the trainer's own step, its gradient read before the optimizer moves -----------------


def _grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def _compare(tmp_path, preset, family, truth, **over):
    tr = RLTrainer(_model(family), TOK, DATA, alternate, _config(tmp_path, preset, family,
                                                                  **over))
    batch = tr.rollout(DATA[:2])
    assert len(set(batch.rewards.tolist())) > 1
    assert any(t.after_eos_ids for t in batch.trajs)  # the after-EOS context is replayed too
    rows = tr.rows(batch.trajs)
    (mb,) = plan_step(list(range(len(rows))), len(rows), rows, tr.cfg.reduction, 1, 0)
    prep = tr.updater.prepare(mb, rows, batch.trajs, batch.advantages, batch.rewards, True)
    r = prep[0].rows
    prep[0].old_logp = prep[0].old_logp + torch.tensor(
        [_delta(i, j) for i, j in zip(r.traj.tolist(), r.gen_index.tolist(), strict=True)])
    # the paper's formula on the same model, before the trainer's step
    adv = _grpo_advantages(batch.rewards, tr.cfg.group_size)
    tr.model.zero_grad(set_to_none=True)
    want_loss = truth(tr.model, batch.trajs, adv, tr.cfg)
    want_loss.backward()
    want = _grads(tr.model)
    tr.model.zero_grad(set_to_none=True)
    got, step = [], tr.opt.step
    tr.opt.step = lambda: got.extend(_grads(tr.model)) or step()
    stats = tr.updater.step(mb, prep)
    assert stats["clip_frac"] > 0  # the offsets put ratios outside the clip
    assert stats["loss"] == pytest.approx(want_loss.item(), rel=1e-4, abs=1e-6)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    return batch


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_cj_grpo_is_eq11_over_the_samplers_own_states(tmp_path, family):
    # static rule, 3 steps per block of 4 (2, 1, 1 tokens): transitions of unequal sizes, so
    # Eq. 11's mean of per-transition means differs from a completion's token mean
    batch = _compare(tmp_path, CJGRPOConfig, family, cj_grpo_loss,
                     sampling={"rule": "static", "steps": 3})
    sizes = {tuple(sorted(t.step_map.count(k) for k in set(t.step_map))) for t in batch.trajs}
    assert any(len(set(s)) > 1 for s in sizes)


@pytest.mark.parametrize("family, steps", [("sdar", 4), ("llada", 4)])
def test_justgrpo_is_grpo_on_the_autoregressive_likelihood(tmp_path, family, steps):
    _compare(tmp_path, JustGRPOConfig, family, justgrpo_loss, sampling={"steps": steps})


@pytest.mark.parametrize("family, over", [
    ("sdar", {"sampling": {"steps": 4}}),
    ("llada", {"sampling": {"steps": 4}}),                              # blocks of 4, 2 blocks
    ("llada", {"gen_block_length": 32, "sampling": {"steps_total": 8}}),  # one block of 8
])
def test_justgrpo_rows_give_the_exact_autoregressive_likelihood(tmp_path, family, over):
    tr = RLTrainer(_model(family), TOK, DATA, alternate, _config(tmp_path, JustGRPOConfig,
                                                                  family, **over))
    batch = tr.rollout(DATA[:2])
    trajs = batch.trajs
    assert all(len(set(t.step_map)) == len(t.step_map) for t in trajs)  # one token per step
    rows = tr.rows(trajs)
    with torch.no_grad():
        for t, r in zip(trajs, rows, strict=True):
            ours = selected_logp(tr.model, r, "cpu", temperature=tr.cfg.sampling.temperature)
            want = torch.stack(_ar_logp(tr.model, t, tr.cfg))
            # every generated token trained once (rows hold copies, not positions, in order)
            assert sorted(r.gen_index.tolist()) == list(range(len(t.token_ids)))
            ours = torch.zeros_like(ours).index_copy(0, r.gen_index, ours)
            torch.testing.assert_close(ours.sum(), want.sum(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
            # and the sampler drew each token from that same distribution
            torch.testing.assert_close(torch.tensor(t.logprobs), want, atol=1e-4, rtol=1e-4)


# ---- a trainer step, the registry, refusals -----------------------------------------------------


@pytest.mark.parametrize("preset", [CJGRPOConfig, JustGRPOConfig])
@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_one_trainer_step_of_each_preset_trains(tmp_path, preset, family):
    tr = RLTrainer(_model(family), TOK, DATA, alternate, _config(
        tmp_path, preset, family, sampling={"steps": 4} if preset is JustGRPOConfig else {}))
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


def test_the_presets_are_registered_with_their_defaults():
    assert PRESETS["cj_grpo"] is CJGRPOConfig and PRESETS["justgrpo"] is JustGRPOConfig
    cj = CJGRPOConfig().validate()
    assert (cj.estimator, cj.shrinkage, cj.ratio_level, cj.token_weights, cj.reduction,
            cj.eps_low, cj.eps_high, cj.dual_clip, cj.kl_coef) == (
        "trace", 1, "token", "transition", "seq_mean", 0.2, 0.2, 0.0, 0.0)
    j = JustGRPOConfig().validate()
    assert (j.estimator, j.shrinkage, j.sampling.rule, j.sampling.steps, j.gen_block_length,
            j.reduction, j.ratio_level) == ("trace", 1, "sequential", 32, 32, "token_mean",
                                            "token")


@pytest.mark.parametrize("preset, over, keys", [
    (CJGRPOConfig, ["shrinkage=8"], ("shrinkage=8", "estimator=trace")),
    (CJGRPOConfig, ["shrinkage=0"], ("shrinkage=0", "estimator=trace")),
    (CJGRPOConfig, ["estimator=coupled"], ("estimator=coupled", "cj_grpo")),
    (JustGRPOConfig, ["shrinkage=2"], ("shrinkage=2", "estimator=trace")),
    (JustGRPOConfig, ["sampling.rule=static"], ("sampling.rule=static", "sampling.steps")),
    (JustGRPOConfig, ["sampling.schedule=dream"], ("sampling.schedule=dream",
                                                   "sampling.rule=sequential")),
])
def test_settings_that_break_the_replay_are_refused_at_config_time(preset, over, keys):
    with pytest.raises(ValueError) as e:
        build_config(preset, {}, over)
    assert all(k in str(e.value) for k in keys), str(e.value)


@pytest.mark.parametrize("family, over, keys", [
    ("sdar", {"sampling": {"steps": 2}}, ("sampling.steps=2", "block_size=4")),
    ("sdar", {"sampling": {"steps": 8}}, ("sampling.steps=8", "block_size=4")),
    ("llada", {"sampling": {"steps": 2}}, ("sampling.steps=2", "gen_block_length")),
    ("llada", {"gen_block_length": 8, "sampling": {"steps_total": 4}},
     ("sampling.steps_total=4", "gen_block_length")),
])
def test_justgrpo_refuses_more_than_one_token_per_step_for_the_model(tmp_path, family, over,
                                                                    keys):
    with pytest.raises(ValueError) as e:
        RLTrainer(_model(family), TOK, DATA, alternate, _config(tmp_path, JustGRPOConfig,
                                                                 family, **over))
    assert all(k in str(e.value) for k in keys), str(e.value)


def test_transition_weights_make_each_step_one_in_its_trajectorys_mean():
    from dlmkern.ops.objective import token_weights

    # trajectory 0: 6 tokens in steps of 2 and 4; trajectory 1: 4 tokens in steps of 1 and 3
    traj = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    step = torch.tensor([3, 3, 5, 5, 5, 5, 0, 2, 2, 2])
    w = token_weights("transition", traj, step, torch.tensor([6, 4]))
    torch.testing.assert_close(w, torch.tensor([1.5] * 2 + [0.75] * 4 + [2.0] + [2 / 3] * 3))
    # a trajectory's weighted token mean = the mean over its steps of each step's token mean
    x = torch.arange(10.0)
    assert (w[:6] * x[:6]).mean().item() == pytest.approx((x[:2].mean() + x[2:6].mean()) / 2)


def test_compare_runs_justgrpo_only_when_named():
    # its one-token-per-step decoding cannot share the others' rollout budget (compare refuses
    # presets whose sampling differs), so the default list leaves it out
    from dlmkern.compare import default_algos, parse_algos

    assert "cj_grpo" in default_algos() and "justgrpo" not in default_algos()
    assert parse_algos("justgrpo") == ["justgrpo"]
