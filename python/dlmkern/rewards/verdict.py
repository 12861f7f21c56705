"""Assert-style tests decided outside the candidate's process (SPEC 5, issue #26).

Two sandboxes per completion (`sandbox.py`, each in its own namespaces, as its own uid when the
trainer is root), and the trainer between them:

- the candidate's (`_call_server.py`): runs the completion's code, then only answers requests
  (call this, read that attribute), one JSON line each; it holds nothing that decides a reward;
- the driver's (`_test_driver.py`, without the candidate's code): executes the test statements,
  the candidate's names being proxies whose requests come here; it reports the verdict.

This module relays each request to the candidate and its answer back, and is the only place the
candidate's bytes are bounded: one line per request, at most limits.output_kb KiB, within the
test's wall-clock budget (limits.wall_seconds from the test's start); otherwise the driver hears
"timeout", "too_large" or "died" (no candidate bytes), the candidate is killed and the next test
starts a fresh one. A program whose import fails or hangs fails every test. Only a well-formed
verdict from the driver followed by its exit status 0 counts; anything else fails every test.
"""

from __future__ import annotations

import functools
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, replace

from dlmkern.rewards.sandbox import Sandbox, SandboxLimits

_HERE = os.path.dirname(__file__)
DRIVER_LINE_CAP = 64 << 20   # the driver is trusted; this only bounds a bug
SLACK_SECONDS = 10.0         # the driver's start and its verdict, beyond the tests' budgets
DRIVER_MEMORY_MB = 256       # at least: it decodes answers of up to output_kb KiB
EXIT_SECONDS = 5.0           # for the driver to exit after its verdict


@dataclass
class AssertVerdict:
    passed: list[bool]
    unsupported: list[str | None]  # a test that fails for every program: why
    error: str | None = None       # why the driver gave no verdict (then every test failed)
    setup_errors: tuple = ()       # sandbox failures that were not the candidate's doing


@functools.cache
def _program(name: str) -> str:
    """A sandbox program: the literal codec's text, then the program's own."""
    texts = []
    for part in ("_literals.py", name):
        with open(os.path.join(_HERE, part)) as f:
            texts.append(f.read())
    return "\n".join(texts)


class _Lines:
    """Lines from a non-blocking pipe, with at most `cap` bytes buffered."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap, self.buf = fd, cap, bytearray()
        self.eof = self.overflow = False
        os.set_blocking(fd, False)

    def fill(self) -> None:
        while not (self.eof or self.overflow):
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self.buf += chunk
            self.overflow = len(self.buf) > self.cap and b"\n" not in self.buf[:self.cap]

    def pop(self) -> bytes | None:
        i = self.buf.find(b"\n", 0, self.cap)
        if i < 0:
            return None
        line = bytes(self.buf[:i])
        del self.buf[:i + 1]
        return line

    @property
    def done(self) -> bool:
        return self.eof or self.overflow


class _Out:
    """Writes to a non-blocking pipe, keeping what does not fit yet."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.broken = fd, bytearray(), False
        os.set_blocking(fd, False)

    def add(self, data: bytes) -> None:
        self.buf += data
        self.flush()

    def flush(self) -> None:
        while self.buf and not self.broken:
            try:
                del self.buf[:os.write(self.fd, self.buf)]
            except BlockingIOError:
                return
            except OSError:  # the reader is gone
                self.broken = True
                self.buf.clear()


class _Box:
    """A sandbox with a request pipe (its fd 3) and an answer pipe (its fd 4)."""

    def __init__(self, flags: list[str], program: str, files: dict, limits: SandboxLimits,
                 cap: int):
        self.box = Sandbox([*flags, "-c", _program(program)], files, limits, channels="rw",
                           keep_stdout=False)
        self.out, self.lines = _Out(self.box.ends[0]), _Lines(self.box.ends[1], cap)
        self.ready = False

    def fds(self):
        """(fd, events) to poll."""
        status = [(self.box.status.fd, select.POLLIN)] if self.box.status.fd >= 0 else []
        write = [(self.out.fd, select.POLLOUT)] if self.out.buf else []
        read = [] if self.lines.done else [(self.lines.fd, select.POLLIN)]
        return status + write + read

    def pump(self) -> None:
        if self.box.status.fd >= 0:
            self.box.status.read()
        self.out.flush()
        self.lines.fill()

    def end(self) -> None:
        self.box.kill()
        self.box.close()


