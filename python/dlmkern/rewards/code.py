"""Code reward (SPEC 5): a candidate program against its tests, decided outside its process.

stdin/stdout tests: the program runs in the sandbox (`sandbox.py`) and the trainer compares what
it printed with the expected output. Assert-style tests: a trusted driver sandbox executes the
test statements and calls the program's functions in the program's own sandbox through the
trainer, literals crossing both ways (`verdict.py`); the program's process holds nothing that
decides its reward. Exit statuses, printed text and anything written to an fd never count. The
reward is the fraction of a completion's tests passed.
"""

from __future__ import annotations

import re

from dlmkern.rewards.code_tests import (
    VACUOUS,
    IOTest,
    assert_test_problem,
    parse_tests,
    same_output,
)
from dlmkern.rewards.pool import run_bounded
from dlmkern.rewards.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    require_sandbox,
    run_sandboxed,
    sandbox_available,
    warn_once,
)
from dlmkern.rewards.verdict import run_assert_tests

__all__ = ["SandboxLimits", "SandboxUnavailable", "code_reward", "extract_code",
           "network_isolation_available", "run_program", "run_test"]


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


def _io_passed(code: str, test: IOTest, limits: SandboxLimits | None) -> bool:
    exit_code, printed = run_program(code, test.stdin, limits)
    return exit_code == 0 and same_output(printed, test.stdout)


def _asserts_passed(code: str, tests: list[str], limits: SandboxLimits | None) -> list[bool]:
    verdict = run_assert_tests(code, tests, limits or SandboxLimits())
    for why in verdict.setup_errors:
        warn_once(f"dlmkern code sandbox: a run could not start: {why}")
    if verdict.error:
        warn_once(f"dlmkern code reward: no verdict for a program's tests: {verdict.error}")
    for test, why in zip(tests, verdict.unsupported, strict=True):
        if why:
            warn_once(f"dlmkern code reward: a test fails for every program (it {why}): "
                      f"{test!r:.120}")
    return verdict.passed


def _warn_vacuous(cases: list) -> None:
    for own in cases:
        for t in own:
            if isinstance(t, str) and assert_test_problem(t) == VACUOUS:
                warn_once(f"dlmkern code reward: a test {VACUOUS} (dataset loading refuses it): "
                          f"{t!r:.120}")


def run_test(code: str, test: str | dict, limits: SandboxLimits | None = None) -> bool:
    """Whether one test (assert statements, or {"input", "output"}) passes against `code`."""
    (case,) = parse_tests([test], "test", vacuous=True)
    _warn_vacuous([[case]])
    require_sandbox()
    if isinstance(case, IOTest):
        return _io_passed(code, case, limits)
    return _asserts_passed(code, [case], limits)[0]


def extract_code(completion: str) -> str:
    """The last ```python fenced block of a completion (or the whole text if there is none)."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", completion, flags=re.S)
    return blocks[-1] if blocks else completion


def _job(code: str, tests: list, limits) -> int:
    """How many of one completion's tests (all assert-style, or one stdin/stdout) pass."""
    if isinstance(tests, IOTest):
        return int(_io_passed(code, tests, limits))
    return sum(_asserts_passed(code, tests, limits))


def code_reward(prompts: list, completions: list[str], tests: list, *,
                limits: SandboxLimits | None = None, workers: int | None = None,
                **_columns) -> list[float]:
    """Fraction of a sample's tests passed. `tests[i]`: a test or a list of tests (assert
    statements as text, or {"input": stdin, "output": expected stdout}); a test the reward
    cannot decide soundly is a ValueError (see code_tests.py). A completion's assert tests share
    one program sandbox and one driver sandbox; each stdin/stdout test is one run. Up to
    `workers` completions (or stdin/stdout runs) at a time (default: one per CPU, or
    $DLMKERN_REWARD_WORKERS)."""
    cases = [parse_tests(t, f"tests[{i}]", vacuous=True) for i, t in enumerate(tests)]
    _warn_vacuous(cases)
    jobs, owner = [], []
    for i, (completion, own) in enumerate(zip(completions, cases, strict=True)):
        code = extract_code(completion)
        asserts = [t for t in own if isinstance(t, str)]
        for part in ([asserts] if asserts else []) + [t for t in own if isinstance(t, IOTest)]:
            jobs.append((code, part, limits))
            owner.append(i)
    if jobs:
        require_sandbox()  # raises here, before any thread starts
    passed = [0] * len(cases)
    for i, n in zip(owner, run_bounded(_job, jobs, workers), strict=True):
        passed[i] += n
    return [passed[i] / len(own) if own else 0.0 for i, own in enumerate(cases)]
