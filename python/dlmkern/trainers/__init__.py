"""Trainers: the RL algorithms as presets of one config run by RLTrainer (TraceRL and DiPO are
RLTrainer with their preset), and the offline trainers SFT and VRPO (OFFLINE: algo -> class)."""

from dlmkern.trainers.config import SFTConfig, build_config, load_config
from dlmkern.trainers.preemption import Preempted
from dlmkern.trainers.rl import DiPO, RLTrainer, TraceRL
from dlmkern.trainers.rl_config import (
    PRESETS,
    CoupledGRPOConfig,
    DiffuGRPOConfig,
    DiPOConfig,
    RandomMaskConfig,
    RLConfig,
    TraceRLConfig,
)
from dlmkern.trainers.sft import SFT
from dlmkern.trainers.vrpo import VRPO, VRPOConfig

# the offline algorithms of run files (their configs: OFFLINE[algo].config_class)
OFFLINE = {"sft": SFT, "vrpo": VRPO}

__all__ = ["OFFLINE", "PRESETS", "VRPO", "CoupledGRPOConfig", "DiPO", "DiPOConfig",
           "DiffuGRPOConfig", "Preempted", "RLConfig", "RLTrainer", "RandomMaskConfig", "SFT",
           "SFTConfig", "TraceRL", "TraceRLConfig", "VRPOConfig", "build_config", "load_config"]
