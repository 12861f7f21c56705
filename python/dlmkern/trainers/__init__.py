"""Trainers: TraceRL, DiPO (RL, SPEC 4.3 / 4.4) and SFT (SPEC 4.5)."""

from dlmkern.trainers.config import RLConfig, SFTConfig, build_config, load_config
from dlmkern.trainers.rl import DiPO, RLTrainer, TraceRL
from dlmkern.trainers.sft import SFT

__all__ = ["DiPO", "RLConfig", "RLTrainer", "SFT", "SFTConfig", "TraceRL", "build_config",
           "load_config"]
