"""wd1 (issue #28; Tang et al. 2025, github.com/xiaohangt/wd1): the preset's loss and gradient on a
small fixed batch equal the paper's weighted likelihood written here in plain torch (group softmax
weights w+ - w-, each completion's d1 one-step log-likelihood from plain forwards of the model),
on a block (SDAR) and a full-attention (LLaDA) model; the rollout hands the weights to the update;
a trainer step trains; bad combinations are refused naming both keys."""

import math

import pytest
import torch
from dlmkern.ops import Objective, layouts, policy_value_loss
from dlmkern.rl import Rows, RowSpec, get_estimator, group_advantages
from dlmkern.sampling import Trajectory
from dlmkern.trainers import RLConfig, RLTrainer, WD1Config, build_config
from dlmkern.trainers.update import selected_logp

from .test_rl_stages import DATA, TOK, _cfg, _model

G = 4
# three groups of four: a spread, all equal (weight 0), partial credit
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.5, 0.0, 1.0])


def _trajectories(seed=0):
    """12 completions of 3 prompts (lengths 5, 3, 6), 3-7 generated tokens each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for P in (5, 3, 6):
        prompt = torch.randint(0, 19, (P,), generator=g).tolist()
        for _ in range(G):
            n = int(torch.randint(3, 8, (), generator=g))
            out.append(Trajectory(prompt, torch.randint(0, 19, (n,), generator=g).tolist(),
                                  [0] * n))
    return out


def _paper_weights(r, psi):
    """w+ - w-: softmax over the group of psi * A and of -psi * A, A = r - mean(r)."""
    a = r.view(-1, G) - r.view(-1, G).mean(-1, keepdim=True)
    wp = torch.exp(psi * a) / torch.exp(psi * a).sum(-1, keepdim=True)
    wm = torch.exp(-psi * a) / torch.exp(-psi * a).sum(-1, keepdim=True)
    return (wp - wm).view(-1)


def _prompt_masks(trajs, seed, ratio):
    """d1's prompt masks as the trainer draws them: one generator per trajectory."""
    return [torch.rand(len(t.prompt_ids), generator=torch.Generator().manual_seed(seed + i))
            < ratio for i, t in enumerate(trajs)]


def _loglik(model, t, pm, temperature):
    """d1's one-step log-likelihood of one completion, from plain forwards: the prompt with
    its masked tokens, the response all [MASK]. Full attention: one forward of [prompt |
    MASK * n]. Block models: one forward per response block b of [prompt | clean response
    before b | b all MASK] (block-causal), reading block b's positions."""
    c, M = model.config, TOK.mask_token_id
    P, n = len(t.prompt_ids), len(t.token_ids)
    clean = torch.tensor(t.prompt_ids + t.token_ids)
    clean[:P] = torch.where(pm, M, clean[:P])
    tgt = torch.tensor(t.token_ids)

    def logp(ids, lay, lo, hi):
        lsm = torch.log_softmax(model.logits(model(ids, lay)).float() / temperature, -1)
        return lsm[torch.arange(lo, hi), tgt[lo - P: hi - P]].sum()

    if not c.block_causal:
        ids = torch.cat([clean[:P], torch.full((n,), M)])
        return logp(ids, layouts.full([P + n]), P, P + n)
    B, total = c.block_size, 0.0
    for b in range(P // B, (P + n - 1) // B + 1):
        lo, hi = max(P, b * B), min((b + 1) * B, P + n)
        ids = torch.cat([clean[:lo], torch.full((hi - lo,), M)])
        total = total + logp(ids, layouts.block_causal([hi], B), lo, hi)
    return total


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["sdar", "llada"])
@pytest.mark.parametrize("psi", [1.0, 0.5])
def test_loss_and_gradient_are_the_papers_weighted_likelihood(family, psi):
    cfg = WD1Config(wd1_psi=psi).validate()
    model = _model(family)
    model.train()
    trajs, seed = _trajectories(), 1234
    c = model.config
    spec = RowSpec(c.mask_token_id, c.block_size if c.block_causal else None)
    est = get_estimator(cfg.estimator)
    # ours: the rollout's advantages, the estimator's rows, the objective's loss
    adv = group_advantages(REWARDS, G, cfg.advantage, cfg.wd1_psi)
    rows = Rows.cat([est.rows(t, spec, torch.Generator().manual_seed(seed + i))
                     for i, t in enumerate(trajs)])
    obj = Objective.from_config(cfg)
    lp = selected_logp(model, rows, "cpu", temperature=obj.temperature)
    ours, _ = policy_value_loss(lp, lp.detach(), adv[rows.traj],
                                torch.ones_like(lp, dtype=torch.bool), objective=obj,
                                seq_ids=rows.traj, num_seqs=len(trajs))
    g_ours = _grads(model, ours)
    # the paper: -(1 / groups) sum_i (w+_i - w-_i) log pi(o_i | q), summed over the step
    pms = _prompt_masks(trajs, seed, 0.15)
    assert any(bool(m.any()) for m in pms)  # the prompt masking is exercised
    ll = torch.stack([_loglik(model, t, m, cfg.sampling.temperature)
                      for t, m in zip(trajs, pms, strict=True)])
    truth = -(_paper_weights(REWARDS, psi) * ll).sum() / cfg.loss_normalizer
    g_truth = _grads(model, truth)
    torch.testing.assert_close(ours.detach(), truth.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(g_ours, g_truth, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().max()) > 0 for g in g_ours)


