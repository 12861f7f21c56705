"""The code verdict against programs written to forge it (issue #26), with the trainer as root and
as an unprivileged user (tests/sandbox_helpers.py). Every program in tests/hostile_programs.py
must score 0, in bounded time, and leave the trainer alive; a second run of each shows what the
attack did inside the candidate's real sandbox (the call server with its stdout kept, asked for
the test's function and to call it), so no case passes because it never attacked.
"""

import builtins
import keyword
import os
import re
import select
import time

import pytest
from dlmkern.rewards import SandboxLimits, code_reward
from dlmkern.rewards.sandbox import Sandbox
from dlmkern.rewards.verdict import _program

from .hostile_programs import BEFORE, HOSTILE, IMPOSSIBLE
from .sandbox_helpers import USERS, as_user, needs_sandbox

pytestmark = needs_sandbox
LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=3, memory_mb=512, file_mb=8, processes=16,
                       disk_mb=16, output_kb=64)
SPRAYED = '"op": "verdict"'  # one of the fake lines the spraying attacks write to every fd
# where (the candidate's stdout or its answer pipe) the attack shows, and what
EVIDENCE = {
    "frame walk f_locals key + fd 3 + os._exit(0)": ("answers", ""),  # died at import
    "every frame's locals to every fd": ("stdout", "frames found 0"),
    "gc.get_objects() walk": ("stdout", "gc walked"),
    "inspect.stack()": ("stdout", "inspect found 0"),
    "/proc/self/mem scan": ("stdout", "mem found 0"),
    "ctypes memory scan": ("stdout", "ctypes found 0"),
    "writes to inherited fds 3..20": ("stdout", "fds [0, 1, 2, 3, 4, 5]"),  # 5: listdir's
    "signals to every pid, killpg": ("stdout", "signalled [1]"),
    "object whose __eq__ is always True": ("answers", '"ok": {"ref": 1}'),
    "int subclass with a forged __eq__": ("answers", '"ok": {"ref": 1}'),
    "str subclass with a forged __eq__": ("answers", '"ok": {"ref": 1}'),
    "list subclass with a forged __eq__": ("answers", '"ok": {"ref": 1}'),
    "takes forever to serialize": ("answers", 'ready\n{"ok": {"ref": 0}}\n'),  # nothing more
    "enormous string": ("answers", '{"ok": "xxxxxxxx'),
    "deep nesting": ("answers", '"NotALiteral"'),
    "cycle": ("answers", '"NotALiteral"'),
    "raw deep JSON written as its own reply": ("answers", '{"ok": [[[[[[[['),
    "prints fake verdicts to stdout and stderr": ("stdout", SPRAYED),
    "exits 0 at import": ("answers", ""),
    "StopIteration ends the test's iteration early": ("answers", '"StopIteration"'),
}
SPRAYS = {"every frame's locals to every fd", "gc.get_objects() walk", "inspect.stack()",
          "/proc/self/mem scan", "ctypes memory scan", "writes to inherited fds 3..20",
          "signals to every pid, killpg"}


def _evidence(source: str, tests: list[str]) -> dict:
    """The candidate's stdout and answer pipe (first 4 KiB each) after asking for the test's
    first function and calling it with 3."""
    name = next(n for n in re.findall(r"[A-Za-z_]\w*", tests[0])
                if n not in dir(builtins) and not keyword.iskeyword(n))
    box = Sandbox(["-c", _program("_call_server.py")], {"main.py": source}, LIMITS,
                  channels="rw")
    try:
        os.write(box.ends[0], f'{{"op": "get", "name": "{name}"}}\n'
                              '{"op": "call", "ref": 0, "args": [3], "kw": {}}\n'.encode())
    except OSError:
        pass
    got = {"stdout": b"", "answers": b""}
    fds = {box.ends[1]: "answers", box.stdout.fd: "stdout"}
    deadline = time.monotonic() + LIMITS.wall_seconds
    while fds and time.monotonic() < deadline:
        for fd in select.select(list(fds), [], [], 0.1)[0]:
            chunk, key = os.read(fd, 1 << 16), fds[fd]
            if not chunk:
                del fds[fd]
            elif len(got[key]) < 4096:
                got[key] += chunk
    box.kill()
    box.close()
    return {k: v[:4096].decode(errors="replace") for k, v in got.items()}


def _score(source: str, tests: list[str]) -> dict:
    t0 = time.monotonic()
    score = code_reward([None], [source], [tests], limits=LIMITS)[0]
    return {"score": score, "seconds": time.monotonic() - t0}


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_forgery_scores_zero(user, name):
    source, tests = HOSTILE[name]
    out = as_user(user, _score, source, tests)
    assert out["score"] == 0.0, f"{name} forged a pass (it scored {BEFORE[name]} before #26)"
    assert out["seconds"] < len(tests) * LIMITS.wall_seconds + 5


@pytest.mark.parametrize("name", list(EVIDENCE))
def test_each_attack_really_attacks(name):
    got = _evidence(*HOSTILE[name])
    where, text = EVIDENCE[name]
    assert text in got[where], got
    if not text:
        assert got[where] == "", got
    if name in SPRAYS:  # it wrote the fake verdict lines to its answer pipe too
        assert SPRAYED in got["answers"], got


def test_the_four_line_forge():
    """The forge of issue #26 against an `assert False` test: 1.0 before, 0 now."""
    forge = ("import os, sys\nk = sys._getframe(1).f_locals['key']\nos.write(3, k)\n"
             "os._exit(0)\n")
    with pytest.warns(RuntimeWarning, match="uses no name the program could define"):
        assert code_reward([None], [forge], [["assert False"]], limits=LIMITS) == [0.0]
    assert code_reward([None], [forge], [IMPOSSIBLE], limits=LIMITS) == [0.0]


def test_honest_answers_pass_beside_the_forgeries():
    """The same tests and limits score 1 for a program that answers them (the suite's zeros are
    the forgeries' own)."""
    honest = "def solve(x):\n    return {3: 'expected', 4: 17}.get(x)\n"
    assert code_reward([None], [honest], [IMPOSSIBLE[:1]], limits=LIMITS) == [1.0]
    assert code_reward([None], ["def solve(x):\n    return 42\n"],
                       [["assert solve(1) == 42"]], limits=LIMITS) == [1.0]