class _Relay:
    def __init__(self, code: str, tests: list[str], limits: SandboxLimits):
        n = len(tests)
        self.limits, self.n, self.code = limits, n, code
        self.cand_limits = replace(limits, cpu_seconds=limits.cpu_seconds * n)
        driver_limits = replace(limits, cpu_seconds=limits.cpu_seconds * n + 5,
                                memory_mb=max(limits.memory_mb, DRIVER_MEMORY_MB))
        self.deadline = time.monotonic() + n * limits.wall_seconds + SLACK_SECONDS
        self.cand: _Box | None = None
        self.import_failed = None  # why the program never became ready, if it did not
        self.setup_errors: list[str] = []
        self.start_candidate()  # both start at once
        # the driver: isolated mode, no site (nothing outside the standard library)
        self.driver = _Box(["-I", "-S"], "_test_driver.py", {"tests.json": json.dumps(tests)},
                           driver_limits, DRIVER_LINE_CAP)
        self.waiting = None  # "begin" or "call": the driver waits for an answer
        self.test_deadline = 0.0
        self.verdict = None

    def start_candidate(self) -> None:
        # the program: the interpreter's site-packages, as for stdin/stdout tests
        self.cand = _Box([], "_call_server.py", {"main.py": self.code}, self.cand_limits,
                         self.limits.output_kb * 1024)

    def end_candidate(self) -> None:
        if self.cand is not None:
            self.cand.end()
            if self.cand.box.setup_error(finished=False):
                self.setup_errors.append(self.cand.box.setup_error(finished=False))
            self.cand = None

    def reply(self, status: str, line: bytes | None = None) -> None:
        self.waiting = None
        data = json.dumps({"status": status}).encode() + b"\n"
        self.driver.out.add(data + (line + b"\n" if line is not None else b""))

    def from_driver(self, line: bytes, now: float) -> None:
        try:
            msg = json.loads(line)
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            self.verdict = "malformed"  # the driver is ours: a bug, every test fails
            return
        if op == "verdict":
            self.verdict = msg
        elif op == "begin":
            self.test_deadline = now + self.limits.wall_seconds
            if self.cand is not None and self.cand.lines.done:  # died since the last test
                self.end_candidate()
            if self.import_failed:
                self.reply(self.import_failed)
                return
            if self.cand is None:
                self.start_candidate()
            self.waiting = "begin"
        elif self.cand is None or not self.cand.ready:
            self.reply("died")
        elif now >= self.test_deadline:
            self.reply("timeout")
        else:
            self.cand.out.add(line + b"\n")
            self.waiting = "call"

    def from_candidate(self, now: float) -> None:
        """Answers the driver's pending request once the candidate answered or failed."""
        c = self.cand
        if self.waiting == "begin" and c.ready:
            return self.reply("ok")
        line = c.lines.pop()
        if line is None:
            failure = ("too_large" if c.lines.overflow else "died" if c.lines.eof
                       else "timeout" if now >= self.test_deadline else None)
            if failure is None:
                return None  # no answer yet
        elif self.waiting == "call":
            return self.reply("ok", line)
        elif line == b"ready":  # the first line: the program's import finished
            c.ready = True
            return self.reply("ok")
        else:
            failure = "died"
        if self.waiting == "begin":
            self.import_failed = failure
        self.end_candidate()
        return self.reply(failure)

    def step(self) -> None:
        boxes = [b for b in (self.driver, self.cand) if b is not None]
        now = time.monotonic()
        wake = self.test_deadline if self.waiting else self.deadline
        poller = select.poll()
        for box in boxes:
            for fd, events in box.fds():
                poller.register(fd, events)
        poller.poll(max(0.0, min(wake, self.deadline) - now) * 1000)
        for box in boxes:
            box.pump()
        now = time.monotonic()
        while self.verdict is None and (line := self.driver.lines.pop()) is not None:
            self.from_driver(line, now)
        if self.waiting:
            self.from_candidate(now)
        self.driver.out.flush()

    def run(self) -> AssertVerdict:
        try:
            while self.verdict is None and not self.driver.lines.done and \
                    time.monotonic() < self.deadline:
                self.step()
        finally:
            self.end_candidate()
        return self.finish()

    def finish(self) -> AssertVerdict:
        box = self.driver.box
        error = None
        if self.verdict is None:
            error = ("the test driver ran out of time" if time.monotonic() >= self.deadline
                     else "the test driver stopped without a verdict")
            box.kill()
        else:
            try:
                box.proc.wait(timeout=EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                box.kill()
                error = "the test driver did not exit after its verdict"
        if box.status.fd >= 0:
            box.status.read()
        setup = box.setup_error(finished=self.verdict is not None)
        if setup:
            self.setup_errors.append(setup)
        box.close()
        verdict = _checked(self.verdict, self.n)
        if error is None and (box.proc.returncode != 0 or verdict is None):
            error = f"the test driver exited with {box.proc.returncode} / a malformed verdict"
        if error is not None:
            return AssertVerdict([False] * self.n, [None] * self.n, error,
                                 tuple(self.setup_errors))
        return AssertVerdict(*verdict, None, tuple(self.setup_errors))


def _checked(verdict, n: int):
    """(passed, unsupported) from the driver's verdict message, or None when malformed."""
    if not isinstance(verdict, dict):
        return None
    passed, unsupported = verdict.get("passed"), verdict.get("unsupported")
    if not (isinstance(passed, list) and isinstance(unsupported, list)
            and len(passed) == len(unsupported) == n
            and all(type(p) is bool for p in passed)
            and all(u is None or type(u) is str for u in unsupported)):
        return None
    return passed, unsupported


def run_assert_tests(code: str, tests: list[str], limits: SandboxLimits) -> AssertVerdict:
    """Which of `tests` (statements, e.g. asserts) pass against the program `code`, decided by
    the driver sandbox (see the module docstring). The caller checks that a sandbox exists."""
    if not tests:
        return AssertVerdict([], [])
    return _Relay(code, tests, limits).run()
