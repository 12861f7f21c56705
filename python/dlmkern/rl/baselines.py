"""Rows of the baseline RL estimators (SPEC 4.5), selectable in the same trainer:

- ``random_mask``: one noisy copy per trajectory, each response token masked with probability
  t ~ U(eps, 1); masked tokens are trained (random-masking RL).
- ``coupled``: coupled-GRPO (DiffuCoder): two complementary random masks, so every response token
  is trained exactly once across the pair.
- ``diffu_grpo``: d1's one-step estimate: the whole response masked, the prompt randomly masked
  with probability ``prompt_mask_ratio``; every response token is trained.

Block models get [prompt + clean response | noisy_1 | ...] packed rows (every noisy copy holds
every response block); full-attention models get one row per noisy copy.
"""

from __future__ import annotations

import torch

from dlmkern._host import HOST
from dlmkern.ops import layouts
from dlmkern.rl.rows import Rows, _cat
from dlmkern.rl.trace import response_blocks

ESTIMATORS = ("trace", "random_mask", "coupled", "diffu_grpo")


def _mask_sets(kind: str, n: int, gen: torch.Generator, eps: float = 1e-3):
    if kind == "random_mask":
        t = eps + (1 - eps) * float(torch.rand((), generator=gen, device=HOST))
        return [set((torch.rand(n, generator=gen, device=HOST) < t).nonzero().flatten().tolist())]
    if kind == "coupled":
        t = eps + (1 - eps) * float(torch.rand((), generator=gen, device=HOST))
        m = set((torch.rand(n, generator=gen, device=HOST) < t).nonzero().flatten().tolist())
        return [m, set(range(n)) - m]
    if kind == "diffu_grpo":
        return [set(range(n))]
    raise ValueError(f"unknown estimator {kind!r}; expected one of {ESTIMATORS}")


def baseline_rows(kind: str, trajectories, mask_token_id: int,
                  gen: torch.Generator | list[torch.Generator],
                  block_size: int | None = None, prompt_mask_ratio: float = 0.15) -> Rows:
    """Rows for estimator `kind` (block model when block_size is given, else full attention).
    Every trained token's `step` is its noisy-copy index (there is no trace here). `gen`: one
    generator for every trajectory's masks, or a list with one per trajectory (what the trainer
    passes, so a trajectory's masks do not depend on which others share its batch)."""
    ids, rows, lens, prompt_lens, block_rounds = [], [], [], [], []
    tr_traj, tr_step, tr_gen, tr_tgt = [], [], [], []
    offset = 0
    gens = gen if isinstance(gen, (list, tuple)) else [gen] * len(trajectories)
    if len(gens) != len(trajectories):
        raise ValueError(f"baseline_rows: {len(gens)} generators for {len(trajectories)} "
                         "trajectories")
    for ti, (t, gen) in enumerate(zip(trajectories, gens, strict=True)):
        P, n = len(t.prompt_ids), len(t.token_ids)
        clean = list(t.prompt_ids) + list(t.token_ids)
        sets = [s for s in _mask_sets(kind, n, gen) if s] if n else []
        if block_size is not None:
            seq = list(clean)
            first = (P // block_size) * block_size
            for c, masked in enumerate(sets):
                for pos in range(first, P + n):
                    is_masked = pos >= P and (pos - P) in masked
                    if is_masked:
                        rows.append(offset + len(seq))
                        tr_traj.append(ti)
                        tr_step.append(c)
                        tr_gen.append(pos - P)
                        tr_tgt.append(clean[pos])
                    seq.append(mask_token_id if is_masked else clean[pos])
            ids.append(seq)
            offset += len(seq)
            prompt_lens.append(P)
            lens.append(P + n)
            block_rounds.append([len(sets)] * len(response_blocks(P, n, block_size)))
        else:
            for c, masked in enumerate(sets):
                prompt = list(t.prompt_ids)
                if kind == "diffu_grpo" and prompt_mask_ratio > 0:
                    pm = (torch.rand(P, generator=gen, device=HOST) < prompt_mask_ratio).tolist()
                    prompt = [mask_token_id if m else x for x, m in zip(prompt, pm, strict=True)]
                row = prompt + [mask_token_id if i in masked else x
                                for i, x in enumerate(t.token_ids)]
                for i in sorted(masked):
                    rows.append(offset + P + i)
                    tr_traj.append(ti)
                    tr_step.append(c)
                    tr_gen.append(i)
                    tr_tgt.append(clean[P + i])
                ids.append(row)
                lens.append(P + n)
                offset += P + n
    if block_size is not None:
        lay = layouts.packed_rounds(prompt_lens, lens, block_size, block_rounds)
    else:
        lay = layouts.full(lens)
    return Rows(_cat(ids), lay, _cat([rows]), _cat([tr_tgt]), _cat([tr_traj]), _cat([tr_step]),
                _cat([tr_gen]))
