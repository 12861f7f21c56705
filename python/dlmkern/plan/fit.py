"""Fitting a recipe's memory knobs to a GPU: each candidate is a measured trial of the stages it
changes (plan.step.PlannedRun), never a formula.

The budget of one GPU is its memory less a fixed reserve (CUDA context, cuBLAS and NCCL
workspaces: not tensors, so no tracker sees them), divided by 1 + margin (the caching
allocator's reserved-over-allocated overhead: fragmentation, rounding to its block sizes). Both
are stated in every plan. Knobs the run file sets are kept; the others are searched, cheapest
first: no optimizer offload before offload, no activation checkpointing before checkpointing, the
largest micro-batch and rollout chunk that fit.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30
RESERVE = int(1.5 * GiB)   # CUDA context + library workspaces per GPU (not tensors)
MARGIN = 0.08              # allocator overhead on top of the tracked peak
HOST_RESERVE = 16 * GiB    # a node's host memory kept from an offloaded optimizer state
BUDGETS = (0, 131072, 65536, 32768, 16384, 8192, 4096, 2048)  # micro_batch_tokens candidates
MIN_CHUNK = 64  # a rollout chunk this large (or all of a rank's sequences) ends the search


@dataclasses.dataclass
class Budget:
    gpu_memory: int
    reserve: int = RESERVE
    margin: float = MARGIN
    host_memory: int | None = None   # one node's, for an offloaded optimizer (None: unchecked)
    gpus_per_node: int = 1

    @property
    def usable(self) -> int:
        """The largest tracked peak that fits."""
        return int((self.gpu_memory - self.reserve) / (1 + self.margin))

    def host_fits(self, per_rank: int) -> bool:
        """Whether a node's ranks' host-side optimizer state fits, with the same margin and
        HOST_RESERVE left to everything else (the OS, the processes, reward workers, data)."""
        if self.host_memory is None or not per_rank:
            return True
        return per_rank * self.gpus_per_node * (1 + self.margin) <= \
            self.host_memory - HOST_RESERVE


@dataclasses.dataclass
class Knobs:
    max_seqs: int
    micro_batch_tokens: int
    gradient_checkpointing: bool
    optimizer_offload: bool
    offload_grad_sums: bool = True


@dataclasses.dataclass
class Fit:
    fits: bool
    knobs: Knobs
    stages: dict[str, dict[str, int]]
    failing: str | None = None       # the stage over budget when nothing fits


def _peak(stages: dict) -> tuple[str, int]:
    name = max(stages, key=lambda k: stages[k]["total"])
    return name, stages[name]["total"]


def fit(run, budget: Budget, fixed: dict, local_seqs: int) -> Fit:
    """Knobs for `run` (a PlannedRun inside its context) under `budget`. `fixed`: the knobs the
    run file sets (name -> value); `local_seqs`: sequences one rank generates per rollout. A
    setting whose rollout chunk is small (under MIN_CHUNK, or all of a rank's sequences) does not
    end the search: a costlier setting (offload, checkpointing) may allow a larger chunk, and
    the largest wins."""
    usable = budget.usable
    offloads = _offloads(fixed)
    ckpts = [fixed["gradient_checkpointing"]] if "gradient_checkpointing" in fixed \
        else [False, True]
    mbts = [fixed["micro_batch_tokens"]] if "micro_batch_tokens" in fixed else list(BUDGETS)
    last, best = None, None
    for offload, sums in offloads:
        run.set_offload(offload, sums)
        for ckpt in ckpts:
            for mbt in mbts:
                stages = {**run.load(), **run.update(mbt, ckpt)}
                name, peak = _peak(stages)
                last = (Knobs(0, mbt, ckpt, offload, sums), stages, name)
                if peak > usable:
                    continue
                if not budget.host_fits(run.host_bytes):
                    last = (last[0], stages, "host (optimizer_offload)")
                    break
                seqs, rollout = _rollout(run, usable, fixed.get("max_seqs"), local_seqs)
                stages.update(rollout)
                knobs = Knobs(seqs, mbt, ckpt, offload, sums)
                if seqs and (best is None or seqs > best.knobs.max_seqs):
                    best = Fit(True, knobs, stages)
                if seqs >= min(local_seqs, MIN_CHUNK):
                    return best
                last = (knobs, stages, _peak(rollout)[0])
                break  # smaller micro-batches do not shrink the rollout
    if best is not None:
        return best
    knobs, stages, failing = last
    return Fit(False, knobs, stages, failing)


def _offloads(fixed: dict) -> list[tuple[bool, bool]]:
    """(optimizer_offload, offload_grad_sums) settings to try, cheapest first: none; the state
    and the fp32 gradient sums on the host; the state only (less host memory)."""
    options = [(False, True), (True, True), (True, False)]
    if "optimizer_offload" in fixed:
        options = [o for o in options if o[0] == fixed["optimizer_offload"]]
    if "offload_grad_sums" in fixed:
        options = [o for o in options if not o[0] or o[1] == fixed["offload_grad_sums"]]
    return options


def _rollout(run, usable: int, fixed: int | None, local_seqs: int) -> tuple[int, dict]:
    """The largest rollout chunk (max_seqs) whose stages fit, by bisection over powers of two
    (memory grows with the chunk); (0, the smallest chunk's stages) when none fits."""
    if fixed:  # the run file's choice (0: auto)
        stages = run.rollout(fixed)
        return (fixed if _peak(stages)[1] <= usable else 0), stages
    sizes = [local_seqs]
    while sizes[-1] > 1:
        sizes.append(max(1, sizes[-1] // 2))
    lo, hi, best = 0, len(sizes) - 1, None  # sizes descending; find the first that fits
    while lo <= hi:
        mid = (lo + hi) // 2
        stages = run.rollout(sizes[mid])
        if _peak(stages)[1] <= usable:
            best, hi = (sizes[mid], stages), mid - 1
        else:
            lo, smallest = mid + 1, stages
    if best is None:
        return 0, smallest
    # then between it and its double, in steps of 1/8 of it (CUDA graphs pad to S/8 anyway)
    good, bad, step = best[0], min(2 * best[0], local_seqs + 1), max(1, best[0] // 8)
    while bad - good > step:
        mid = good + max(step, (bad - good) // (2 * step) * step)
        stages = run.rollout(mid)
        if _peak(stages)[1] <= usable:
            good, best = mid, (mid, stages)
        else:
            bad = mid
    return best
