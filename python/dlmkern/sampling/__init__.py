"""Samplers: block diffusion with a KV cache (SDAR / TraDo); unmasking rules."""

from dlmkern.sampling.block import BlockSampler, Trajectory
from dlmkern.sampling.rules import SamplingConfig, choose, sample_tokens, transfer_schedule

__all__ = ["BlockSampler", "SamplingConfig", "Trajectory", "choose", "sample_tokens",
           "transfer_schedule"]
