"""TraceRL / DiPO (SPEC 4.1): noisy copy r is round r of every block (of the whole response for
full-attention models): it masks the tokens decoded at the block's r-th (shrunk) trace step or
later and trains those decoded at it. Rows.step is the shrunk trace step. What the sampler still
had after EOS (the rest of the EOS block, or of the canvas) is context in every copy, masked as
the sampler had it at the round's step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec
from dlmkern.rl.trace import trace_ranks

_NO_ROUND = torch.iinfo(torch.long).max  # above every step, NOT_DECODED included


@dataclass(frozen=True)
class Trace(Estimator):
    name = "trace"
    trace_steps = True
    random = False

    def copies(self, traj, spec: RowSpec, gen=None) -> list[NoisyCopy]:
        P, n = len(traj.prompt_ids), len(traj.token_ids)
        if len(traj.step_map) != n:
            raise ValueError(f"step_map has {len(traj.step_map)} entries for {n} tokens")
        steps = torch.tensor(list(traj.step_map), dtype=torch.long, device=HOST)
        gen_pos = torch.arange(P, P + n, device=HOST)
        # rounds are per block (absolute blocks), or over the whole response
        full = spec.block_size is None
        group = torch.zeros_like(gen_pos) if full else gen_pos // spec.block_size
        shrunk, round_of = trace_ranks(steps, group, spec.shrinkage)
        last = int(round_of.max()) if n else 0
        after = _after_eos_masks(traj, steps, group, round_of, last)
        return [NoisyCopy(round_of >= r, torch.where(round_of == r, shrunk, -1), None,
                          after[r - 1])
                for r in range(1, last + 1)]


def _after_eos_masks(traj, steps, group, round_of, last: int) -> torch.Tensor:
    """[last, A] bool: the after-EOS context [MASK]ed in each round: what the sampler had masked
    at the round's first step in the EOS block (its group). A position is masked iff its step is
    >= that step, as a response token is (with shrinkage a round starts at its run's first raw
    step); a round the EOS block does not have leaves it clean (that copy does not hold it)."""
    after = torch.tensor(list(getattr(traj, "after_eos_steps", [])), dtype=torch.long,
                         device=HOST)
    if after.numel() != len(getattr(traj, "after_eos_ids", [])):
        raise ValueError(f"after_eos_steps has {after.numel()} entries for "
                         f"{len(traj.after_eos_ids)} after-EOS tokens")
    if after.numel() == 0 or last == 0:
        return torch.zeros(last, after.numel(), dtype=torch.bool, device=HOST)
    eos_block = group == group[-1]
    start = torch.full((last + 1,), _NO_ROUND, dtype=torch.long, device=HOST).scatter_reduce(
        0, round_of[eos_block], steps[eos_block], "amin")
    return after[None, :] >= start[1:, None]
