"""Trainers: the RL algorithms as presets of one config run by RLTrainer (TraceRL and DiPO are
RLTrainer with their preset), and the offline trainers SFT and VRPO (OFFLINE: algo -> class)."""

from dlmkern.trainers.config import SFTConfig, build_config, load_config
from dlmkern.trainers.preemption import Preempted
from dlmkern.trainers.presets import (
    PRESETS,
    BGPOConfig,
    CJGRPOConfig,
    CoupledGRPOConfig,
    DiffuGRPOConfig,
    DiPOConfig,
    DTreeRPOConfig,
    EBPOConfig,
    ESPOConfig,
    GDPOConfig,
    IGPOConfig,
    JustGRPOConfig,
    MDPOConfig,
    RandomMaskConfig,
    SPGConfig,
    TraceRLConfig,
    WD1Config,
)
from dlmkern.trainers.rl import DiPO, RLTrainer, TraceRL
from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.sft import SFT
from dlmkern.trainers.vrpo import VRPO, VRPOConfig

# the offline algorithms of run files (their configs: OFFLINE[algo].config_class)
OFFLINE = {"sft": SFT, "vrpo": VRPO}

__all__ = ["OFFLINE", "PRESETS", "SFT", "VRPO", "BGPOConfig", "CJGRPOConfig", "CoupledGRPOConfig",
           "DTreeRPOConfig", "DiPO", "DiPOConfig", "DiffuGRPOConfig", "EBPOConfig", "ESPOConfig",
           "GDPOConfig", "IGPOConfig", "JustGRPOConfig", "MDPOConfig", "Preempted", "RLConfig",
           "RLTrainer",
           "RandomMaskConfig", "SFTConfig", "SPGConfig", "TraceRL", "TraceRLConfig", "VRPOConfig",
           "WD1Config", "build_config", "load_config"]
