"""Stratified random masking (BGPO's forward process; the same draw as VRPO's): ``num_masks``
noisy copies of the whole completion whose masked counts are spread evenly over 1..n from one
random start, k_i = ((round(k + i n / M) - 1) mod n) + 1 with k ~ U{1..n}, each masking k_i
tokens chosen uniformly; every masked token is trained (copy i: Rows.step = i). The counts
cover the rates t = k_i / n evenly, a lower-variance Monte Carlo ELBO than independent rates.
Works alike for block models (rows hold the blocks a copy masks) and full attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec, exact_mask, trained_copies


@dataclass(frozen=True)
class Stratified(Estimator):
    num_masks: int = 16

    name = "stratified"
    trace_steps = False
    random = True

    def __post_init__(self):
        if self.num_masks < 1:
            raise ValueError(f"stratified: num_masks must be >= 1, got {self.num_masks}")

    def counts(self, n: int, gen) -> torch.Tensor:
        """[num_masks] masked counts in 1..n, evenly spread from a random start."""
        k = int(torch.randint(1, n + 1, (), generator=gen, device=HOST))
        x = torch.round(torch.linspace(float(k), k + (self.num_masks - 1) * n / self.num_masks,
                                       self.num_masks, device=HOST)).long()
        return (x - 1) % n + 1

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        n = len(traj.token_ids)
        if not n:
            return []
        # every count is >= 1: no copy is dropped, copy c trains at Rows.step c
        return trained_copies([exact_mask(n, k, gen) for k in self.counts(n, gen).tolist()])
