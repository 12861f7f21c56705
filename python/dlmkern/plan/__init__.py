"""Memory planning at real size without a GPU: dlmkern's real RL step on fake tensors
under torch's memory tracker, per rank and stage (`dlmkern plan`; in Python
``dlmkern.plan.plan("configs/x.yaml", ["model=DIR"], gpus=8, gpu_memory=80 * 2**30)``, the
object `dlmkern plan --json` writes)."""

from dlmkern.plan.command import plan, report
from dlmkern.plan.step import STAGES, PlannedRun, run_tracked
from dlmkern.plan.tracker import StageTracker

__all__ = ["STAGES", "PlannedRun", "StageTracker", "plan", "report", "run_tracked"]
