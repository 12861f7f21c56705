"""The trajectories a sampler hands back while dlmkern.plan runs a step on fake tensors.

The planner cannot read the sampled tokens, so it decides them: the worst case for memory. Every
sequence runs to its length limit (no EOS) and every block uses its whole step budget, each step
unmasking at least one token (the most distinct step ids, so the most trace rounds: a static or
sequential rule takes min(steps, tokens) steps per block, a dynamic or entropy-bounded rule one
token per step). Blocks are the samplers' own: absolute positions for block models (a prompt tail
shares the first block), the generation blocks of the response for full-attention models.
"""

from __future__ import annotations

import torch

from dlmkern._host import HOST, on_host
from dlmkern.ops import layouts
from dlmkern.sampling.block import Trajectory
from dlmkern.sampling.rules import SamplingConfig

PLANNED_TOKEN = 0  # stands for every sampled token (never the EOS id: the sequence goes on)


def _steps_per_block(cfg: SamplingConfig, n: int) -> int:
    return min(cfg.steps, n) if cfg.rule in ("static", "sequential") else n


def _fill(t: Trajectory, spans, cfg: SamplingConfig) -> Trajectory:
    step = 0
    for a, e in spans:
        n = e - a
        k = _steps_per_block(cfg, n)
        t.step_map += [step + j * k // n for j in range(n)]
        step += k
    t.token_ids = [PLANNED_TOKEN] * len(t.step_map)
    t.logprobs = [0.0] * len(t.step_map)
    t.finish_reason = "length"
    return t


def block_trajectory(prompt: list[int], max_new_tokens: int, block: int,
                     cfg: SamplingConfig) -> Trajectory:
    """A block sampler's worst-case trajectory: blocks aligned to absolute positions."""
    P, end = len(prompt), len(prompt) + max_new_tokens
    first, n_blocks = layouts.response_block_span(P, end, block)
    spans = [(max(P, b * block), min(end, (b + 1) * block))
             for b in range(first, first + n_blocks)]
    return _fill(Trajectory(list(prompt)), spans, cfg)


@on_host
def full_trajectory(prompt: list[int], gen_length: int, block_length: int,
                    cfg: SamplingConfig, record_predictions: bool = False) -> Trajectory:
    """A full-attention sampler's worst-case trajectory: generation blocks of the response
    (record_predictions: a decoded completion of planned tokens at every step, MDPO)."""
    spans = [(lo, min(lo + block_length, gen_length)) for lo in range(0, gen_length, block_length)]
    t = _fill(Trajectory(list(prompt)), spans, cfg)
    if record_predictions:
        steps = max(t.step_map) + 1
        t.step_predictions = torch.full((steps, gen_length), PLANNED_TOKEN, dtype=torch.int32,
                                        device=HOST)
        t.prediction_steps = list(range(steps))
    return t
