"""SPG's block-wise masking (Wang et al. 2025, "SPG: Sandwiched Policy Gradient for Masked
Diffusion Language Models"; github.com/facebookresearch/SPG, forward_type block_random): each
of ``num_masks`` noisy copies picks one block of the completion; the blocks before it stay
clean, k ~ U{1..len} of its tokens are masked (t = k / len), every later block is masked
whole, and every masked token is trained. This mirrors the semi-autoregressive sampler: the
blocks are the model's own (block models: position // block_size, as the sampler aligns them)
or the sampler's ``gen_block_length`` blocks of the completion (full-attention models).

Choices: the copies pick distinct blocks while the completion has enough (a random order of
its blocks, cycled), as the authors' permutation does; the authors also mask the clean context
(prompt and earlier blocks) at 15 % (use_mask_prompt), which is left out here (block models
share one clean prompt between copies). On block models a fully masked later block sees the
clean blocks before it (the block-causal rows), as the model's own likelihood factorises."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec, exact_mask


def completion_blocks(P: int, n: int, spec: RowSpec, gen_block_length: int) -> torch.Tensor:
    """[n] the block (0, 1, ... within the completion) of each generated token: block models
    (P + i) // block_size less the prompt's, full attention i // gen_block_length."""
    i = torch.arange(n, device=HOST)
    if spec.block_size is None:
        return i // gen_block_length
    return (P + i) // spec.block_size - P // spec.block_size


@dataclass(frozen=True)
class BlockCopies(Estimator):
    """Base of the estimators whose ``num_masks`` copies mask by completion block (blockwise,
    block_stratified): the options, their checks, and the blocks of a trajectory."""

    num_masks: int = 2
    gen_block_length: int = 32  # full-attention models' blocks (block models use block_size)

    trace_steps = False
    random = True

    def __post_init__(self):
        if self.num_masks < 1 or self.gen_block_length < 1:
            raise ValueError(f"{self.name}: num_masks ({self.num_masks}) and gen_block_length "
                             f"({self.gen_block_length}) must be >= 1")

    def blocks(self, traj, spec: RowSpec) -> tuple[int, torch.Tensor, int]:
        """(n generated tokens, [n] completion block of each, number of blocks); n may be 0."""
        P, n = len(traj.prompt_ids), len(traj.token_ids)
        if not n:
            return 0, torch.zeros(0, dtype=torch.long, device=HOST), 0
        block = completion_blocks(P, n, spec, self.gen_block_length)
        return n, block, int(block[-1]) + 1


@dataclass(frozen=True)
class Blockwise(BlockCopies):
    name = "blockwise"

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        n, block, n_blocks = self.blocks(traj, spec)
        if not n:
            return []
        order = torch.randperm(n_blocks, generator=gen, device=HOST)
        out = []
        for c in range(self.num_masks):
            b = int(order[c % n_blocks])
            inside = (block == b).nonzero().squeeze(1)
            k = int(torch.randint(1, inside.numel() + 1, (), generator=gen, device=HOST))
            masked = block > b
            masked[inside[exact_mask(inside.numel(), k, gen)]] = True
            out.append(NoisyCopy(masked, torch.where(masked, c, -1).long()))
        return out
