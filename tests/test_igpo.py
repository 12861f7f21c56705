"""IGPO (issue #28; Zhao et al. 2025, github.com/facebookresearch/igpo): the samplers hold
inpainted response positions fixed (block and full attention) and the trajectory lists them; no
estimator's rows ever train them; only all-fail groups are re-sampled with hints, and passing
re-samples replace the group's first completions; the preset's loss and gradient equal the GRPO
formula over the generated tokens only, written here in plain torch from plain forwards of the
model (block and full); a trainer step trains; bad settings are refused naming both keys."""

import math

import pytest
import torch
from dlmkern.ops import Objective, layouts, policy_value_loss
from dlmkern.rl import ESTIMATORS, Rows, RowSpec, get_estimator, group_advantages
from dlmkern.sampling import BlockSampler, FullSampler, SamplingConfig, Trajectory
from dlmkern.sampling.tree import TreeLeaf, TreeSpec
from dlmkern.trainers import IGPOConfig, RLConfig, RLTrainer, build_config
from dlmkern.trainers.inpaint import solution_hint
from dlmkern.trainers.update import selected_logp

from .test_rl_stages import TOK, _cfg, _model

M = TOK.mask_token_id
HINT = {0: 7, 3: 2, 4: 2, 9: 5}  # response index -> token


def _sampler(model, n=12):
    cfg = SamplingConfig(steps=2, temperature=1.0)
    if model.config.block_causal:
        return BlockSampler(model, cfg, max_new_tokens=n)
    return FullSampler(model, cfg, gen_length=n, block_length=4)


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_the_sampler_holds_inpainted_positions_fixed(family):
    model = _model(family)
    prompts = [TOK.encode("12+3="), TOK.encode("4*5=")]  # 5 and 4 tokens: mid-block starts
    trajs = _sampler(model).generate(prompts, n_samples=2, seeds=[1, 2, 3, 4],
                                     inpaint=[HINT, None, {1: 3}, {}])
    for t, hint in zip(trajs, [HINT, {}, {1: 3}, {}], strict=True):
        assert len(t.token_ids) == 12 and t.inpainted == sorted(hint)
        for r, tok in hint.items():
            assert t.token_ids[r] == tok and t.step_map[r] == -1 and t.logprobs[r] == 0.0
        free = [r for r in range(12) if r not in hint]
        assert all(t.step_map[r] >= 0 for r in free) and M not in t.token_ids
    # a sequence's free tokens are drawn from its own generator, as without hints
    again = _sampler(model).generate(prompts[:1], n_samples=1, seeds=[2])
    assert again[0].token_ids == trajs[1].token_ids
    with pytest.raises(ValueError, match="one entry per"):
        _sampler(model).generate(prompts, inpaint=[HINT])


def _traj():
    # the sampler's record: inpainted tokens have step -1 (visible before the first step)
    return Trajectory([1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [0, -1, -1, 1, 2, -1, 2],
                      inpainted=[1, 2, 5])


# (mdpo's rows need the sampler's per-step predictions: tests/test_mdpo.py checks it there)
@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n != "mdpo"])
@pytest.mark.parametrize("block_size", [4, None])
def test_no_rows_ever_train_an_inpainted_token(name, block_size):
    t = _traj()
    if name == "tree":  # d-TreeRPO's segments: a tree leaf (one level of 2, its first leaf)
        t.tree = TreeLeaf(TreeSpec((2,), ()), 0)
    rows = get_estimator(name).rows(t, RowSpec(M, block_size), torch.Generator().manual_seed(0))
    assert rows.gen_index.numel() > 0
    assert not set(rows.gen_index.tolist()) & set(t.inpainted)
    P = len(t.prompt_ids)
    for i in t.inpainted:  # clean context wherever a row holds the position
        at = rows.layout.position_ids == P + i
        assert at.any() and torch.all(rows.input_ids[at] == t.token_ids[i])
    if name == "diffu_grpo":  # which, without the inpainted list, trains every token
        plain = Trajectory(t.prompt_ids, t.token_ids, t.step_map)
        full = get_estimator(name).rows(plain, RowSpec(M, block_size),
                                        torch.Generator().manual_seed(0))
        assert set(t.inpainted) <= set(full.gen_index.tolist())


