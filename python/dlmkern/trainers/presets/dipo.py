"""DiPO (DiRL): the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class DiPOConfig(RLConfig):
    """DiPO: group z-score, clip-higher [0.8, 1.28], KL to a frozen reference (loaded
    only when kl_coef > 0), DAPO dynamic sampling with oversampling, token-mean loss."""

    algo: ClassVar[str] = "dipo"
    eps_high: float = _same("eps_high", 0.28)
    kl_to: str = _same("kl_to", "ref")
    dynamic_sampling: bool = _same("dynamic_sampling", True)
