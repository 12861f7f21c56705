"""RL core: shrinkage, trace rounds, packed KV-reuse rows, advantages (SPEC 4.1 - 4.4)."""

import pytest
import torch
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import masked_logprobs
from dlmkern.rl import (
    block_rows,
    full_rows,
    group_zscore,
    keep_groups,
    per_round_rows,
    response_blocks,
    shrink,
    trace_gae,
    trace_rounds,
)
from dlmkern.sampling import BlockSampler, SamplingConfig, Trajectory


def test_response_blocks_align_to_absolute_positions():
    # prompt of 5, block 4: generated tokens 0..2 complete block 1 (positions 5..7)
    assert response_blocks(5, 9, 4) == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    assert response_blocks(8, 4, 4) == [[0, 1, 2, 3]]


def test_shrinkage_by_hand():
    steps = [1, 0, 0, 3, 2, 2, 3, 5, 4]
    groups = response_blocks(5, 9, 4)
    assert shrink(steps, groups, 1) == steps
    # block 1 distinct {0, 1} -> one run, max 1; block 2 {2, 3} -> 3; block 3 {4, 5} -> 5
    assert shrink(steps, groups, 2) == [1, 1, 1, 3, 3, 3, 3, 5, 5]
    # whole response (full attention): distinct 0..5 in runs of 4 -> {0..3} -> 3, {4, 5} -> 5
    assert shrink(steps, [list(range(9))], 4) == [3, 3, 3, 3, 3, 3, 3, 5, 5]
    with pytest.raises(ValueError):
        shrink(steps, groups, 0)


def test_trace_rounds_by_hand():
    steps = [1, 0, 0, 3, 2, 2, 3, 5, 4]
    rounds = trace_rounds(steps, response_blocks(5, 9, 4))
    assert [len(r) for r in rounds] == [2, 2, 2]
    r = rounds[1][0]  # block 2, round 1: step 2 trains tokens 4, 5; masks every token of step >= 2
    assert (r.step, r.trained, r.masked) == (2, [4, 5], [3, 4, 5, 6])
    r = rounds[1][1]
    assert (r.step, r.trained, r.masked) == (3, [3, 6], [3, 6])
    # blocks with different round counts
    rounds = trace_rounds([0, 0, 0, 0, 1, 2, 3, 4], response_blocks(0, 8, 4))
    assert [len(r) for r in rounds] == [1, 4]


def test_block_rows_by_hand():
    t = Trajectory([1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15, 16, 17, 18],
                   [1, 0, 0, 3, 2, 2, 3, 5, 4])
    rows = block_rows([t], 4, mask_token_id=63)
    M = 63
    assert rows.input_ids.tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18,
                                       5, M, M, M, M, M, M, M, M, M,      # round 1
                                       5, M, 11, 12, M, 14, 15, M, M, 18]  # round 2
    assert rows.targets.tolist() == [11, 12, 14, 15, 18, 10, 13, 16, 17]
    assert rows.step.tolist() == [0, 0, 2, 2, 4, 1, 3, 3, 5]
    assert sorted(rows.gen_index.tolist()) == list(range(9))  # every token trained once
    assert rows.num_tokens == 34 and per_round_rows([t], 4, 63).num_tokens == 48


def _trajectories(m, n=3):
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]][:n]
    cfg = SamplingConfig(rule="dynamic", threshold=0.08, temperature=1.0, steps=4)
    return BlockSampler(m, cfg, max_new_tokens=14).generate(prompts, seed=1)


@pytest.mark.parametrize("shrinkage", [1, 2])
def test_packed_rows_give_the_same_logprobs_as_one_row_per_round(shrinkage):
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config("sdar")).eval()
    trajs = _trajectories(m)
    mask = m.config.mask_token_id
    out = {}
    for name, rows in (("packed", block_rows(trajs, 4, mask, shrinkage)),
                       ("per_round", per_round_rows(trajs, 4, mask, shrinkage))):
        targets = torch.zeros(rows.num_tokens, dtype=torch.long)
        targets[rows.train_rows] = rows.targets
        with torch.no_grad():
            hidden = m(rows.input_ids, rows.layout)
            lp = masked_logprobs(hidden, m.lm_head.weight, targets, rows=rows.train_rows)
        out[name] = {(int(a), int(b)): float(x)
                     for a, b, x in zip(rows.traj, rows.gen_index, lp, strict=True)}
    assert out["packed"].keys() == out["per_round"].keys()
    for k, v in out["packed"].items():
        assert v == pytest.approx(out["per_round"][k], abs=1e-5)
    # and the packed rows are much shorter
    assert block_rows(trajs, 4, mask).num_tokens < per_round_rows(trajs, 4, mask).num_tokens


def test_full_rows_one_per_step():
    t = Trajectory([1, 2], [5, 6, 7, 8], [0, 2, 1, 2])
    rows = full_rows([t], mask_token_id=9, shrinkage=1)
    M = 9
    assert rows.input_ids.tolist() == [1, 2, M, M, M, M,   # step 0
                                       1, 2, 5, M, M, M,   # step 1
                                       1, 2, 5, M, 7, M]   # step 2
    assert rows.train_rows.tolist() == [2, 10, 15, 17]
    assert rows.layout.full and rows.layout.cu_seqlens.tolist() == [0, 6, 12, 18]


