"""Memory planning at real size without a GPU (SPEC 9): dlmkern's real RL step on fake tensors
under torch's memory tracker, per rank and stage (`dlmkern plan`)."""

from dlmkern.plan.step import STAGES, PlannedRun, run_tracked
from dlmkern.plan.tracker import StageTracker

__all__ = ["STAGES", "PlannedRun", "StageTracker", "run_tracked"]
