"""MDPO (He et al. 2025, "MDPO: Overcoming the Training-Inference Divide of Masked Diffusion
Language Models"; github.com/autonomousvision/mdpo and DARE's verl/trainer/ppo/mdpo_algos.py):
the full-attention sampler's per-step decoded completions (LLaDA and Dream) against a replay,
step-level rewards and advantages against a hand computation, the rows, the loss and gradient
against the paper's loss written here in plain torch, a trainer step, the memory planner, and
the refusals (block models included)."""

import math

import pytest
import torch
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import Objective, layouts, policy_value_loss
from dlmkern.ops.objective import token_weights
from dlmkern.rl import Rows, RowSpec, group_advantages
from dlmkern.rl.advantages import mdpo_step_advantages, top_steps
from dlmkern.rl.estimators import MDPOSteps
from dlmkern.sampling import FullSampler, SamplingConfig, Trajectory, full
from dlmkern.trainers import MDPOConfig, RLConfig, RLTrainer, build_config
from dlmkern.trainers.update import selected_logp

TOK = CharTokenizer()


def _llada(seed=0, family="llada"):
    """A tiny full-attention model: LLaDA, or Dream (row r predicts position r + 1)."""
    torch.manual_seed(seed)
    return DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id))


def _replay(model, prompt, traj, gen_length, k):
    """The completion decoded from step k's state, recomputed: the canvas with the tokens
    committed before step k, one forward, the argmax (never the mask) at every masked place."""
    mask = TOK.mask_token_id
    resp = [t if s < k else mask for t, s in zip(traj.token_ids, traj.step_map, strict=True)]
    resp += [mask] * (gen_length - len(resp))
    ids = torch.tensor(prompt + resp)
    lay = layouts.full([len(ids)])
    with torch.no_grad():
        h = model.prediction_hidden(model(ids, lay), lay.cu_seqlens)
        lg = model.logits(h[len(prompt):])
    lg[:, mask] = float("-inf")
    return torch.where(torch.tensor(resp) == mask, lg.argmax(-1), torch.tensor(resp)).tolist()


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("block_length", [8, 4])
def test_recorded_predictions_equal_a_step_by_step_replay(block_length, family, monkeypatch):
    monkeypatch.setattr(full, "_PREDICT_ROWS", 5)  # the projection in chunks, one cut mid-row
    m = _llada(family=family)
    prompts = [TOK.encode("1+2="), TOK.encode("33+4=")]
    cfg = SamplingConfig(rule="static", steps=2, temperature=0)
    s = FullSampler(m, cfg, gen_length=8, block_length=block_length, record_predictions=True)
    trajs = s.generate(prompts, n_samples=2, seed=3)
    plain = FullSampler(m, cfg, gen_length=8, block_length=block_length).generate(
        prompts, n_samples=2, seed=3)
    for t, p in zip(trajs, plain, strict=True):
        assert (t.token_ids, t.step_map) == (p.token_ids, p.step_map)  # recording changes nothing
        assert p.step_predictions is None                              # and is off by default
        assert t.prediction_steps == list(range(max(t.step_map) + 1))
        assert t.step_predictions.shape == (max(t.step_map) + 1, 8)
        for k, pred in enumerate(t.step_predictions.tolist()):
            assert pred == _replay(m, t.prompt_ids, t, 8, k)
        assert t.step_predictions[-1].tolist() == t.token_ids


def test_sampled_predictions_commit_what_the_step_commits():
    m = _llada(1)
    cfg = SamplingConfig(rule="static", steps=4, temperature=1.0)
    s = FullSampler(m, cfg, gen_length=8, block_length=4, record_predictions=True)
    for t in s.generate([TOK.encode("5+5=")], n_samples=3, seed=0):
        for k, pred in enumerate(t.step_predictions.tolist()):
            for j, st in enumerate(t.step_map):
                if st <= k:  # committed at or before step k: the recorded token is the final one
                    assert pred[j] == t.token_ids[j]


