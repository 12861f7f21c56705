"""RL core: trace rounds, the estimator registry and its packed KV-reuse rows, advantages
(SPEC 4)."""

from dlmkern.rl.advantages import (
    ADVANTAGES,
    group_advantages,
    group_zscore,
    keep_groups,
    trace_gae,
    wd1_weights,
)
from dlmkern.rl.batch import baseline_rows, batch_rows, block_rows, full_rows
from dlmkern.rl.estimators import ESTIMATORS, Estimator, NoisyCopy, RowSpec
from dlmkern.rl.estimators import get as get_estimator
from dlmkern.rl.rows import Rows, build_rows, per_round_rows
from dlmkern.rl.trace import Round, response_blocks, shrink, trace_rounds

__all__ = [
    "ADVANTAGES", "ESTIMATORS", "Estimator", "NoisyCopy", "Round", "RowSpec", "Rows",
    "baseline_rows", "batch_rows", "block_rows", "build_rows", "full_rows", "get_estimator",
    "group_advantages", "group_zscore", "keep_groups", "per_round_rows", "response_blocks",
    "shrink", "trace_gae", "trace_rounds", "wd1_weights",
]
