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

OFFLINE = {"sft": SFT, "vrpo": VRPO}  # run files' offline algos; config: OFFLINE[a].config_class

__all__ = ["OFFLINE", "PRESETS", "VRPO", "VRPOConfig", "CoupledGRPOConfig", "DiPO", "DiPOConfig", "DiffuGRPOConfig", "Preempted",
           "RLConfig", "RLTrainer", "RandomMaskConfig", "SFT", "SFTConfig", "TraceRL",
           "TraceRLConfig", "build_config", "load_config"]
