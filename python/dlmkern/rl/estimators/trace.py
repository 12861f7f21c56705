"""TraceRL / DiPO (SPEC 4.1): noisy copy r is round r of every block (of the whole response for
full-attention models): it masks the tokens decoded at the block's r-th (shrunk) trace step or
later and trains those decoded at it. Rows.step is the shrunk trace step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec
from dlmkern.rl.trace import trace_ranks


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
        return [NoisyCopy(round_of >= r, torch.where(round_of == r, shrunk, -1))
                for r in range(1, last + 1)]
