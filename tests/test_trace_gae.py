"""trace_gae_batch vectorised over trace steps (SPEC 4.3): the same advantages and returns as the
step-by-step recursion, a number of torch ops that does not grow with the trace length, and
nothing read back from the device."""

import pytest
import torch
from dlmkern._host import HOST
from dlmkern.rl.advantages import discounted_suffix_sum, trace_gae_batch
from torch.utils._python_dispatch import TorchDispatchMode


def _loop_trace_gae_batch(traj, step_ids, values, rewards, gamma, lam):
    """The previous implementation (one Python iteration per trace step), the reference."""
    n_traj = int(rewards.numel())
    span = int(step_ids.max()) + 1
    key = traj * span + step_ids
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    owner = uniq // span
    first = torch.searchsorted(owner, torch.arange(n_traj))
    count = torch.bincount(owner, minlength=n_traj)
    rank = inverse - first[traj]
    K = int(count.max())
    flat = traj * (K + 1) + rank
    v = values.double()
    shape = (n_traj, K + 1)
    v_step = torch.zeros(n_traj * (K + 1), dtype=torch.float64).index_add(0, flat, v)
    n_step = torch.zeros(n_traj * (K + 1), dtype=torch.float64).index_add(0, flat,
                                                                          torch.ones_like(v))
    V = (v_step / n_step.clamp(min=1)).view(shape)
    r_step = torch.zeros(shape, dtype=torch.float64)
    has = count > 0
    r_step[torch.arange(n_traj)[has], count[has] - 1] = rewards.double()[has]
    R = torch.zeros(shape, dtype=torch.float64)
    A = torch.zeros(shape, dtype=torch.float64)
    for k in range(K - 1, -1, -1):
        R[:, k] = r_step[:, k] + gamma * R[:, k + 1]
        A[:, k] = r_step[:, k] - V[:, k] + gamma * V[:, k + 1] + gamma * lam * A[:, k + 1]
    r_tok = r_step.view(-1)[flat]
    nxt = flat + 1
    adv = r_tok - v + gamma * V.view(-1)[nxt] + gamma * lam * A.view(-1)[nxt]
    return adv, r_tok + gamma * R.view(-1)[nxt]


def _structure(lengths, seed):
    """Tokens of trajectories with `lengths[t]` distinct (sparse, unordered) trace steps each,
    1-3 tokens per step, shuffled; values and rewards of either sign."""
    g = torch.Generator().manual_seed(seed)
    traj, steps = [], []
    for t, k in enumerate(lengths):
        ids = torch.randperm(3 * k + 1, generator=g)[:k]  # distinct step ids, gaps between them
        reps = torch.randint(1, 4, (k,), generator=g)
        traj.append(torch.full((int(reps.sum()),), t))
        steps.append(ids.repeat_interleave(reps))
    traj, steps = torch.cat(traj), torch.cat(steps)
    order = torch.randperm(traj.numel(), generator=g)
    values = torch.randn(traj.numel(), generator=g)
    rewards = torch.randn(len(lengths), generator=g) * 2
    return traj[order], steps[order], values[order], rewards


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.9, 0.9), (0.5, 0.5), (1.0, 0.9),
                                        (0.9, 0.5), (0.5, 1.0)])
@pytest.mark.parametrize("lengths", [[1], [4, 0, 7, 1], [33, 5, 32, 31], [1000, 3, 999, 0, 640]])
def test_matches_the_step_recursion(gamma, lam, lengths):
    traj, steps, values, rewards = _structure(lengths, seed=len(lengths) + sum(lengths))
    adv, ret = trace_gae_batch(traj, steps, values, rewards, gamma, lam)
    adv_r, ret_r = _loop_trace_gae_batch(traj, steps, values, rewards, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    # fp32 results of a float64 reference: the sums over up to 1000 steps reach ~1e3 at g = l = 1
    scale = float(adv_r.abs().max()) + 1.0
    torch.testing.assert_close(adv.double(), adv_r, atol=2e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ret_r, atol=2e-6 * scale, rtol=1e-5)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 15, 16, 17, 101, 1000])
@pytest.mark.parametrize("c", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_discounted_suffix_sum(K, c):
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    want = torch.zeros(3, K + 1, dtype=torch.float64)
    for k in range(K - 1, -1, -1):
        want[:, k] = x[:, k] + c * want[:, k + 1]
    got = discounted_suffix_sum(x, c)
    assert torch.isfinite(got).all()  # c^-k would overflow for c = 0.5 at K = 1000
    torch.testing.assert_close(got, want[:, :K], atol=1e-10, rtol=1e-10)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_number_of_ops_does_not_grow_with_the_trace():
    counts = []
    for lengths in ([10, 3], [1000, 3]):
        traj, steps, values, rewards = _structure(lengths, seed=1)
        with _CountOps() as ops:
            trace_gae_batch(traj, steps, values, rewards, 0.9, 0.95)
        counts.append(ops.calls)
    assert counts[0] == counts[1], counts  # a loop over steps would add ops per step


def test_reads_nothing_back_from_the_device():
    """values / rewards on the meta device (no data: any read of theirs would fail); the step
    structure is host data."""
    traj, steps, values, rewards = _structure([40, 0, 9], seed=2)
    adv, ret = trace_gae_batch(traj.to(HOST), steps.to(HOST), values.to("meta"),
                               rewards.to("meta"), 0.9, 0.9)
    assert adv.device.type == ret.device.type == "meta" and adv.shape == values.shape