def test_a_hint_reveals_the_share_of_chunks_at_their_offsets():
    sol = list(range(30))
    gen = torch.Generator().manual_seed(0)
    assert solution_hint(sol, 1.0, 5, 10, 99, gen) == {i: i for i in range(30)}
    assert solution_hint(sol, 0.0, 5, 10, 99, gen) == {}
    h = solution_hint(sol, 0.5, 3, 3, 99, gen)  # 10 chunks of 3: 5 shown
    assert len(h) == 15 and all(h[i] == i for i in h)
    shown = {i // 3 for i in h}  # whole chunks
    assert len(shown) == 5 and all(j in h for k in shown for j in range(3 * k, 3 * k + 3))
    assert max(solution_hint(sol, 1.0, 5, 10, 12, gen)) < 12  # the response's length


ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "3+4=", "answer": "9876"}]


def _passes(prompts, completions, answer, **_):
    """prompt 0 always passes; otherwise the completion must hold the answer."""
    return [1.0 if p == "1+1=" or a in c else 0.0
            for p, c, a in zip(prompts, completions, answer, strict=True)]


def _igpo(tmp_path, family, **kw):
    over = dict(group_size=4, steps_per_block=2, gen_block_length=4, inpaint_share_low=1.0,
                inpaint_share_high=1.0, inpaint_chunk_min=1, inpaint_chunk_max=1,
                inpaint_replacements=2, ppo_epochs=1, kl_coef=0.0)
    return RLTrainer(_model(family), TOK, ROWS, _passes,
                     _cfg(tmp_path, IGPOConfig, **{**over, **kw}))


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_only_all_fail_groups_are_inpainted(tmp_path, family):
    off = _igpo(tmp_path / "off", family, inpaint_column="").rollout(ROWS)
    assert off.rewards[:4].tolist() == [1.0] * 4 and off.rewards[4:].tolist() == [0.0] * 4
    assert not any(t.inpainted for t in off.trajs)
    on = _igpo(tmp_path / "on", family).rollout(ROWS)
    # group 0 passed: untouched (the same completions); group 1 failed: its first two replaced
    assert [t.token_ids for t in on.trajs[:4]] == [t.token_ids for t in off.trajs[:4]]
    assert not any(t.inpainted for t in on.trajs[:4])
    sol = TOK.encode("9876")
    for t in on.trajs[4:6]:
        assert t.inpainted == [0, 1, 2, 3] and t.token_ids[:4] == sol
    assert [t.token_ids for t in on.trajs[6:]] == [t.token_ids for t in off.trajs[6:]]
    assert on.rewards.tolist() == [1.0] * 6 + [0.0] * 2
    torch.testing.assert_close(on.advantages, group_advantages(on.rewards, 4))
    assert on.advantages[4] > 0 > on.advantages[6]
    # a solution shorter than one chunk gives no hint: nothing is re-sampled
    short = _igpo(tmp_path / "short", family, inpaint_chunk_min=5, inpaint_chunk_max=5)
    same = short.rollout(ROWS)
    assert [t.token_ids for t in same.trajs] == [t.token_ids for t in off.trajs]
    assert not any(t.inpainted for t in same.trajs)


