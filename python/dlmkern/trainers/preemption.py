"""Interrupts and preemption: Ctrl-C (SIGINT), a cluster's SIGTERM, or the SIGUSR1 a scheduler
sends ahead of its deadline (e.g. SLURM's --signal=USR1@120) end a run with a checkpoint instead of
losing every step since the last periodic save. The signal handler only records the signal (a
second Ctrl-C stops at once: KeyboardInterrupt); the training loop asks once per step whether any
rank got one (one all-reduce: torchrun forwards SIGTERM to every worker, but not at the same
instant), finishes that step, writes output_dir/checkpoint-<step> on every rank (a periodic
checkpoint: keep_last applies, final is not written), draws the curves and raises Preempted, a
SystemExit: the process exits (0, or 130 after Ctrl-C as a shell expects) with one line naming
the checkpoint and how to continue the run (existing_output_dir: resume, or resume_from), which
continues it bit-exactly."""

from __future__ import annotations

import os
import signal
import threading

from dlmkern import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
INTERRUPTED = 130  # a process ended by Ctrl-C, as shells report it (128 + SIGINT)


class Preempted(SystemExit):
    """Raised by ``train()`` once the checkpoint of a signal is written. Uncaught it ends the
    process with exit status 0 (130 after Ctrl-C), as ``sys.exit`` does (``except Exception``
    does not catch it), so nothing meant for a finished run (an export, an evaluation) runs on a
    partial one; catch it to do something else. ``checkpoint``: the checkpoint directory;
    ``step``: steps trained; ``signal_name``: the signal that asked for it (received by some
    rank); ``resume``: how to continue (a command line; default: the Python API's keys)."""

    def __init__(self, checkpoint: str, step: int, signal_name: str, resume: str | None = None):
        super().__init__(INTERRUPTED if signal_name == "SIGINT" else 0)
        self.checkpoint, self.step, self.signal_name = checkpoint, step, signal_name
        self.resume = resume or (f'existing_output_dir="resume" (or resume_from='
                                 f'"{checkpoint}")')

    def __str__(self) -> str:
        what = "interrupted" if self.signal_name == "SIGINT" else "preempted"
        sep = ":" if self.resume.startswith(("dlmkern ", "the same")) else ""
        return (f"{what} ({self.signal_name}) after step {self.step}: checkpoint written to "
                f"{self.checkpoint}; continue with{sep} {self.resume}")


class PreemptionWatch:
    """Inside the block, SIGINT, SIGTERM and SIGUSR1 are recorded instead of ending the process
    (a second SIGINT raises KeyboardInterrupt: Ctrl-C twice stops at once); the handlers in
    place before are restored when it ends. Handlers can only be set from the main thread:
    elsewhere nothing is recorded (the process keeps its handlers)."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.received: int | None = None  # the first signal this process received
        self.interrupts = 0  # SIGINTs received
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

    def _record(self, signum, frame) -> None:  # record, nothing else (but Ctrl-C twice)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            if distributed.rank() == 0:  # os.write: no reentrant buffered I/O in a handler
                os.write(2, b"\n[dlmkern] Ctrl-C: finishing this step, then a checkpoint; "
                            b"Ctrl-C again stops at once (nothing saved)\n")
        if self.received is None:
            self.received = signum

    def requested(self) -> bool:
        """Whether any rank received a signal. A collective when distributed: every rank calls
        it once per step, so all of them stop after the same step."""
        mine = self.received is not None
        return distributed.all_sum(float(mine)) > 0 if distributed.enabled() else mine

    def stop(self, trainer, saved: str | None = None):
        """Writes the checkpoint (`saved`: this step's periodic one, already written), draws the
        curves and closes the logger (trainer.finish_logs), prints where the checkpoint is and
        how to continue (rank 0: trainer.resume_command, else the Python API's keys) and raises
        Preempted. Collective."""
        path = saved or trainer.save_periodic()
        got = [s for s in distributed.all_gather(self.received) if s is not None]
        hint = getattr(trainer, "resume_command", None)
        err = Preempted(path, trainer.step, signal.Signals(got[0]).name,
                        hint(path) if hint is not None else None)
        trainer.finish_logs()  # the curves of the steps done, the logger closed
        trainer.logger.warn(str(err))
        raise err
