"""Trace steps and rounds (SPEC 4.1), shared by TraceRL and DiPO.

A trajectory's step map gives, for every generated token, the global denoising step at which the
sampler unmasked it. Shrinkage s merges each block's consecutive distinct steps in groups of s
(every id becomes its group's maximum), trading fidelity for fewer rounds. Round r of a block is
its r-th smallest (shrunk) step m: the tokens decoded at m are trained, the tokens decoded at m or
later are [MASK] in noisy copy r, the earlier ones keep their values - exactly what the sampler saw.
"""

from __future__ import annotations

from dataclasses import dataclass


def response_blocks(prompt_len: int, n_gen: int, block_size: int) -> list[list[int]]:
    """Indices (into the generated tokens) of each block holding generated tokens, blocks
    aligned to absolute positions (a prompt ending mid-block shares its last block)."""
    blocks: dict[int, list[int]] = {}
    for i in range(n_gen):
        blocks.setdefault((prompt_len + i) // block_size, []).append(i)
    return [blocks[b] for b in sorted(blocks)]


def shrink(step_map: list[int], groups: list[list[int]], s: int) -> list[int]:
    """Shrinkage: within each group of token indices (a block, or the whole response for
    full-attention models) sort the distinct step ids, cut them into consecutive runs of s and
    replace each id by its run's maximum."""
    if s < 1:
        raise ValueError(f"shrinkage must be >= 1, got {s}")
    out = list(step_map)
    for idx in groups:
        distinct = sorted({step_map[i] for i in idx})
        to = {}
        for k in range(0, len(distinct), s):
            run = distinct[k:k + s]
            for v in run:
                to[v] = run[-1]
        for i in idx:
            out[i] = to[step_map[i]]
    return out


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
    out = []
    for g, idx in enumerate(groups):
        steps = sorted({step_map[i] for i in idx})
        out.append([Round(g, r + 1, m, [i for i in idx if step_map[i] == m],
                          [i for i in idx if step_map[i] >= m]) for r, m in enumerate(steps)])
    return out