def _token_logps(model, t, pm):
    """Per generated token (index order), d1's one-step log-prob from plain forwards: the
    prompt with its d1 mask, the response [MASK] except its inpainted tokens (the sampler saw
    them). Full attention: one forward; block models: per response block, the clean response
    before it. Inpainted indices are left out."""
    c = model.config
    P, n = len(t.prompt_ids), len(t.token_ids)
    clean = torch.tensor(t.prompt_ids + t.token_ids)
    clean[:P] = torch.where(pm, M, clean[:P])
    noisy = clean.clone()
    free = [r for r in range(n) if r not in t.inpainted]
    noisy[[P + r for r in free]] = M

    def logp(ids, lay, pos):
        lsm = torch.log_softmax(model.logits(model(ids, lay)).float(), -1)
        return lsm[pos, clean[pos]]

    if not c.block_causal:
        return logp(noisy, layouts.full([P + n]), torch.tensor([P + r for r in free]))
    B, out = c.block_size, []
    for b in range(P // B, (P + n - 1) // B + 1):
        lo, hi = max(P, b * B), min((b + 1) * B, P + n)
        pos = [p for p in range(lo, hi) if p - P in free]
        if pos:
            ids = torch.cat([clean[:lo], noisy[lo:hi]])
            out.append(logp(ids, layouts.block_causal([hi], B), torch.tensor(pos)))
    return torch.cat(out)


def _shift(i, r):  # old / reference log-prob offsets per (trajectory, generated index)
    return 0.3 * torch.sin(1.7 * i + 0.9 * r)


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_loss_and_gradient_are_grpo_on_the_generated_tokens(family):
    cfg = IGPOConfig(kl_coef=0.05, sampling=SamplingConfig(temperature=1.0)).validate()
    model = _model(family)
    g = torch.Generator().manual_seed(3)
    trajs = []
    for k in range(4):  # one group of 4, two with hints
        n = 6 + k
        trajs.append(Trajectory([1, 2, 3, 4, 5], torch.randint(0, 18, (n,), generator=g)
                                .tolist(), [0] * n, inpainted=[[0, 1, 4], [], [2, 3], []][k]))
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    c = model.config
    spec = RowSpec(M, c.block_size if c.block_causal else None)
    rows = Rows.cat([get_estimator(cfg.estimator).rows(t, spec, torch.Generator().manual_seed(i))
                     for i, t in enumerate(trajs)])
    lp = selected_logp(model, rows, "cpu", temperature=1.0)
    shift = _shift(rows.traj, rows.gen_index)
    old, ref = lp.detach() + shift, lp.detach() - shift
    adv = group_advantages(rewards, 4)[rows.traj]
    ours, _ = policy_value_loss(lp, old, adv, torch.ones_like(lp, dtype=torch.bool),
                                objective=Objective.from_config(cfg), ref_logp=ref)
    model.zero_grad(set_to_none=True)
    ours.backward()
    g_ours = [p.grad.clone() for p in model.parameters()]
    # GRPO: A = (r - mean) / (std + 1e-6); per generated token, -min(r A, clip(r, 0.8, 1.2) A)
    # + beta * (exp(ref - lp) - (ref - lp) - 1), averaged over the generated tokens
    a = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    terms = []
    for i, t in enumerate(trajs):
        pm = torch.rand(5, generator=torch.Generator().manual_seed(i)) < 0.15
        x = _token_logps(model, t, pm)
        r_idx = torch.tensor([r for r in range(len(t.token_ids)) if r not in t.inpainted])
        s = _shift(torch.full_like(r_idx, i), r_idx)
        ratio = torch.exp(x - (x.detach() + s))
        pg = -torch.minimum(ratio * a[i], torch.clamp(ratio, 0.8, 1.2) * a[i])
        d = (x.detach() - s) - x
        terms.append(pg + 0.05 * (torch.exp(d) - d - 1))
    truth = torch.cat(terms).mean()
    model.zero_grad(set_to_none=True)
    truth.backward()
    assert rows.gen_index.numel() == sum(len(x) for x in terms)
    torch.testing.assert_close(ours.detach(), truth.detach(), atol=1e-5, rtol=1e-5)
    for p, q in zip(g_ours, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family, estimator", [("sdar", "diffu_grpo"), ("llada", "diffu_grpo"),
                                               ("sdar", "trace"), ("llada", "trace")])
def test_a_trainer_step_trains_with_inpainted_groups(tmp_path, family, estimator):
    # trace rows too: the sampler's step -1 for inpainted tokens makes them context in every round
    tr = _igpo(tmp_path, family, kl_coef=0.01, estimator=estimator)
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert log["inpainted"] == 2 and log["kept_groups"] == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


@pytest.mark.parametrize("over, keys", [
    ({"inpaint_share_low": 0.7, "inpaint_share_high": 0.5},
     ("inpaint_share_low", "inpaint_share_high")),
    ({"inpaint_chunk_min": 6, "inpaint_chunk_max": 3}, ("inpaint_chunk_min", "inpaint_chunk_max")),
    ({"inpaint_replacements": 9, "group_size": 8, "inpaint_column": "answer"},
     ("inpaint_replacements=9", "group_size=8")),
])
def test_bad_settings_are_refused_naming_both_keys(over, keys):
    for make in (lambda: RLConfig(**over).validate(),
                 lambda: build_config(IGPOConfig, {}, [f"{k}={v}" for k, v in over.items()])):
        with pytest.raises(ValueError) as e:
            make()
        assert all(k in str(e.value) for k in keys), str(e.value)


def test_the_preset_is_the_papers():
    c = IGPOConfig().validate()
    assert (c.estimator, c.ratio_level, c.inpaint_column, c.inpaint_replacements) == (
        "diffu_grpo", "token", "answer", 4)
    assert (c.inpaint_share_low, c.inpaint_share_high, c.inpaint_chunk_min,
            c.inpaint_chunk_max) == (0.2, 0.6, 5, 10)
    assert (c.group_size, c.max_new_tokens, c.sampling.steps, c.sampling.temperature) == (
        8, 256, 16, 1.2)
    assert (c.lr, c.ppo_epochs, c.kl_coef, c.kl_to, c.eps_low, c.eps_high) == (
        5e-7, 4, 0.01, "ref", 0.2, 0.2)
