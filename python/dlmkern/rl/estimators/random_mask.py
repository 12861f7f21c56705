"""Random-masking RL: one noisy copy, each response token masked with probability
t ~ U(eps, 1); the masked tokens are trained."""

from __future__ import annotations

from dataclasses import dataclass

from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec, trained_copies, uniform_mask


@dataclass(frozen=True)
class RandomMask(Estimator):
    name = "random_mask"
    trace_steps = False
    random = True

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        n = len(traj.token_ids)
        return trained_copies([uniform_mask(n, gen)]) if n else []