def test_recording_refuses_the_prefix_cache_and_guidance():
    m = _llada()
    with pytest.raises(ValueError, match="record_predictions needs use_cache=False"):
        FullSampler(m, gen_length=8, block_length=4, use_cache=True, record_predictions=True)
    with pytest.raises(ValueError, match="cfg_scale=0"):
        FullSampler(m, SamplingConfig(cfg_scale=1.0), gen_length=8, block_length=4,
                    record_predictions=True)


# ---- step-level advantages -------------------------------------------------------------------


def test_step_advantages_equal_a_hand_computation():
    # one group of 3 completions, rewards of the completions decoded at steps 0, 1, 2
    r = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    # score_k = (r_k - r_{k-1}) + 1 + mean(r_{k+1..2}), the last step + r_2 (r_{-1} = 0):
    #   [0, 1, 1]: k0 (0 + 1) + mean(1, 1) = 2,    k1 (1 + 1) + 1 = 3, k2 (0 + 1) + 1 = 2
    #   [0, 0, 1]: k0 (0 + 1) + mean(0, 1) = 1.5,  k1 (0 + 1) + 1 = 2, k2 (1 + 1) + 1 = 3
    #   [1, 1, 1]: k0 (1 + 1) + mean(1, 1) = 3,    k1 (0 + 1) + 1 = 2, k2 (0 + 1) + 1 = 2
    score = torch.tensor([[2.0, 3.0, 2.0], [1.5, 2.0, 3.0], [3.0, 2.0, 2.0]])
    # step 0: mean 13/6, unbiased std sqrt(((2 - 13/6)^2 + (1.5 - 13/6)^2 + (3 - 13/6)^2) / 2)
    mean0 = 13 / 6
    std0 = (((2 - mean0) ** 2 + (1.5 - mean0) ** 2 + (3 - mean0) ** 2) / 2) ** 0.5
    assert abs(std0 - 0.7637626) < 1e-6
    # steps 1 and 2: scores {3, 2, 2} and {2, 3, 2}: mean 7/3, std sqrt(1/3)
    s12 = (1 / 3) ** 0.5
    want = torch.tensor([[(2 - mean0) / std0, (3 - 7 / 3) / s12, (2 - 7 / 3) / s12],
                         [(1.5 - mean0) / std0, (2 - 7 / 3) / s12, (3 - 7 / 3) / s12],
                         [(3 - mean0) / std0, (2 - 7 / 3) / s12, (2 - 7 / 3) / s12]])
    adv = mdpo_step_advantages(r, 3, eps=0.0)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(mdpo_step_advantages(r, 3, eps=0.0, scale=False),
                               score - score.mean(0, keepdim=True))
    # two groups are normalised apart; a group of one keeps its scores (DARE: mean 0, std 1)
    both = mdpo_step_advantages(torch.cat([r, r + 5]), 3, eps=0.0)
    torch.testing.assert_close(both, torch.cat([want, want]))
    torch.testing.assert_close(mdpo_step_advantages(r, 1), score)
    # DARE's top-k: the steps of largest sum over the batch of |advantage|, ascending
    assert top_steps(torch.tensor([[0.1, -2.0, 0.5], [0.1, 1.0, -0.9]]), 2).tolist() == [1, 2]
    assert top_steps(adv, 0).tolist() == [0, 1, 2] == top_steps(adv, 5).tolist()
    with pytest.raises(ValueError, match="advantage=mdpo is step-level"):
        group_advantages(r[:, 0], 3, "mdpo")


# ---- rows and the loss -----------------------------------------------------------------------


def _trajectories(model, keep=(0, 2, 3)):
    cfg = SamplingConfig(rule="static", steps=2, temperature=0.6)
    s = FullSampler(model, cfg, gen_length=8, block_length=4, record_predictions=True)
    trajs = s.generate([TOK.encode("1+2="), TOK.encode("7*3=")], n_samples=2, seed=5)
    for t in trajs:  # the steps a top-k kept
        t.step_predictions, t.prediction_steps = t.step_predictions[list(keep)], list(keep)
    return trajs


