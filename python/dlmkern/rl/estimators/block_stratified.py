"""EBPO's all-block corruption (the LLaDA2.1 report's ELBO-based block-level policy
optimization; DARE's _forward_process_ebpo): each of ``num_masks`` noisy copies masks EVERY
block of the completion, block b at its own level, so one copy holds one ELBO term per block
(trained with 1 / t_b, token_weights=block_elbo). The levels of all (copy, block) cells,
copy-major, are stratified from one random offset, u_i = (offset + i / N) mod 1 over the N
cells, and a cell masks k = min(floor(u_i * len) + 1, len) of its block's tokens, chosen
uniformly. Blocks are the model's (position // block_size, the sampler's alignment); on a
full-attention model they would be gen_block_length blocks of the completion, which the
configs refuse (RLConfig.check_model: the per-block ELBO is a block-diffusion model's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import NoisyCopy, RowSpec, exact_mask
from dlmkern.rl.estimators.blockwise import BlockCopies


@dataclass(frozen=True)
class BlockStratified(BlockCopies):
    num_masks: int = 16

    name = "block_stratified"

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        n, block, n_blocks = self.blocks(traj, spec)
        if not n:
            return []
        cells = self.num_masks * n_blocks
        offset = float(torch.rand((), generator=gen, device=HOST))
        levels = ((offset + torch.arange(cells, device=HOST, dtype=torch.float64) / cells)
                  % 1.0).tolist()
        out = []
        for c in range(self.num_masks):
            masked = torch.zeros(n, dtype=torch.bool, device=HOST)
            for b in range(n_blocks):
                inside = (block == b).nonzero().squeeze(1)
                k = min(int(levels[c * n_blocks + b] * inside.numel()) + 1, inside.numel())
                masked[inside[exact_mask(inside.numel(), k, gen)]] = True
            out.append(NoisyCopy(masked, torch.where(masked, c, -1).long()))
        return out
