"""RL core: trace rounds, packed KV-reuse rows, baseline estimators' rows, advantages (SPEC 4)."""

from dlmkern.rl.advantages import group_zscore, keep_groups, trace_gae
from dlmkern.rl.baselines import ESTIMATORS, baseline_rows
from dlmkern.rl.rows import Rows, block_rows, full_rows, per_round_rows
from dlmkern.rl.trace import Round, response_blocks, shrink, trace_rounds

__all__ = [
    "ESTIMATORS", "Round", "Rows", "baseline_rows", "block_rows", "full_rows", "group_zscore",
    "keep_groups", "per_round_rows", "response_blocks", "shrink", "trace_gae", "trace_rounds",
]
