"""The baselines (SPEC 4.5): random masking, coupled-GRPO (DiffuCoder) and diffu-GRPO (d1), each
its estimator with the neutral GRPO-style defaults of RLConfig (not tuned to their papers' runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class RandomMaskConfig(RLConfig):
    """Random-masking RL: one noisy copy per completion at t ~ U(eps, 1), GRPO advantages."""

    algo: ClassVar[str] = "random_mask"
    estimator: str = _same("estimator", "random_mask")


@dataclass
class CoupledGRPOConfig(RLConfig):
    """Coupled-GRPO (DiffuCoder): two complementary masks per completion, GRPO advantages."""

    algo: ClassVar[str] = "coupled_grpo"
    estimator: str = _same("estimator", "coupled")


@dataclass
class DiffuGRPOConfig(RLConfig):
    """diffu-GRPO (d1): the whole completion masked, the prompt masked at random (15 %)."""

    algo: ClassVar[str] = "diffu_grpo"
    estimator: str = _same("estimator", "diffu_grpo")