def _state_logps(model, t, k, row, temperature):
    """Plain forward of step k's state: the log-probs of the step's predictions at its masked
    positions, and those positions."""
    P, n = len(t.prompt_ids), len(t.token_ids)
    masked = torch.tensor(t.step_map) >= k
    resp = torch.where(masked, TOK.mask_token_id, torch.tensor(t.token_ids))
    ids = torch.cat([torch.tensor(t.prompt_ids), resp])
    lay = layouts.full([len(ids)])
    logits = model.logits(model.prediction_hidden(model(ids, lay), lay.cu_seqlens))[P:]
    lp = torch.log_softmax(logits.float() / temperature, -1)
    target = t.step_predictions[row, :n].long()
    return lp.gather(1, target[:, None]).squeeze(1)[masked], masked.nonzero().squeeze(1)


def test_rows_hold_each_kept_step_state_and_train_its_predictions():
    t = _trajectories(_llada())[0]
    rows = MDPOSteps().rows(t, RowSpec(TOK.mask_token_id, None))
    P = len(t.prompt_ids)
    for row, k in enumerate(t.prediction_steps):
        at = rows.step == k
        masked = [j for j, s in enumerate(t.step_map) if s >= k]
        assert rows.gen_index[at].tolist() == masked
        assert rows.targets[at].tolist() == t.step_predictions[row, masked].tolist()
        # the row's [MASK]s are exactly the state's
        seq = rows.input_ids[rows.layout.cu_seqlens[row]:rows.layout.cu_seqlens[row + 1]]
        assert (seq[P:] == TOK.mask_token_id).nonzero().squeeze(1).tolist() == masked
    with pytest.raises(ValueError, match="full-attention"):
        MDPOSteps().rows(t, RowSpec(TOK.mask_token_id, 4))
    with pytest.raises(ValueError, match="record_predictions"):
        MDPOSteps().rows(Trajectory([1], [2, 3], [0, 1]), RowSpec(TOK.mask_token_id, None))


def test_rows_never_train_inpainted_tokens_and_keep_after_eos_context_untrained():
    # IGPO's inpainted tokens (step -1) are context from the first step; after EOS: context
    t = Trajectory([1, 2, 3], [10, 11, 12, 13, 14], [0, -1, 1, 2, 1], inpainted=[1],
                   after_eos_ids=[15, 16], after_eos_steps=[2, 2**62])
    # each step's completion: what it commits, and predictions a later step overrules
    t.step_predictions = torch.tensor([[10, 11, 22, 23, 24, 25, 26],
                                       [10, 11, 12, 33, 14, 35, 36],
                                       [10, 11, 12, 13, 14, 15, 46]], dtype=torch.int32)
    t.prediction_steps = [0, 1, 2]
    rows = MDPOSteps().rows(t, RowSpec(TOK.mask_token_id, None))
    assert rows.gen_index.tolist() == [0, 2, 3, 4, 2, 3, 4, 3]
    assert rows.targets.tolist() == [10, 22, 23, 24, 12, 33, 14, 13]
    assert rows.step.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    m = TOK.mask_token_id
    # step 2's row: [prompt | 10 11 12 [M] 14 | [M] [M]] (15 decoded at step 2: masked there)
    row2 = rows.input_ids[rows.layout.cu_seqlens[2]:rows.layout.cu_seqlens[3]].tolist()
    assert row2 == [1, 2, 3, 10, 11, 12, m, 14, m, m]


