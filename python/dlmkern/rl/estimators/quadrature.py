"""GDPO's semi-deterministic Monte Carlo ELBO: the integral over the masking level t in [0, 1]
by a Gauss-Legendre rule (deterministic nodes t_k and weights w_k, sum w_k = 1), the mask at
each node drawn at random. Copy k masks exactly max(1, round(t_k n)) of the n response tokens
(a uniformly random subset) and trains them with the ELBO weight w_k / t_k, t_k realised as the
share the copy masks (NoisyCopy.weight = w_k; token_weights=elbo divides by that share): the
weighted sum of a trajectory's log-probs is sum_k w_k / t_k * (sum of its masked tokens'
log-probs), the quadrature estimate of the ELBO, and its weights sum to the length n.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec, exact_mask
from dlmkern.rl.estimators.elbo_mc import weighted_copies


@lru_cache(maxsize=16)
def gauss_legendre(k: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(nodes, weights) of the k-point Gauss-Legendre rule on [0, 1] (weights sum to 1), by
    Golub-Welsch: the nodes are the eigenvalues of the Legendre Jacobi matrix."""
    i = torch.arange(1, k, dtype=torch.float64, device=HOST)
    off = i / torch.sqrt(4 * i * i - 1)
    jac = torch.diag(off, 1) + torch.diag(off, -1)
    x, v = torch.linalg.eigh(jac)
    return tuple(((x + 1) / 2).tolist()), tuple((v[0] ** 2).tolist())


@dataclass(frozen=True)
class Quadrature(Estimator):
    quadrature_nodes: int = 3

    name = "quadrature"
    trace_steps = False
    random = True

    def __post_init__(self):
        if not 1 <= self.quadrature_nodes <= 64:
            raise ValueError(f"quadrature_nodes must lie in [1, 64], got {self.quadrature_nodes}")

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        n = len(traj.token_ids)
        if not n:
            return []
        nodes, weights = gauss_legendre(self.quadrature_nodes)
        masks = []
        for t in nodes:
            masks.append(exact_mask(n, min(n, max(1, round(t * n))), gen))
        return weighted_copies(masks, list(weights))
