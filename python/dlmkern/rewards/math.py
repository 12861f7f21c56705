"""Math reward (SPEC 5): the last \\boxed{} of a completion (or a caller's extractor) checked
against the reference answer with math-verify, under dlmkern's own timeout.

math-verify's built-in timeout uses signals, which only work on the main thread; dlmkern instead
verifies in a persistent worker process and kills (then restarts) it when an answer takes too
long, so the reward is safe to call from any thread and a pathological answer scores 0.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, else None."""
    best = None
    for key in ("\\boxed{", "\\fbox{"):
        i = text.rfind(key)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, key)
    if best is None:
        return None
    start = best[0] + len(best[1])
    depth = 1
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start:j]
    return None


def _serve(conn):  # runs in the worker process
    import logging

    logging.disable(logging.WARNING)  # math-verify warns that its own timeout is off: it is ours
    from math_verify import parse, verify

    while True:
        try:
            gold, pred = conn.recv()
        except EOFError:
            return
        try:
            ok = bool(verify(parse(f"${gold}$", parsing_timeout=None),
                             parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None))
        except Exception:  # noqa: BLE001 - any failure to parse or compare scores 0
            ok = False
        conn.send(ok)


class _Verifier:
    """A persistent math-verify worker process with a per-call timeout."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self):
        ctx = mp.get_context("spawn")  # no fork of a process that holds torch / OpenMP threads
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        self._conn = parent

    def _kill(self):
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = None

    def __call__(self, gold: str, pred: str, timeout: float) -> bool:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            self._conn.send((gold, pred))
            # The first call also waits for the worker to import sympy / math-verify.
            if self._conn.poll(timeout if self._warm else max(timeout, 60.0)):
                self._warm = True
                return self._conn.recv()
            self._kill()
            return False

    _warm = False


_VERIFIER = _Verifier()


def verify_answer(gold: str, pred: str, timeout: float = 5.0) -> bool:
    """Whether `pred` is mathematically equivalent to `gold` (math-verify), within `timeout`."""
    if pred is None:
        return False
    if pred.strip() == gold.strip():
        return True
    return _VERIFIER(gold, pred, timeout)


def math_reward(prompts: list, completions: list[str], answer: list[str], *,
                extractor: Callable[[str], str | None] | None = None,
                timeout: float = 5.0, **_columns) -> list[float]:
    """1.0 where the completion's answer matches the reference, else 0.0. Use as a reward
    function: the trainer passes dataset columns as keyword arguments (here `answer`)."""
    extract = extractor or last_boxed
    return [1.0 if verify_answer(str(a), extract(c) or "", timeout) else 0.0
            for c, a in zip(completions, answer, strict=True)]
