"""Samplers: block diffusion with a KV cache (SDAR / TraDo), full attention (LLaDA / Dream);
unmasking rules."""

from dlmkern.sampling.block import NOT_DECODED, BlockSampler, Trajectory
from dlmkern.sampling.full import FullSampler
from dlmkern.sampling.rules import SamplingConfig, choose, sample_tokens, transfer_schedule

__all__ = ["NOT_DECODED", "BlockSampler", "FullSampler", "SamplingConfig", "Trajectory", "choose",
           "sample_tokens", "sampler_for", "transfer_schedule"]


def sampler_for(model, cfg: SamplingConfig, max_new_tokens: int, block_length: int,
                eos_token_id: int | None, record_predictions: bool = False):
    """The sampler of `model`'s kind: BlockSampler for block-causal models (their own block
    size), FullSampler otherwise, generating in semi-autoregressive blocks of `block_length`
    (at most max_new_tokens). `record_predictions`: each step's decoded completion (MDPO;
    full-attention models only, FullSampler)."""
    if model.config.block_causal:
        if record_predictions:
            raise ValueError("record_predictions: the block sampler's state at a step holds no "
                             "later blocks (full-attention models only)")
        return BlockSampler(model, cfg, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    return FullSampler(model, cfg, gen_length=max_new_tokens,
                       block_length=min(block_length, max_new_tokens), eos_token_id=eos_token_id,
                       record_predictions=record_predictions)
