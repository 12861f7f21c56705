"""The algorithms as presets of one config: each a subclass of RLConfig whose defaults
ARE the algorithm (TRL's habit), one file each here with a docstring naming its paper, its code
and what differs from them. A run file's ``algo:`` picks the preset (``PRESETS``) and its
``trainer:`` section overrides it field by field; ``dlmkern config ALGO`` lists its keys.

A new algorithm is one file here (its config class, and its refusals in ``validate`` /
``check_model``) plus one line in ``PRESETS``; a new loss setting is a field of the Objective
(README "The objective is data"), a new way of building rows an estimator
(dlmkern.rl.estimators)."""

from __future__ import annotations

from dlmkern.trainers.presets.baselines import CoupledGRPOConfig, DiffuGRPOConfig, RandomMaskConfig
from dlmkern.trainers.presets.bgpo import BGPOConfig
from dlmkern.trainers.presets.cj_grpo import CJGRPOConfig
from dlmkern.trainers.presets.d_treerpo import DTreeRPOConfig
from dlmkern.trainers.presets.dipo import DiPOConfig
from dlmkern.trainers.presets.ebpo import EBPOConfig
from dlmkern.trainers.presets.espo import ESPOConfig
from dlmkern.trainers.presets.gdpo import GDPOConfig
from dlmkern.trainers.presets.igpo import IGPOConfig
from dlmkern.trainers.presets.justgrpo import JustGRPOConfig
from dlmkern.trainers.presets.mdpo import MDPOConfig
from dlmkern.trainers.presets.spg import SPGConfig
from dlmkern.trainers.presets.tracerl import TraceRLConfig
from dlmkern.trainers.presets.wd1 import WD1Config
from dlmkern.trainers.rl_config import RLConfig

# the run file's `algo:` -> its preset (one line per algorithm)
PRESETS: dict[str, type[RLConfig]] = {c.algo: c for c in (
    TraceRLConfig,
    DiPOConfig,
    RandomMaskConfig,
    CoupledGRPOConfig,
    DiffuGRPOConfig,
    ESPOConfig,
    GDPOConfig,
    CJGRPOConfig,
    JustGRPOConfig,
    WD1Config,
    IGPOConfig,
    SPGConfig,
    BGPOConfig,
    EBPOConfig,
    DTreeRPOConfig,
    MDPOConfig,
)}

__all__ = ["PRESETS", "BGPOConfig", "CJGRPOConfig", "CoupledGRPOConfig", "DTreeRPOConfig",
           "DiPOConfig", "DiffuGRPOConfig", "EBPOConfig", "ESPOConfig", "GDPOConfig", "IGPOConfig",
           "JustGRPOConfig", "MDPOConfig", "RandomMaskConfig", "SPGConfig", "TraceRLConfig",
           "WD1Config"]
