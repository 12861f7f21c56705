"""RL estimators (SPEC 4.5), selectable in the same trainer. A new estimator is one file (an
Estimator subclass: what each noisy copy masks and trains) plus one line in ESTIMATORS."""

from __future__ import annotations

from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec
from dlmkern.rl.estimators.coupled import Coupled
from dlmkern.rl.estimators.diffu_grpo import DiffuGRPO
from dlmkern.rl.estimators.elbo_mc import ElboMC
from dlmkern.rl.estimators.quadrature import Quadrature
from dlmkern.rl.estimators.random_mask import RandomMask
from dlmkern.rl.estimators.trace import Trace

ESTIMATORS: dict[str, type[Estimator]] = {
    "trace": Trace,
    "random_mask": RandomMask,
    "coupled": Coupled,
    "diffu_grpo": DiffuGRPO,
    "elbo_mc": ElboMC,
    "quadrature": Quadrature,
}


def get(name: str, **options) -> Estimator:
    """Estimator `name`, built with `options` (its fields, e.g. prompt_mask_ratio, num_masks;
    a trainer passes the RLConfig keys of those names: RLConfig.estimator_options)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](**options)


__all__ = ["ESTIMATORS", "Coupled", "DiffuGRPO", "ElboMC", "Estimator", "NoisyCopy",
           "Quadrature", "RandomMask", "RowSpec", "Trace", "get"]
