"""Preemption: a cluster's SIGTERM (or the SIGUSR1 a scheduler sends ahead of its deadline, e.g.
SLURM's --signal=USR1@120) ends a run with a checkpoint instead of losing every step since the
last periodic save. The signal handler only records the signal; the training loop asks once per
step whether any rank got one (one all-reduce: torchrun forwards SIGTERM to every worker, but
not at the same instant), finishes that step, writes output_dir/checkpoint-<step> on every rank
(a periodic checkpoint: keep_last applies, final is not written) and raises Preempted, a
SystemExit with code 0: the process exits 0 with a message naming the checkpoint, and
existing_output_dir: resume (or resume_from) continues the run bit-exactly."""

from __future__ import annotations

import signal
import threading

from dlmkern import distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by ``train()`` once a preemption checkpoint is written. Uncaught it ends the
    process with exit status 0 (as ``sys.exit(0)`` does; ``except Exception`` does not catch it),
    so nothing meant for a finished run (an export, an evaluation) runs on a partial one; catch
    it to do something else. ``checkpoint``: the checkpoint directory; ``step``: steps trained;
    ``signal_name``: the signal that asked for it (received by some rank)."""

    def __init__(self, checkpoint: str, step: int, signal_name: str):
        super().__init__(0)
        self.checkpoint, self.step, self.signal_name = checkpoint, step, signal_name

    def __str__(self) -> str:
        return (f"preempted ({self.signal_name}) after step {self.step}: checkpoint written to "
                f"{self.checkpoint}; continue with existing_output_dir: resume (or resume_from "
                f"{self.checkpoint})")


class PreemptionWatch:
    """Inside the block, SIGTERM and SIGUSR1 are recorded instead of ending the process; the
    handlers in place before are restored when it ends. Handlers can only be set from the main
    thread: elsewhere nothing is recorded (the process keeps its handlers)."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.received: int | None = None  # the first signal this process received
        self._previous: dict = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: a handler not set from Python, which cannot be put back; the default
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:  # async-signal context: record, nothing else
        if self.received is None:
            self.received = signum

    def requested(self) -> bool:
        """Whether any rank received a signal. A collective when distributed: every rank calls
        it once per step, so all of them stop after the same step."""
        mine = self.received is not None
        return distributed.all_sum(float(mine)) > 0 if distributed.enabled() else mine

    def stop(self, trainer, saved: str | None = None):
        """Writes the preemption checkpoint (`saved`: this step's periodic one, already written),
        draws the curves and closes the logger (trainer.finish_logs), prints where the checkpoint
        is (rank 0) and raises Preempted. Collective."""
        path = saved or trainer.save_periodic()
        got = [s for s in distributed.all_gather(self.received) if s is not None]
        err = Preempted(path, trainer.step, signal.Signals(got[0]).name)
        trainer.finish_logs()  # the curves of the steps done, the logger closed
        trainer.logger.warn(str(err))
        raise err
