"""Samplers: block diffusion with a KV cache (SDAR / TraDo), full attention (LLaDA / Dream);
unmasking rules."""

from dlmkern.sampling.block import NOT_DECODED, BlockSampler, Trajectory
from dlmkern.sampling.full import FullSampler
from dlmkern.sampling.rules import SamplingConfig, choose, sample_tokens, transfer_schedule

__all__ = ["NOT_DECODED", "BlockSampler", "FullSampler", "SamplingConfig", "Trajectory", "choose",
           "sample_tokens", "transfer_schedule"]
