"""Coupled-GRPO (DiffuCoder): two complementary random masks (rate t ~ U(eps, 1)), so every
response token is trained exactly once across the pair."""

from __future__ import annotations

from dataclasses import dataclass

from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec, trained_copies, uniform_mask


@dataclass(frozen=True)
class Coupled(Estimator):
    name = "coupled"
    trace_steps = False
    random = True

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        n = len(traj.token_ids)
        if not n:
            return []
        m = uniform_mask(n, gen)
        return trained_copies([m, ~m])
