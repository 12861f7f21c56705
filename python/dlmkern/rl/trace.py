"""Trace steps and rounds (SPEC 4.1), shared by TraceRL and DiPO.

A trajectory's step map gives, for every generated token, the global denoising step at which the
sampler unmasked it. Shrinkage s merges each block's consecutive distinct steps in groups of s
(every id becomes its group's maximum), trading fidelity for fewer rounds. Round r of a block is
its r-th smallest (shrunk) step m: the tokens decoded at m are trained, the tokens decoded at m or
later are [MASK] in noisy copy r, the earlier ones keep their values - exactly what the sampler saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.ops.layouts import response_block_span


def response_blocks(prompt_len: int, n_gen: int, block_size: int) -> list[list[int]]:
    """Indices (into the generated tokens) of each block holding generated tokens, blocks
    aligned to absolute positions (a prompt ending mid-block shares its last block)."""
    first, n_blocks = response_block_span(prompt_len, prompt_len + n_gen, block_size)
    return [list(range(max(b * block_size - prompt_len, 0),
                       min((b + 1) * block_size - prompt_len, n_gen)))
            for b in range(first, first + n_blocks)]


def trace_ranks(step_map: torch.Tensor, group: torch.Tensor,
                shrinkage: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The one owner of shrinkage and rounds, vectorised. Per token (step_map [n] and group
    id [n], both int64): its shrunk step id, and its round (1-based): the rank of that shrunk id
    among its group's distinct shrunk ids."""
    if shrinkage < 1:
        raise ValueError(f"shrinkage must be >= 1, got {shrinkage}")
    if step_map.numel() == 0:
        return step_map.clone(), step_map.clone()
    lo = step_map.min()
    span = step_map.max() - lo + 1
    # distinct (group, step) pairs, sorted by group then step
    pairs, inverse = torch.unique(group * span + (step_map - lo), return_inverse=True)
    pair_group = torch.div(pairs, span, rounding_mode="floor")
    idx = torch.arange(pairs.numel(), device=pairs.device)
    new = torch.ones_like(pair_group, dtype=torch.bool)
    new[1:] = pair_group[1:] != pair_group[:-1]
    start = torch.cummax(torch.where(new, idx, 0), 0).values      # group's first pair
    last = torch.flip(torch.cummin(torch.flip(torch.where(
        torch.roll(new, -1), idx, pairs.numel()), [0]), 0).values, [0])  # group's last pair
    rank = idx - start
    run_end = torch.minimum(start + (rank // shrinkage) * shrinkage + shrinkage - 1, last)
    shrunk = pairs[run_end] - pair_group[run_end] * span + lo
    return shrunk[inverse], (rank // shrinkage + 1)[inverse]


def _group_ids(groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token indices, group id of each) of index groups, as int64 host tensors."""
    idx = torch.tensor([i for g in groups for i in g], dtype=torch.int64, device=HOST)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.int64, device=HOST)
    return idx, torch.repeat_interleave(torch.arange(len(groups), device=HOST), sizes)


def shrink(step_map: list[int], groups: list[list[int]], s: int) -> list[int]:
    """Shrinkage: within each group of token indices (a block, or the whole response for
    full-attention models) sort the distinct step ids, cut them into consecutive runs of s and
    replace each id by its run's maximum."""
    if s < 1:
        raise ValueError(f"shrinkage must be >= 1, got {s}")
    out = torch.tensor(step_map, dtype=torch.int64, device=HOST)
    idx, gid = _group_ids(groups)
    out[idx] = trace_ranks(out[idx], gid, s)[0]
    return out.tolist()


@dataclass
class Round:
    """One round of one group (block): the tokens it trains and the tokens masked in its copy."""

    group: int             # block index (in response_blocks order) or 0 for full attention
    round: int             # 1-based
    step: int              # the (shrunk) step id m of this round
    trained: list[int]     # generated-token indices with step == m
    masked: list[int]      # generated-token indices with step >= m (includes `trained`)


def trace_rounds(step_map: list[int], groups: list[list[int]]) -> list[list[Round]]:
    """Rounds of every group, in order of their step ids (use shrunk step maps)."""
    steps = torch.tensor(step_map, dtype=torch.int64, device=HOST)
    idx, gid = _group_ids(groups)
    step_of, round_of = trace_ranks(steps[idx], gid)
    out = []
    for g in range(len(groups)):
        sel = gid == g
        tok, st, rd = idx[sel], step_of[sel], round_of[sel]
        out.append([Round(g, r, int(st[rd == r][0]), tok[rd == r].tolist(), tok[rd >= r].tolist())
                    for r in range(1, int(rd.max()) + 1 if tok.numel() else 1)])
    return out
