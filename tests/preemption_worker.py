"""Run by test_preemption.py: a tiny TraceRL run in OUT/run that the test interrupts, on 2 gloo
ranks under torchrun or in 1 process.

  signal    (torchrun) rank 1's reward, in step 1, writes OUT/in_step (its pid) and waits for
            OUT/go: the test sends the signal to that process meanwhile.
  finish    (torchrun) an uninterrupted run in OUT/reference, then OUT/run resumed to the end.
  killsave  (1 process) a checkpoint every step; the second save writes OUT/in_save once its
            dcp files are written and sleeps: the test kills the process there.
"""

import os
import sys
import time

from dlmkern.doctor import e2e_checks as e2e
from dlmkern.trainers import TraceRL

STEPS = 4


def trainer(out, reward=e2e.digit_share, **kw):
    return TraceRL(e2e.model("cpu"), e2e.TOK, e2e.DATA, reward,
                   e2e._rl_cfg(out, total_steps=STEPS, **kw))


def waits_in_step(out):
    """digit_share; rank 1's second call (step 1) holds the step until the test says go."""
    calls = []

    def reward(prompts, completions, **kw):
        calls.append(1)
        if len(calls) == 2 and os.environ.get("RANK") == "1":
            with open(os.path.join(out, "in_step.tmp"), "w") as f:
                f.write(str(os.getpid()))
            os.replace(os.path.join(out, "in_step.tmp"), os.path.join(out, "in_step"))
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(out, "go")) and time.monotonic() < deadline:
                time.sleep(0.02)
        return e2e.digit_share(prompts, completions, **kw)

    return reward


def pause_in_second_save(out):
    """dlmkern.models.io.save_state (the export, written after the dcp state) sleeps in the
    second save (checkpoint-2): the checkpoint's temporary directory holds dcp/ only."""
    import dlmkern.models.io as io

    real, calls = io.save_state, []

    def save_state(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            open(os.path.join(out, "in_save"), "w").close()
            time.sleep(600)
        return real(*args, **kw)

    io.save_state = save_state


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    run = os.path.join(out, "run")
    if mode == "signal":
        trainer(run, waits_in_step(out)).train()  # Preempted: exit status 0
    elif mode == "finish":
        trainer(os.path.join(out, "reference")).train()
        trainer(run, existing_output_dir="resume").train()
    elif mode == "killsave":
        pause_in_second_save(out)
        trainer(run, save_every=1, keep_last=1).train()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
