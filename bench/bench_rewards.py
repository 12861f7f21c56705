"""math_reward throughput with 1 worker process and with N (default: one per CPU), on a synthetic
mix of right (verbatim), equivalent (another form: 3/4 for \\frac{3}{4}, (x+1)^2 for x^2+2x+1)
and wrong \\boxed{} answers, in one run.

    python bench/bench_rewards.py                  # 512 completions, N = CPUs
    python bench/bench_rewards.py --quick          # 2048 completions: one TraDo step (128 x 16)
    python bench/bench_rewards.py --tiny --set workers=2

Rows: op "math_reward", shape {n_completions, workers, mix, dtype "text"}, providers "pool_1" and
"pool_N" (shape["workers"] says N). Completions/s (n_completions / p50) is printed beside the
p50, not stored: the row schema has no throughput column and tflops / gbps do not apply.
Verbatim answers are scored without a worker, so a third of the mix costs ~nothing, as in
training. CPU-side: --device is accepted and ignored. Without math-verify it says so and exits 0.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

SIZES = {
    "default": dict(n_completions=512, workers=0),  # workers 0: one per CPU
    "quick": dict(n_completions=2048, workers=0),
    "tiny": dict(n_completions=96, workers=0),
}
MIX = "right/equivalent/wrong=1/1/1"


def _forms(k: int) -> tuple[str, str, str]:
    """(gold, an equivalent form, a wrong answer), numbers varied with k."""
    a, m = k % 9 + 1, k % 20 + 2
    return [
        (f"\\frac{{{k}}}{{{k + 1}}}", f"{k}/{k + 1}", f"\\frac{{{k + 1}}}{{{k}}}"),
        (str(k), f"{k}.0", str(k + 1)),
        (f"{m}\\sqrt{{2}}", f"\\sqrt{{{2 * m * m}}}", f"\\sqrt{{{2 * m * m + 1}}}"),
        (f"x^2 + {2 * a}x + {a * a}", f"(x+{a})^2", f"(x-{a})^2"),
        (f"({k}, {k + 2})", f"({k},{k + 2})", f"({k + 2}, {k})"),
    ][(k // 3) % 5]


def make_batch(n: int):
    """(completions, answers, labels): k % 3 picks right / equivalent / wrong."""
    comps, golds, labels = [], [], []
    for k in range(n):
        gold, equiv, wrong = _forms(k + 1)
        pred = (gold, equiv, wrong)[k % 3]
        comps.append(f"Working it out step by step, the answer is \\boxed{{{pred}}}.")
        golds.append(gold)
        labels.append(0.0 if k % 3 == 2 else 1.0)
    return comps, golds, labels


def main():
    args, c = common.parse(__doc__, SIZES)
    try:
        import math_verify  # noqa: F401 - the workers import it; check here, once
    except ImportError as e:
        print(f"bench_rewards: skipped: math-verify cannot be imported here ({e}); "
              "pip install math-verify")
        return
    from dlmkern.rewards.math import math_reward
    from dlmkern.rewards.pool import close_pools, reward_workers

    n = c["n_completions"]
    big = reward_workers(c["workers"] or None)
    comps, golds, labels = make_batch(n)
    rows, scores = [], {}
    for provider, workers in (("pool_1", 1), ("pool_N", big)):
        if provider == "pool_N" and big == 1:
            break  # one CPU: pool_N is pool_1

        def run(w=workers, p=provider):
            scores[p] = math_reward(None, comps, golds, workers=w)

        timing = common.time_fn(run, "cpu", warmup=1, repeat=args.repeat)  # warm-up starts them
        shape = {"n_completions": n, "workers": workers, "mix": MIX, "dtype": "text"}
        rows.append(common.make_row("math_reward", shape, provider, timing, "cpu"))
    close_pools()
    agree = sum(s == t for s, t in zip(scores["pool_1"], labels, strict=True))
    if any(s != scores["pool_1"] for s in scores.values()):
        raise SystemExit("bench_rewards: pool_1 and pool_N scored the batch differently")
    if agree != n:  # a wrong score is a broken reward, not a slow one
        bad = [k for k, (s, t) in enumerate(zip(scores["pool_1"], labels, strict=True)) if s != t]
        raise SystemExit(f"bench_rewards: {n - agree} of {n} scores disagree with their labels "
                         f"(first: completion {bad[0]}: {comps[bad[0]]!r} vs {golds[bad[0]]!r}, "
                         f"scored {scores['pool_1'][bad[0]]}, label {labels[bad[0]]})")
    print(f"pool_N = {big} workers on {os.cpu_count()} CPUs; scores agree with the mix's labels on "
          f"{agree}/{n}")
    common.report(rows, args, unit=("compl/s", n))


if __name__ == "__main__":
    main()
