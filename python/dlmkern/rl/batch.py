"""Rows of a batch of trajectories: every trajectory's rows from its estimator, packed with
Rows.cat. block_rows / full_rows / baseline_rows: the batch forms that tests and bench/ use (the
trainer builds each trajectory's rows once and packs them per pass)."""

from __future__ import annotations

from dataclasses import fields

import torch

from dlmkern.rl.estimators import Estimator, RowSpec, Trace, get
from dlmkern.rl.rows import Rows


def batch_rows(estimator: Estimator, trajectories, spec: RowSpec,
               gen: torch.Generator | list[torch.Generator] | None = None) -> Rows:
    """`gen`: None (estimators that draw nothing), one generator drawn from by every trajectory in
    order, or one per trajectory (so a trajectory's masks do not depend on its batch)."""
    trajs = list(trajectories)
    gens = list(gen) if isinstance(gen, (list, tuple)) else [gen] * len(trajs)
    if len(gens) != len(trajs):
        raise ValueError(f"{len(gens)} generators for {len(trajs)} trajectories")
    parts = [estimator.rows(t, spec, g) for t, g in zip(trajs, gens, strict=True)]
    return Rows.cat(parts) if parts else Rows.empty(full=spec.block_size is None)


def block_rows(trajectories, block_size: int, mask_token_id: int, shrinkage: int = 1) -> Rows:
    """Packed KV-reuse trace rows for block-diffusion models. `trajectories`: objects with
    prompt_ids, token_ids and step_map (dlmkern.sampling.Trajectory)."""
    return batch_rows(Trace(), trajectories, RowSpec(mask_token_id, block_size, shrinkage))


def full_rows(trajectories, mask_token_id: int, shrinkage: int = 8) -> Rows:
    """Full-attention models: one row per (shrunk) trace step over the whole response."""
    return batch_rows(Trace(), trajectories, RowSpec(mask_token_id, None, shrinkage))


def baseline_rows(kind: str, trajectories, mask_token_id: int,
                  gen: torch.Generator | list[torch.Generator],
                  block_size: int | None = None, prompt_mask_ratio: float = 0.15) -> Rows:
    """Rows for estimator `kind` (block model when block_size is given, else full attention).
    Every trained token's `step` is its noisy-copy index. `gen`: one generator for every
    trajectory's masks, or a list with one per trajectory (what the trainer passes).
    prompt_mask_ratio goes to the estimators that have that option (diffu_grpo)."""
    est = get(kind)
    if "prompt_mask_ratio" in {f.name for f in fields(est)}:
        est = get(kind, prompt_mask_ratio=prompt_mask_ratio)
    return batch_rows(est, trajectories, RowSpec(mask_token_id, block_size), gen)
