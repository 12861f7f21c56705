"""The step plan (SPEC 4.7): which trajectories each optimizer step and each forward pass holds,
and with what weight. The only code that knows the distributed rules: mini-batches are cut from
the step's global trajectory order (so they do not depend on the number of ranks), every rank
runs as many passes as the rank with the most (FSDP forwards and backwards are collectives: the
missing ones are zero-weight stand-ins), and each pass's share of the global mean is fixed here,
so that accumulated gradients equal the gradient of the whole mini-batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dlmkern import distributed


@dataclass
class Pass:
    """One forward / backward pass (a micro-batch) of whole trajectories."""

    traj: list[int]        # local trajectory indices
    weight: float          # the mini-batch's weight; 0 for a stand-in
    n_tokens: int          # trained tokens
    n_seq_trained: int     # trajectories with at least one trained token
    row_tokens: int        # packed row tokens
    policy_share: float    # share of the mini-batch's policy mean (0 for a stand-in)
    value_share: float     # share of its value (token) mean


@dataclass
class MiniBatch:
    """One optimizer step: its passes and the factors that turn their local means into shares
    of the global (all-rank) mean."""

    passes: list[Pass]
    weight: float          # 0: this rank has none of its trajectories (it joins with zero weight)
    policy_scale: float
    value_scale: float

    def real(self) -> list[Pass]:
        """Passes whose statistics count (all of them on a zero-weight rank)."""
        return [p for p in self.passes if p.weight > 0 or self.weight == 0 or
                len(self.passes) == 1]

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self.real())

    @property
    def row_tokens(self) -> int:
        return sum(p.row_tokens for p in self.passes if p.weight > 0)


def minibatch_chunks(positions: Sequence[int], n_global: int, m: int) -> list[list[int]]:
    """m chunks of the global trajectory order (contiguous, as equal as possible); for each, the
    local indices whose global position falls in it."""
    bounds = [round(k * n_global / m) for k in range(m + 1)]
    return [[i for i, pos in enumerate(positions) if bounds[k] <= pos < bounds[k + 1]]
            for k in range(m)]


def micro_batches(sizes: Sequence[int], budget: int) -> list[list[int] | None]:
    """Consecutive items whose sizes fit `budget` (an item over it is a group of its own); one
    group without a budget. Distributed: `None` stand-ins pad the list to the longest rank's."""
    groups = [list(range(len(sizes)))]
    if budget > 0 and len(sizes) > 1:
        groups, size = [[]], 0
        for i, n in enumerate(sizes):
            if groups[-1] and size + n > budget:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += n
    if distributed.enabled() and budget > 0:
        most = max(distributed.all_gather(len(groups)))
        groups += [None] * (most - len(groups))
    return groups


def _global_scale(n_local: float, sum_reduction: bool) -> float:
    """Factor that turns a rank-local mean into its share of the global mean (FSDP averages
    gradients over ranks): local count / global count * world size (a sum: world size)."""
    if not distributed.enabled():
        return 1.0
    n_global = distributed.all_sum(n_local)
    if sum_reduction:
        return float(distributed.world())
    return n_local / max(n_global, 1.0) * distributed.world()


def _shares(counts: list[int], weights: list[float]) -> list[float]:
    if len(counts) == 1:
        return [1.0]
    total = max(sum(c for c, w in zip(counts, weights, strict=True) if w > 0), 1)
    return [c / total if w > 0 else 0.0 for c, w in zip(counts, weights, strict=True)]


def plan_step(positions: Sequence[int], n_global: int, rows: Sequence, reduction: str,
              num_minibatches: int, budget: int, weight: float = 1.0) -> list[MiniBatch]:
    """The mini-batches of one update. `positions`: each local trajectory's place in the step's
    global order; `rows`: each one's training rows (dlmkern.rl.Rows); `weight` 0: this rank only
    joins the collectives. Mini-batches without a trajectory on any rank are dropped; without
    ranks, so are those without a trained token."""
    if weight == 0:
        positions = [-1] * len(positions)  # in no chunk: only stand-in steps below
    plan = []
    for idx in minibatch_chunks(positions, n_global, num_minibatches):
        if distributed.all_sum(len(idx)) == 0:
            continue  # no trajectory on any rank: no step anywhere (ranks agree)
        w = weight if idx else 0.0
        idx = idx or [0]  # none here: join the other ranks' step with zero weight
        passes = []
        for group in micro_batches([rows[i].num_tokens for i in idx], budget):
            real = group is not None
            traj = [idx[i] for i in group] if real else passes[-1].traj
            trained = [int(rows[i].train_rows.numel()) for i in traj]
            passes.append(Pass(traj, w if real else 0.0, sum(trained),
                               sum(n > 0 for n in trained),
                               sum(rows[i].num_tokens for i in traj), 0.0, 0.0))
        plan.append(_finish(passes, w, reduction))
    if not distributed.enabled():
        plan = [mb for mb in plan if mb.n_tokens > 0]
    return plan


def _finish(passes: list[Pass], w: float, reduction: str) -> MiniBatch:
    weights = [p.weight for p in passes]
    tokens = [p.n_tokens for p in passes]
    seq = reduction == "seq_mean"
    if reduction == "sum":  # sums add up: every real pass counts fully
        policy = [1.0 if p.weight > 0 or len(passes) == 1 else 0.0 for p in passes]
    else:
        policy = _shares([p.n_seq_trained for p in passes] if seq else tokens, weights)
    for p, ps, vs in zip(passes, policy, _shares(tokens, weights), strict=True):
        p.policy_share, p.value_share = ps, vs
    mb = MiniBatch(passes, w, 0.0, 0.0)
    n_policy = sum(p.n_seq_trained for p in mb.real()) if seq else mb.n_tokens
    mb.policy_scale = _global_scale(n_policy * (w > 0), reduction == "sum") * w
    mb.value_scale = _global_scale(mb.n_tokens * (w > 0), False) * w
    return mb


def planned_trajectories(positions: Sequence[int], n_global: int, first_rows, cfg,
                         passes: int) -> list[int]:
    """dlmkern.plan's cut (every trajectory is the same worst case): the local trajectories of
    the first mini-batch that fill its first `passes` micro-batches, whose shapes every later
    micro-batch repeats. `first_rows`: one trajectory's rows."""
    first = minibatch_chunks(positions, n_global, cfg.num_minibatches)[0]
    budget = cfg.micro_batch_tokens
    per_pass = max(1, budget // max(first_rows.num_tokens, 1)) if budget else len(first)
    return first[: per_pass * passes]
