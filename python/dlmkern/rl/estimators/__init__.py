"""RL estimators (SPEC 4.5), selectable in the same trainer. A new estimator is one file (an
Estimator subclass: what each noisy copy masks and trains) plus one line in ESTIMATORS."""

from __future__ import annotations

from dataclasses import fields

from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec
from dlmkern.rl.estimators.block_stratified import BlockStratified
from dlmkern.rl.estimators.blockwise import Blockwise
from dlmkern.rl.estimators.coupled import Coupled
from dlmkern.rl.estimators.diffu_grpo import DiffuGRPO
from dlmkern.rl.estimators.elbo_mc import ElboMC
from dlmkern.rl.estimators.mdpo import MDPOSteps
from dlmkern.rl.estimators.quadrature import Quadrature
from dlmkern.rl.estimators.random_mask import RandomMask
from dlmkern.rl.estimators.stratified import Stratified
from dlmkern.rl.estimators.trace import Trace
from dlmkern.rl.estimators.tree import TreeSegments

ESTIMATORS: dict[str, type[Estimator]] = {
    "trace": Trace,
    "random_mask": RandomMask,
    "coupled": Coupled,
    "diffu_grpo": DiffuGRPO,
    "elbo_mc": ElboMC,
    "quadrature": Quadrature,
    "blockwise": Blockwise,
    "stratified": Stratified,
    "block_stratified": BlockStratified,
    "tree": TreeSegments,
    "mdpo": MDPOSteps,
}


def get(name: str, **options) -> Estimator:
    """Estimator `name`, built with `options` (its fields, e.g. prompt_mask_ratio, num_masks;
    a trainer passes the RLConfig keys of those names: from_config)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](**options)


def from_config(cfg) -> Estimator:
    """The estimator of an RLConfig: ``cfg.estimator``, its options read from the config keys
    of the same names (e.g. num_masks, gen_block_length)."""
    if cfg.estimator not in ESTIMATORS:
        return get(cfg.estimator)  # the unknown-estimator error
    names = {f.name for f in fields(ESTIMATORS[cfg.estimator])}
    return get(cfg.estimator, **{k: getattr(cfg, k) for k in names if hasattr(cfg, k)})


def readers(key: str) -> list[str]:
    """The estimators that have an option (a field) named `key`."""
    return [name for name, cls in ESTIMATORS.items() if key in {f.name for f in fields(cls)}]


__all__ = ["ESTIMATORS", "BlockStratified", "Blockwise", "Coupled", "DiffuGRPO", "ElboMC",
           "Estimator", "MDPOSteps", "NoisyCopy", "Quadrature", "RandomMask", "RowSpec",
           "Stratified", "Trace", "TreeSegments", "from_config", "get", "readers"]
