"""code_reward throughput on small problems: each a function and a few asserts, the completions a
mix of right, partly right (one test fails) and wrong programs, scored in the sandbox.

    python bench/bench_code_reward.py                     # 64 problems x 3 tests, N = CPUs
    python bench/bench_code_reward.py --tiny              # 8 problems (a dry run)
    python bench/bench_code_reward.py --set workers=1

Rows: op "code_reward", shape {n_problems, tests, workers, kind "assert", mix, dtype "text"},
provider PROVIDER: the verdict design the code measured ran ("key_in_candidate": the harness held
a proof key inside the candidate's process, forgeable, issue #26; "trusted_driver": the asserts
run in a driver sandbox that calls the candidate's functions through a pipe). Problems/s
(n_problems / p50) is printed beside the p50. CPU-side: --device is accepted and ignored. Without
a sandbox here it says so and exits 0.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

PROVIDER = "trusted_driver"
SIZES = {
    "default": dict(n_problems=64, tests=3, workers=0),  # workers 0: one per CPU
    "quick": dict(n_problems=64, tests=3, workers=0),
    "tiny": dict(n_problems=8, tests=3, workers=0),
}
MIX = "right/right/one_fails/wrong=1/1/1/1"


def make_batch(n: int, n_tests: int):
    """(completions, tests, expected scores): problem k asks for solve(a, b) = a * m + b."""
    comps, tests, labels = [], [], []
    for k in range(n):
        m = k % 7 + 2
        cases = [(a, a + k) for a in range(1, n_tests + 1)]
        tests.append([f"assert solve({a}, {b}) == {a * m + b}" for a, b in cases])
        kind = k % 4
        body = [f"return a * {m} + b",
                f"total = b\n    for _ in range(a):\n        total += {m}\n    return total",
                f"return a * {m} + b if a != 1 else -1",  # fails the first test only
                f"return a * {m + 1} + b"][kind]
        comps.append(f"Here is the solution:\n```python\ndef solve(a, b):\n    {body}\n```\n")
        labels.append([1.0, 1.0, 1.0 - 1.0 / n_tests, 0.0][kind])
    return comps, tests, labels


def main():
    args, c = common.parse(__doc__, SIZES)
    from dlmkern.rewards import code_reward
    from dlmkern.rewards.pool import reward_workers
    from dlmkern.rewards.sandbox import sandbox_available

    if not sandbox_available():
        print("bench_code_reward: skipped: no sandbox on this machine (see SandboxUnavailable)")
        return
    n, workers = c["n_problems"], reward_workers(c["workers"] or None)
    comps, tests, labels = make_batch(n, c["tests"])
    scores = []

    def run():
        scores[:] = code_reward([None] * n, comps, tests, workers=workers)

    timing = common.time_fn(run, "cpu", warmup=1, repeat=args.repeat)
    bad = [i for i, (s, t) in enumerate(zip(scores, labels, strict=True)) if abs(s - t) > 1e-9]
    if bad:
        raise SystemExit(f"bench_code_reward: {len(bad)} of {n} scores differ from their labels "
                         f"(first: problem {bad[0]}: {scores[bad[0]]} != {labels[bad[0]]})")
    shape = {"n_problems": n, "tests": c["tests"], "workers": workers, "kind": "assert",
             "mix": MIX, "dtype": "text"}
    print(f"{workers} workers on {os.cpu_count()} CPUs; every score matches its label")
    common.report([common.make_row("code_reward", shape, PROVIDER, timing, "cpu")], args,
                  unit=("problems/s", n))


if __name__ == "__main__":
    main()
