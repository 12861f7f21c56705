"""Rewards: math answers through math-verify with our timeout; the code sandbox."""

import os
import threading
import time

import pytest
from dlmkern.rewards import (
    SandboxLimits,
    code_reward,
    extract_code,
    last_boxed,
    math_reward,
    run_program,
    verify_answer,
)
from dlmkern.rewards.code import network_isolation_available
from dlmkern.rewards.sandbox import SandboxUnavailable, sandbox_available

from .sandbox_helpers import REQUIRE_SANDBOX

pytest.importorskip("math_verify")

EQUIVALENT = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("3", "x = 3"),
              ("\\frac{\\pi}{2}", "\\pi/2"), ("10", "10.0"), ("(1, 2)", "(1,2)"),
              ("x^2 + 2x + 1", "(x+1)^2")]
DIFFERENT = [("\\frac{1}{3}", "0.33"), ("\\pi", "3.14159"), ("4", "5"), ("(1, 2)", "(2, 1)"),
             ("x + 1", "x - 1")]


@pytest.mark.parametrize("gold, pred", EQUIVALENT)
def test_equivalent_answers(gold, pred):
    assert verify_answer(gold, pred)


@pytest.mark.parametrize("gold, pred", DIFFERENT)
def test_different_answers(gold, pred):
    assert not verify_answer(gold, pred)


def test_last_boxed_and_math_reward():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert last_boxed("\\boxed{\\sqrt{\\frac{1}{4}}}") == "\\sqrt{\\frac{1}{4}}"
    assert last_boxed("no answer") is None and last_boxed("\\boxed{unclosed") is None
    comps = ["so \\boxed{\\frac{1}{2}}", "\\boxed{7}", "I think 7", "\\fbox{7}"]
    assert math_reward([None] * 4, comps, ["0.5", "8", "7", "7"]) == [1.0, 0.0, 0.0, 1.0]
    # a custom extractor
    assert math_reward([None], ["Answer: 42"], ["42"],
                       extractor=lambda s: s.split(":")[-1]) == [1.0]


def test_math_reward_from_a_thread_and_timeout():
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", math_reward(
        [None], ["\\boxed{2}"], ["2.0"])))
    th.start()
    th.join()
    assert out["r"] == [1.0]
    t0 = time.time()
    # an answer whose comparison takes far longer than the budget scores 0, quickly
    assert not verify_answer("1", "(x+1)^{200000} - x^{200000}", timeout=0.5)
    assert time.time() - t0 < 30
    assert verify_answer("\\frac{1}{2}", "0.5")  # the worker was restarted


# ---- code sandbox (the hostile-program suite is tests/test_sandbox.py) ---------------------------

needs_sandbox = pytest.mark.skipif(not REQUIRE_SANDBOX and not sandbox_available(),
                                   reason="no sandbox here (test_no_sandbox_fails_closed)")
FAST = SandboxLimits(wall_seconds=5, cpu_seconds=2, memory_mb=256)


@needs_sandbox
def test_correct_and_wrong_programs():
    assert run_program("print(sum(range(5)))", limits=FAST) == (0, "10\n")
    assert run_program("print(input()[::-1])", stdin="abc\n", limits=FAST) == (0, "cba\n")
    comp = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(comp).strip().startswith("def add")
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4"],
             ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]]
    assert code_reward([None, None], [comp, comp], tests, limits=FAST) == [1.0, 0.5]
    assert code_reward([None], [comp], ["assert add(1, 1) == 2"], limits=FAST) == [1.0]
    assert code_reward([None], [comp], [[]], limits=FAST) == [0.0]


@needs_sandbox
@pytest.mark.parametrize("source", [
    "while True: pass",                                    # hang (CPU limit)
    "import time\ntime.sleep(60)",                         # hang (wall clock)
    "raise SystemExit(3)",                                 # crash
    "import ctypes\nctypes.string_at(0)",                  # segfault
    "x = bytearray(2 * 1024**3)",                          # memory hog
    "open('f', 'wb').write(b'0' * (64 * 1024 * 1024))",    # file-size bomb
])
def test_bad_programs_score_zero_and_do_not_escape(source):
    t0 = time.time()
    code, _ = run_program(source, limits=SandboxLimits(wall_seconds=3, cpu_seconds=1,
                                                        memory_mb=256, file_mb=8))
    assert code != 0
    assert time.time() - t0 < 15
    assert code_reward([None], [source + "\ndef f():\n    return 1\n"], [["assert f() == 1"]],
                       limits=FAST) == [0.0]


@needs_sandbox
def test_fork_bomb_is_contained():
    t0 = time.time()
    code, _ = run_program("import os\nwhile True:\n    os.fork()", limits=FAST)
    assert code != 0 and time.time() - t0 < 15
    here = os.path.dirname(os.path.abspath(__file__))  # the trainer's files are not there
    assert os.listdir(here)
    code, _ = run_program(f"import os\nos.listdir({here!r})", limits=FAST)
    assert code != 0
    # the sandbox still works afterwards
    assert run_program("print('ok')", limits=FAST) == (0, "ok\n")


@needs_sandbox
def test_network_is_cut_off_and_tmp_is_private():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:  # a server reachable from here is unreachable from the sandbox (own network namespace)
        code, out = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}),"
                                " 1)\nprint('connected')", limits=FAST)
    finally:
        server.close()
    assert code != 0 and "connected" not in out
    code, out = run_program("import os, tempfile\nprint(tempfile.gettempdir() == os.getcwd(), "
                            "os.listdir())", limits=FAST)
    assert (code, out) == (0, "True ['main.py']\n")


def test_no_sandbox_fails_closed(monkeypatch):
    import dlmkern.rewards.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_availability", (False, "unshare: Operation not permitted"))
    for network in ("require", "try"):
        with pytest.raises(SandboxUnavailable, match=r"cannot isolate.*Operation not permitted"):
            run_program("print(1)", limits=SandboxLimits(network=network))
        with pytest.raises(SandboxUnavailable):
            code_reward([None], ["x = 1"], [["assert x == 1"]],
                        limits=SandboxLimits(network=network))
    assert not network_isolation_available()
    with pytest.raises(ValueError, match="network must be 'require' or 'try'"):
        SandboxLimits(network="off")