def _shift(traj, gen_index, step):
    return 0.3 * torch.sin(1.7 * traj.float() + 0.9 * gen_index.float() + 0.4 * step.float())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_loss_and_gradient_are_mdpos_formula(family):
    cfg = MDPOConfig().validate()
    T = cfg.sampling.temperature
    model = _llada(2, family)
    trajs = _trajectories(model)
    step_r = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0],
                           [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    adv = mdpo_step_advantages(step_r, 2)
    rows = Rows.cat([MDPOSteps().rows(t, RowSpec(TOK.mask_token_id, None)) for t in trajs])
    lp = selected_logp(model, rows, "cpu", temperature=T)
    shift = _shift(rows.traj, rows.gen_index, rows.step)
    old = lp.detach() + shift
    n = torch.tensor([len(t.token_ids) for t in trajs])
    w = token_weights(cfg.token_weights, rows.traj, rows.step, n, old_logp=old)
    ours, _ = policy_value_loss(lp, old, adv[rows.traj, rows.step],
                                torch.ones_like(lp, dtype=torch.bool),
                                objective=Objective.from_config(cfg), weights=w)
    model.zero_grad(set_to_none=True)
    ours.backward()
    g_ours = [p.grad.clone() for p in model.parameters()]
    # MDPO (DARE's compute_mdpo_policy_loss): at step k, over the masked positions M_k,
    # -max-clipped(ratio * A_k) * lambda_k * c, lambda_k = L / |M_k|, c = the rollout
    # policy's probability of the prediction; summed over every step's masked positions and
    # divided by their count
    terms = []
    for i, t in enumerate(trajs):
        for row, k in enumerate(t.prediction_steps):
            x, pos = _state_logps(model, t, k, row, T)
            if not pos.numel():
                continue
            s = _shift(torch.full_like(pos, i), pos, torch.full_like(pos, k))
            o = x.detach() + s
            ratio = torch.exp(x - o)
            a = adv[i, k]
            lam = len(t.token_ids) / pos.numel()
            pg = torch.maximum(-a * ratio * lam, -a * torch.clamp(ratio, 0.8, 1.2) * lam)
            terms.append(pg * torch.exp(o))
    truth = torch.cat(terms).sum() / sum(x.numel() for x in terms)
    model.zero_grad(set_to_none=True)
    truth.backward()
    assert rows.gen_index.numel() == sum(x.numel() for x in terms)
    torch.testing.assert_close(ours.detach(), truth.detach(), atol=1e-5, rtol=1e-5)
    for p, q in zip(g_ours, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


# ---- the trainer -----------------------------------------------------------------------------

DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def parity(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def _trainer(tmp_path, **kw):
    from .test_rl_stages import _cfg

    over = dict(group_size=4, steps_per_block=2, gen_block_length=4, max_new_tokens=8,
                temperature=0.6, lr=1e-3)
    return RLTrainer(_llada(), TOK, DATA, parity, _cfg(tmp_path, MDPOConfig, **{**over, **kw}))


def test_the_rollout_rewards_every_step_and_keeps_the_top_steps(tmp_path):
    tr = _trainer(tmp_path / "all", mdpo_train_steps=0)
    batch = tr.rollout(DATA[:2])
    S = max(len(t.prediction_steps) for t in batch.trajs)
    assert batch.advantages.shape == (8, S) and S == 4  # 2 blocks of 2 steps
    eos = TOK.eos_token_id

    def reward(p):  # the decoded completion ends at its first EOS
        return float(len(TOK.decode(p[:p.index(eos) + 1] if eos in p else p)) % 2)

    # a completion that ended at EOS ran fewer steps: its last reward stands for the rest
    rs = [[reward(p) for p in t.step_predictions.tolist()] for t in batch.trajs]
    step_r = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rs])
    assert any(len(r) < S for r in rs)
    torch.testing.assert_close(batch.advantages, mdpo_step_advantages(step_r, 4))
    assert batch.rewards.tolist() == step_r[:, -1].tolist()  # the last step is the completion
    top = _trainer(tmp_path / "top", mdpo_train_steps=2).rollout(DATA[:2])
    keep = top_steps(top.advantages, 2).tolist()
    assert len(keep) == 2
    for t in top.trajs:  # the kept steps it ran
        mine = [k for k in keep if k <= max(t.step_map)]
        assert t.prediction_steps == mine and t.step_predictions.shape == (len(mine), 8)
    assert any(t.prediction_steps for t in top.trajs)


def test_a_trainer_step_trains(tmp_path):
    tr = _trainer(tmp_path)
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


@pytest.mark.parametrize("over, keys", [
    ({"advantage": "mdpo"}, ("advantage=mdpo", "estimator=trace")),
    ({"estimator": "mdpo"}, ("advantage=zscore", "estimator=mdpo")),
    ({"mdpo_train_steps": 4}, ("mdpo_train_steps=4", "advantage=zscore")),
    ({"token_weights": "mdpo"}, ("token_weights=mdpo", "estimator=trace")),
    ({"advantage": "mdpo", "estimator": "mdpo", "use_value_model": True},
     ("use_value_model", "'mdpo'")),
    ({"advantage": "mdpo", "estimator": "mdpo", "inpaint_column": "answer"},
     ("advantage=mdpo", "inpaint_column")),
])
def test_bad_settings_are_refused_naming_both_keys(over, keys):
    with pytest.raises(ValueError) as e:
        RLConfig(**over).validate()
    assert all(k in str(e.value) for k in keys), str(e.value)


@pytest.mark.parametrize("over, keys", [
    (["advantage=zscore"], ("advantage=zscore", "estimator=mdpo")),
    (["estimator=trace"], ("advantage=mdpo", "estimator=trace")),
    (["use_value_model=true"], ("use_value_model", "'mdpo'")),
    (["inpaint_column=answer"], ("advantage=mdpo", "inpaint_column")),
])
def test_the_preset_overridden_badly_is_refused(over, keys):
    with pytest.raises(ValueError) as e:
        build_config(MDPOConfig, {}, over)
    assert all(k in str(e.value) for k in keys), str(e.value)


def test_block_models_are_refused_naming_both_keys():
    sdar = tiny_config("sdar", vocab_size=TOK.vocab_size, mask_token_id=TOK.mask_token_id)
    with pytest.raises(ValueError) as e:
        MDPOConfig().validate().check_model(sdar)
    assert "advantage=mdpo" in str(e.value) and "estimator=mdpo" in str(e.value)
    MDPOConfig().validate().check_model(tiny_config("llada", vocab_size=TOK.vocab_size,
                                                    mask_token_id=TOK.mask_token_id))


def test_the_preset_is_dares_recipe():
    c = MDPOConfig().validate()
    assert (c.advantage, c.estimator, c.token_weights, c.mdpo_train_steps) == (
        "mdpo", "mdpo", "mdpo", 16)
    assert (c.ratio_level, c.eps_low, c.eps_high, c.reduction, c.kl_coef) == (
        "token", 0.2, 0.2, "token_mean", 0.0)
    assert (c.prompts_per_step, c.group_size, c.lr, c.weight_decay) == (16, 8, 5e-7, 0.01)
    s = c.sampling
    assert (s.rule, s.steps, s.temperature, s.confidence, c.gen_block_length) == (
        "static", 16, 0.6, "prob", 32)


def test_the_planner_sees_every_step_recorded():
    from dlmkern._host import planned

    m = _llada()
    s = FullSampler(m, SamplingConfig(steps=2), gen_length=8, block_length=4,
                    record_predictions=True)
    with planned():
        t = s.generate([TOK.encode("1+2=")])[0]
    assert t.prediction_steps == [0, 1, 2, 3] and t.step_predictions.shape == (4, 8)
    assert len(MDPOSteps().copies(t, RowSpec(TOK.mask_token_id, None))) == 4


def test_the_memory_planner_runs_an_mdpo_step(tmp_path):
    from dlmkern.plan import PlannedRun

    mc = tiny_config("llada", vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16)
    cfg = MDPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=16, gen_block_length=8,
                     output_dir=str(tmp_path), progress_bar=False, mdpo_train_steps=3,
                     sampling=SamplingConfig(steps=4, temperature=0.6, max_seqs=4)).validate()
    with PlannedRun(mc, cfg, ranks=1, prompt_tokens=8, dtype=torch.float32) as run:
        stages = {**run.load(), **run.rollout(4), **run.update(0, False)}
    assert stages["update_backward"]["total"] > stages["load"]["total"]