def test_weights_by_group():
    w = group_advantages(REWARDS, G, "wd1", 1.0)
    torch.testing.assert_close(w, _paper_weights(REWARDS, 1.0))
    assert torch.all(w[4:8] == 0)  # all-equal rewards: w+ = w-
    torch.testing.assert_close(w.view(-1, G).sum(-1), torch.zeros(3), atol=1e-6, rtol=0)
    # above the mean pushed up, below pushed down; the zscore kind is unchanged
    assert w[0] > 0 > w[1] and w[8] > 0 > w[10]
    a = REWARDS.view(-1, G)
    z = (a - a.mean(-1, keepdim=True)) / (a.std(-1, keepdim=True) + 1e-6)
    z[1] = 0
    torch.testing.assert_close(group_advantages(REWARDS, G), z.view(-1))


def _alternate(prompts, completions, **_):  # a reward spread in every group
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_a_trainer_step_trains_with_the_rollouts_wd1_weights(tmp_path, family):
    cfg = _cfg(tmp_path, WD1Config, group_size=4, steps_per_block=2, ppo_epochs=2,
               gen_block_length=4)
    tr = RLTrainer(_model(family), TOK, DATA, _alternate, cfg)
    batch = tr.rollout(DATA[:2])
    torch.testing.assert_close(batch.advantages, _paper_weights(batch.rewards, 1.0))
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert log["optimizer_steps"] == 2 and log["clip_frac"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


@pytest.mark.parametrize("over, keys", [
    ({"advantage": "wd1", "ratio_level": "token"}, ("advantage=wd1", "ratio_level=token")),
    ({"advantage": "wd1", "ratio_level": "none", "use_value_model": True, "estimator": "trace"},
     ("advantage=wd1", "use_value_model")),
    ({"advantage": "rloo"}, ("advantage must be one of zscore, wd1",)),
    ({"advantage": "wd1", "ratio_level": "none", "wd1_psi": 0.0}, ("wd1_psi must be > 0",)),
])
def test_bad_combinations_are_refused_naming_both_keys(over, keys):
    for make in (lambda: RLConfig(**over).validate(),
                 lambda: build_config(WD1Config, {}, [f"{k}={v}" for k, v in over.items()])):
        with pytest.raises(ValueError) as e:
            make()
        assert all(k in str(e.value) for k in keys), str(e.value)


def test_the_preset_is_the_papers():
    c = WD1Config().validate()
    assert (c.estimator, c.advantage, c.wd1_psi, c.ratio_level, c.kl_coef) == (
        "diffu_grpo", "wd1", 1.0, "none", 0.0)
    assert (c.group_size, c.max_new_tokens, c.gen_block_length, c.sampling.steps,
            c.sampling.temperature) == (6, 256, 32, 16, 0.9)
    assert (c.lr, c.weight_decay, c.max_grad_norm, c.ppo_epochs) == (3e-6, 0.1, 0.2, 12)
    assert (c.reduction, c.loss_normalizer) == ("sum", float(c.prompts_per_step))
