"""Code reward (SPEC 5): run a candidate program against tests in the sandbox (`sandbox.py`).

A test passes only when the harness reaches the end of it: the trainer hands each run a fresh
random key on fd 4, the harness reads (and closes) it before the candidate's code runs and writes
it to fd 3 only after the test's last statement finished. An exit status of 0, a SystemExit(0),
an os._exit(0) or anything printed never counts. Each test runs in its own sandbox with its own
key, so partial credit (the fraction of tests passed) carries the same proof.
"""

from __future__ import annotations

import re
import secrets

from dlmkern.rewards.pool import run_bounded
from dlmkern.rewards.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    require_sandbox,
    run_sandboxed,
    sandbox_available,
    warn_once,
)

__all__ = ["SandboxLimits", "SandboxUnavailable", "code_reward", "extract_code",
           "network_isolation_available", "run_program", "run_test"]

# Runs in the sandbox as `python -I -S -c HARNESS`. Everything it uses after the candidate's code
# is bound before that code runs (the candidate may replace builtins or module attributes), and
# tracing hooks the candidate installed are removed before the test runs.
HARNESS = r"""
def _harness():
    import os, sys, threading
    read, write, close, settrace, setprofile = os.read, os.write, os.close, sys.settrace, \
        sys.setprofile
    key = b""
    while True:
        chunk = read(4, 4096)
        if not chunk:
            break
        key += chunk
    close(4)
    codes = []
    for name in ("main.py", "test.py"):
        with open(name) as f:
            codes.append(compile(f.read(), name, "exec"))
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    run = exec
    run(codes[0], ns)
    settrace(None)
    setprofile(None)
    threading.settrace(None)
    threading.setprofile(None)
    run(codes[1], ns)
    write(3, key)
_harness()
"""


def network_isolation_available() -> bool:
    """Whether candidate programs can be isolated here (network included); probed once."""
    return sandbox_available()


def run_program(source: str, stdin: str = "", limits: SandboxLimits | None = None):
    """Runs Python `source` in the sandbox. Returns (exit code, or None on timeout or a failed
    launch; stdout, at most limits.output_kb KiB). Raises SandboxUnavailable where no sandbox can
    be made."""
    res = run_sandboxed(["main.py"], {"main.py": source}, stdin, limits)
    if res.setup_error:
        warn_once(f"dlmkern code sandbox: a run could not start: {res.setup_error}")
    return res.exit_code, res.stdout.decode(errors="replace")


def run_test(code: str, test: str, limits: SandboxLimits | None = None) -> bool:
    """Whether `test` (statements, e.g. asserts) ran to its end after `code`, proven by the run's
    key, with exit status 0 and within the limits."""
    key = secrets.token_hex(32).encode()
    res = run_sandboxed(["-c", HARNESS], {"main.py": code, "test.py": test}, "", limits, key)
    if res.setup_error:
        warn_once(f"dlmkern code sandbox: a run could not start: {res.setup_error}")
    return res.exit_code == 0 and secrets.compare_digest(res.proof, key)


def extract_code(completion: str) -> str:
    """The last ```python fenced block of a completion (or the whole text if there is none)."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", completion, flags=re.S)
    return blocks[-1] if blocks else completion


def code_reward(prompts: list, completions: list[str], tests: list, *,
                limits: SandboxLimits | None = None, workers: int | None = None,
                **_columns) -> list[float]:
    """Fraction of a sample's tests passed. `tests[i]` is a list of test snippets (asserts) run
    after the candidate program, each in its own sandbox with its own proof key; up to `workers`
    sandbox runs at a time (default: one per CPU, or $DLMKERN_REWARD_WORKERS)."""
    cases = [[c] if isinstance(c, str) else list(c) for c in tests]
    jobs = [(extract_code(completion), case, limits)
            for completion, own in zip(completions, cases, strict=True) for case in own]
    if jobs:
        require_sandbox()  # raises here, before any thread starts
    passed = iter(run_bounded(run_test, jobs, workers))
    return [sum(next(passed) for _ in own) / len(own) if own else 0.0 for own in cases]