def test_group_zscore_and_filters():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_zscore(r, 4)
    g = torch.tensor([1.0, 0.0, 1.0, 1.0])
    expect = (g - g.mean()) / (g.std() + 1e-6)
    torch.testing.assert_close(adv[:4], expect)
    torch.testing.assert_close(adv[4:], torch.tensor([1.0, 1.0, -1.0, -1.0]) * 0.5 / (
        torch.tensor([1.0, 1.0, 0.0, 0.0]).std() + 1e-6))
    assert torch.all(group_zscore(torch.ones(4), 4) == 0)  # std 0 -> 0, no NaN
    rates = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1.0])
    assert keep_groups(rates, 4, 0.2, 0.8).tolist() == [False, True, True, False]
    assert keep_groups(rates, 4, 0.0, 1.0, dynamic=True).tolist() == [False, True, True, False]
    # partial credit: DAPO keeps any group with a spread (none has pass rate 1 at threshold 1)
    part = torch.tensor([0.5, 0.25, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0, 1.0, 1.0, 1.0])
    assert keep_groups(part, 4, 0.0, 1.0, dynamic=True).tolist() == [True, False, True]
    assert keep_groups(part, 4, 0.2, 0.8).tolist() == [True, True, False]


def test_trace_gae_by_hand():
    # three steps (ids 0, 2, 5), reward 1 on the last step
    step_ids = torch.tensor([0, 0, 2, 5, 5])
    values = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8])
    g, lam = 0.9, 0.8
    adv, ret = trace_gae(step_ids, values, reward=1.0, gamma=g, lam=lam)
    V = [0.2, 0.5, 0.7]  # step means
    r = [0.0, 0.0, 1.0]
    R2 = 1.0
    R1 = 0 + g * R2
    A2 = r[2] - V[2]
    A1 = r[1] - V[1] + g * V[2] + g * lam * A2
    expect_adv = [r[0] - 0.1 + g * V[1] + g * lam * A1, r[0] - 0.3 + g * V[1] + g * lam * A1,
                  r[1] - 0.5 + g * V[2] + g * lam * A2, 1.0 - 0.6, 1.0 - 0.8]
    expect_ret = [g * R1, g * R1, g * R2, 1.0, 1.0]
    torch.testing.assert_close(adv, torch.tensor(expect_adv))
    torch.testing.assert_close(ret, torch.tensor(expect_ret))
    # gamma = lambda = 1: A_j = R - V_j
    adv1, ret1 = trace_gae(step_ids, values, reward=1.0)
    torch.testing.assert_close(adv1, 1.0 - values)
    torch.testing.assert_close(ret1, torch.ones(5))


def _gae_loops(steps, values, reward, g, lam):
    """Plain-Python GAE over one trajectory's trace steps (SPEC 4.3), the independent check."""
    ids = sorted(set(steps))
    V = [sum(v for s, v in zip(steps, values, strict=True) if s == k) / steps.count(k)
         for k in ids] + [0.0]
    r = [0.0] * (len(ids) - 1) + [reward] + [0.0]
    R, A = [0.0] * (len(ids) + 1), [0.0] * (len(ids) + 1)
    for k in range(len(ids) - 1, -1, -1):
        R[k] = r[k] + g * R[k + 1]
        A[k] = r[k] - V[k] + g * V[k + 1] + g * lam * A[k + 1]
    out = []
    for s, v in zip(steps, values, strict=True):
        k = ids.index(s)
        out.append((r[k] - v + g * V[k + 1] + g * lam * A[k + 1], r[k] + g * R[k + 1]))
    return out


def test_trace_gae_batch_equals_one_trajectory_at_a_time():
    # trajectories of 1, 4 and 7 distinct steps, tokens interleaved, one with no token at all:
    # the batched recursion (zero-padded shorter traces) must give each its own GAE
    from dlmkern.rl.advantages import trace_gae_batch

    gen = torch.Generator().manual_seed(0)
    traj = torch.tensor([0, 2, 2, 3, 2, 3, 3, 3, 2, 3, 3, 3, 3, 2, 3, 3])
    steps = torch.randint(0, 9, (traj.numel(),), generator=gen)
    values = torch.rand(traj.numel(), generator=gen)
    rewards = torch.tensor([1.0, 5.0, -0.5, 2.0])
    adv, ret = trace_gae_batch(traj, steps, values, rewards, gamma=0.9, lam=0.7)
    for t in (0, 2, 3):
        m = traj == t
        want = _gae_loops(steps[m].tolist(), values[m].tolist(), float(rewards[t]), 0.9, 0.7)
        torch.testing.assert_close(adv[m], torch.tensor([a for a, _ in want]))
        torch.testing.assert_close(ret[m], torch.tensor([r for _, r in want]))


@pytest.mark.parametrize("block_size", [4, None])
def test_baseline_rows(block_size):
    from dlmkern.rl import baseline_rows

    t = Trajectory([1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [0] * 7)
    g = torch.Generator().manual_seed(0)
    coupled = baseline_rows("coupled", [t], 63, g, block_size)
    # every response token trained exactly once across the two complementary copies
    assert sorted(coupled.gen_index.tolist()) == list(range(7))
    assert coupled.targets.tolist() == [t.token_ids[i] for i in coupled.gen_index.tolist()]
    assert torch.all(coupled.input_ids[coupled.train_rows] == 63)
    d1 = baseline_rows("diffu_grpo", [t], 63, g, block_size)
    assert sorted(d1.gen_index.tolist()) == list(range(7))
    rm = baseline_rows("random_mask", [t], 63, g, block_size)
    assert torch.all(rm.input_ids[rm.train_rows] == 63)
    assert rm.layout.num_tokens == rm.num_tokens
    with pytest.raises(ValueError, match="unknown estimator"):
        baseline_rows("nope", [t], 63, g, block_size)
