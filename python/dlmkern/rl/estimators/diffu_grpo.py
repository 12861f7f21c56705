"""d1's diffu-GRPO one-step estimate: one noisy copy with the whole response masked (every
response token trained) and the prompt randomly masked with probability prompt_mask_ratio. Block
models mask the prompt in the clean stream and in the prompt tail of the first noisy block alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec


@dataclass(frozen=True)
class DiffuGRPO(Estimator):
    prompt_mask_ratio: float = 0.15

    name = "diffu_grpo"
    trace_steps = False

    @property
    def random(self) -> bool:
        return self.prompt_mask_ratio > 0

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        P, n = len(traj.prompt_ids), len(traj.token_ids)
        if not n:
            return []
        prompt = None
        if self.prompt_mask_ratio > 0:
            prompt = torch.rand(P, generator=gen, device=HOST) < self.prompt_mask_ratio
        return [NoisyCopy(torch.ones(n, dtype=torch.bool, device=HOST),
                          torch.zeros(n, dtype=torch.long, device=HOST), prompt)]
