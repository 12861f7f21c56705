"""The reward worker pools: math-verify in worker processes (order, timeout, restarts, threads,
fresh interpreters, exit) and code-reward sandbox runs in parallel."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from dlmkern.rewards import SandboxLimits, code_reward, math_reward
from dlmkern.rewards import pool as pool_mod
from dlmkern.rewards.pool import VerifyPool, reward_workers, verify_pool
from dlmkern.rewards.sandbox import sandbox_available

math_verify = pytest.importorskip("math_verify")

HANG = "(x+1)^{200000} - x^{200000}"  # math-verify expands it: minutes (a real pathological input)
PAIRS = [("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("2\\sqrt{2}", "\\sqrt{8}"),
         ("3", "x = 3"), ("\\frac{\\pi}{2}", "\\pi/2"), ("10", "10.0"), ("(1, 2)", "(1,2)"),
         ("x^2 + 2x + 1", "(x+1)^2"), ("\\frac{1}{3}", "0.33"), ("\\pi", "3.14159"), ("4", "5"),
         ("(1, 2)", "(2, 1)"), ("x + 1", "x - 1"), ("7", "7"), ("\\frac{3}{4}", "0.75"),
         ("\\frac{3}{4}", "0.7")]


def _in_process(gold, pred):
    """The single-process reference: math-verify on this thread, no worker."""
    parse, verify = math_verify.parse, math_verify.verify
    return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))


def _batch(n=32, seed=0):
    rng = random.Random(seed)
    pairs = [rng.choice(PAIRS) for _ in range(n)]
    comps = [f"... so \\boxed{{{p}}}" if k % 7 else "no boxed answer" for k, (_, p) in
             enumerate(pairs)]
    return comps, [g for g, _ in pairs]


def _expected(comps, golds):
    return [1.0 if "\\boxed" in c and _in_process(g, c.split("\\boxed{", 1)[1][:-1]) else 0.0
            for c, g in zip(comps, golds, strict=True)]


@pytest.fixture(scope="module")
def pool2():
    pool = VerifyPool(2)
    pool.verify([("1", "1.0")] * 2, 5.0)  # both workers started and warm
    yield pool
    pool.close()


def test_matches_single_process_verification_in_order(pool2):
    comps, golds = _batch()
    want = _expected(comps, golds)
    assert 0 < sum(want) < len(want)  # a real mix
    assert math_reward(None, comps, golds, workers=2) == want
    assert math_reward(None, comps, golds, workers=1) == want
    # the pool itself, on pairs alone: \frac{1}{2} vs 0.5 both ways, order kept
    assert pool2.verify(PAIRS, 5.0) == [_in_process(g, p) for g, p in PAIRS]
    assert pool2.verify(PAIRS[:2], 5.0) == [True, True]


def test_hanging_answer_costs_its_timeout_and_scores_zero(pool2):
    pairs = [PAIRS[0], ("1", HANG)] + PAIRS[1:9]
    restarts = pool2.restarts
    t0 = time.monotonic()
    got = pool2.verify(pairs, timeout=1.0)
    took = time.monotonic() - t0
    assert got == [_in_process(g, p) if p != HANG else False for g, p in pairs]
    assert not got[1] and got[0] and got[2]
    assert 1.0 <= took < 8.0, took  # its timeout, plus the rest on the other worker (2 cores)
    assert pool2.restarts == restarts + 1
    assert pool2.verify(PAIRS[:3], 5.0) == [True, True, True]  # the slot works again


def _dead(pid, within=10.0):
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_killed_worker_is_replaced(pool2):
    pids = pool2.pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    assert _dead(pids[0])
    assert pool2.verify(PAIRS, 5.0) == [_in_process(g, p) for g, p in PAIRS]
    assert pids[0] not in pool2.pids() and len(pool2.pids()) == 2
    # killed while answering: that answer is tried again on a fresh worker, none is lost
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", pool2.verify(PAIRS * 60, 5.0)))
    th.start()
    time.sleep(0.3)
    assert th.is_alive()  # really mid-batch (a fast machine would otherwise kill an idle one)
    os.kill(pool2.pids()[0], signal.SIGKILL)
    th.join(60)
    assert out["r"] == [_in_process(g, p) for g, p in PAIRS] * 60


def test_workers_are_fresh_interpreters_not_forks():
    # its own pool: the module's pool2 may still list a worker the test above killed while idle
    # (a dead worker is noticed and replaced when next used; its /proc entry is a zombie's)
    pool = VerifyPool(2)
    pool.verify([("1", "1.0")] * 2, 5.0)  # both workers started
    assert pool.start_method == "spawn"
    with open("/proc/self/maps") as f:
        assert "libtorch" in f.read()  # the trainer side holds torch (conftest imports it)
    for pid in pool.pids():
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        with open(f"/proc/{pid}/maps") as f:
            assert "libtorch" not in f.read()  # a fork would have inherited its mappings
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == sys.executable.encode()
    pool.close()


def test_threads_share_a_pool(pool2):
    batches = [_batch(16, seed) for seed in range(4)]
    want = [_expected(*b) for b in batches]
    out = [None] * 4

    def call(k):
        out[k] = math_reward(None, *batches[k], workers=2)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert out == want
    assert verify_pool(2).size == 2 and verify_pool(2) is verify_pool(2)


def test_worker_count_setting(monkeypatch):
    monkeypatch.delenv(pool_mod.ENV_WORKERS, raising=False)
    monkeypatch.delenv(pool_mod.ENV_LOCAL_RANKS, raising=False)
    assert reward_workers() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(pool_mod.ENV_WORKERS, "3")
    assert reward_workers() == 3 and reward_workers(5) == 5
    for bad in ("0", "two"):
        monkeypatch.setenv(pool_mod.ENV_WORKERS, bad)
        with pytest.raises(ValueError, match="integer|>= 1"):
            reward_workers()


def test_worker_count_is_shared_by_the_ranks_on_a_machine(monkeypatch):
    # 8 torchrun ranks each sized their pool to every CPU: 8 x 16 interpreters on 16 cores.
    monkeypatch.delenv(pool_mod.ENV_WORKERS, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for ranks, want in (("1", 16), ("8", 2), ("3", 5), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert reward_workers() == want
    monkeypatch.setenv(pool_mod.ENV_WORKERS, "6")  # an explicit size is per rank already
    assert reward_workers() == 6 and reward_workers(4) == 4
    monkeypatch.delenv(pool_mod.ENV_WORKERS)
    for bad in ("0", "eight"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", bad)
        with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
            reward_workers()


def test_a_worker_that_cannot_start_raises(tmp_path, monkeypatch):
    broken = tmp_path / "worker.py"
    broken.write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(pool_mod, "WORKER_FILE", str(broken))
    pool = VerifyPool(1)
    try:
        with pytest.raises(RuntimeError, match="did not start.*exit code 3"):
            pool.verify([("1", "2")], 1.0)  # not a silent 0 for every answer
    finally:
        pool.close()


def test_workers_end_with_the_trainer():
    code = ("from dlmkern.rewards.math import math_reward\n"
            "from dlmkern.rewards.pool import verify_pool\n"
            "print(math_reward(None, ['\\\\boxed{0.5}'] * 4, ['1/2'] * 4, workers=2))\n"
            "print(*verify_pool(2).pids())\n")  # no __main__ guard: workers never import it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "[1.0, 1.0, 1.0, 1.0]"
    assert all(_dead(int(pid)) for pid in lines[1].split())


# ---- code reward: sandbox runs in parallel ----------------------------------------------------

@pytest.mark.skipif(not sandbox_available(), reason="no sandbox here")
def test_code_reward_parallel_equals_serial():
    limits = SandboxLimits(wall_seconds=10, cpu_seconds=1, memory_mb=256)
    add = "```python\nimport time\ntime.sleep(0.5)\ndef add(a, b):\n    return a + b\n```"
    sub = add.replace("a + b", "a - b")
    comps = [add, sub, "while True: pass", sub]
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4"], ["assert add(2, 2) == 0"],
             "pass", ["assert add(1, 1) == 2", "assert add(0, 0) == 0"]]
    want = [1.0, 1.0, 0.0, 0.5]
    t0 = time.monotonic()
    assert code_reward(None, comps, tests, limits=limits, workers=1) == want
    serial = time.monotonic() - t0
    t0 = time.monotonic()
    assert code_reward(None, comps, tests, limits=limits, workers=4) == want
    parallel = time.monotonic() - t0
    assert parallel < 0.75 * serial, (parallel, serial)  # the sleeps overlap
