"""Math reward (SPEC 5): the last \\boxed{} of a completion (or a caller's extractor) checked
against the reference answer with math-verify, under dlmkern's own timeout.

math-verify's built-in timeout uses signals, which only work on the main thread; dlmkern instead
verifies in a pool of worker processes (`pool.py`, one per CPU unless `workers=` or
$DLMKERN_REWARD_WORKERS says otherwise) and kills (then replaces) a worker whose answer takes
too long, so the reward is safe to call from any thread and a pathological answer scores 0.
"""

from __future__ import annotations

from collections.abc import Callable

from dlmkern.rewards.pool import verify_pool


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


def verify_many(golds: list[str], preds: list[str | None], timeout: float = 5.0,
                workers: int | None = None) -> list[bool]:
    """verify_answer over pairs in a pool of `workers` processes (`dlmkern.rewards.pool`), in
    order. A missing answer is False and a verbatim match True without a worker."""
    out: list[bool | None] = [None] * len(golds)
    pending = []
    for i, (gold, pred) in enumerate(zip(golds, preds, strict=True)):
        if pred is None or not pred.strip():
            out[i] = False
        elif pred.strip() == gold.strip():
            out[i] = True
        else:
            pending.append(i)
    if pending:
        answers = verify_pool(workers).verify([(golds[i], preds[i]) for i in pending], timeout)
        for i, ok in zip(pending, answers, strict=True):
            out[i] = ok
    return out


def verify_answer(gold: str, pred: str | None, timeout: float = 5.0) -> bool:
    """Whether `pred` is mathematically equivalent to `gold` (math-verify), within `timeout`."""
    return verify_many([gold], [pred], timeout)[0]


def math_reward(prompts: list, completions: list[str], answer: list[str], *,
                extractor: Callable[[str], str | None] | None = None,
                timeout: float = 5.0, workers: int | None = None, **_columns) -> list[float]:
    """1.0 where the completion's answer matches the reference, else 0.0. Use as a reward
    function: the trainer passes dataset columns as keyword arguments (here `answer`). Answers
    are checked `workers` at a time (default: one per CPU), each within `timeout` seconds."""
    extract = extractor or last_boxed
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    preds = [extract(c) for c in completions]
    return [1.0 if ok else 0.0
            for ok in verify_many([str(a) for a in answer], preds, timeout, workers)]
