"""TraceRL: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class TraceRLConfig(RLConfig):
    """TraceRL: trace rows with shrinkage, groups with pass rate in [0.2, 0.8] (the
    paper's code), clipped surrogate eps 0.2, optional value model (GAE over trace steps)."""

    algo: ClassVar[str] = "tracerl"
    pass_rate_low: float = _same("pass_rate_low", 0.2)
    pass_rate_high: float = _same("pass_rate_high", 0.8)
