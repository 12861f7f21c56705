"""The code verdict for honest programs: what crosses between the driver and the program (literals,
references to the program's objects, arguments changed in place, exceptions), stdin/stdout tests,
partial credit across a hung or crashed test, and the tests refused before anything runs."""

import math

import pytest
from dlmkern.data import load_dataset
from dlmkern.rewards import SandboxLimits, code_reward
from dlmkern.rewards._literals import BadLiteral, decode_literal, encode_literal
from dlmkern.rewards.code_tests import parse_tests, same_output
from dlmkern.rewards.verdict import run_assert_tests

from .sandbox_helpers import needs_sandbox

LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_mb=256)

PROGRAM = '''
import math
MOD = 10**9 + 7

def kinds(x=None, *, scale=1):
    return [None, True, 3 * scale, 2.5, "s", (1, "a"), {1, 2}, frozenset({3}), {(1, 2): [3]},
            b"\\x00\\xff", 1 + 2j, float("inf"), x]

def area(r):
    return math.pi * r * r

def rotate(nums, k, *, extra=None):
    k %= len(nums)
    nums[:] = nums[-k:] + nums[:-k]
    if extra is not None:
        extra["done"] = True

def gen(n):
    yield from range(n)

def checked(x):
    if x < 0:
        raise ValueError("negative")
    if x == 0:
        raise KeyError(x)
    return x

class Solution:
    def two_sum(self, nums, target):
        seen = {}
        for i, v in enumerate(nums):
            if target - v in seen:
                return [seen[target - v], i]
            seen[v] = i

class Node:
    def __init__(self, val, next=None):
        self.val, self.next = val, next

def build(values):
    head = None
    for v in reversed(values):
        head = Node(v, head)
    return head

def reverse(head):
    prev = None
    while head:
        head.next, prev, head = prev, head, head.next
    return prev

class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
        print("pushed", x)  # stdout is not the verdict's channel
    def __len__(self):
        return len(self.items)
    def __iter__(self):
        return iter(self.items)
    def __getitem__(self, i):
        return self.items[i]

def sorted(xs):  # shadows a builtin: the tests' sorted stays the real one
    return [0]
'''

HONEST = [
    "assert kinds(7, scale=2) == [None, True, 6, 2.5, 's', (1, 'a'), {1, 2}, frozenset({3}), "
    "{(1, 2): [3]}, b'\\x00\\xff', 1 + 2j, float('inf'), 7]",
    "assert type(kinds()[5]) is tuple and type(kinds()[6]) is set",
    "assert MOD == 1000000007",
    "assert math.isclose(area(2), 4 * math.pi)",
    "import math as m\nassert m.isclose(area(1), m.pi)",
    "nums, info = [1, 2, 3, 4], {}\nrotate(nums, 1, extra=info)\n"
    "assert nums == [4, 1, 2, 3] and info == {'done': True}",
    "assert list(gen(3)) == [0, 1, 2] and sum(gen(4)) == 6",
    "try:\n    checked(-1)\n    raise AssertionError('no error')\nexcept ValueError as e:\n"
    "    assert 'negative' in str(e)",
    "try:\n    checked(0)\nexcept KeyError:\n    pass\nelse:\n    raise AssertionError",
    "assert Solution().two_sum([2, 7, 11, 15], 9) == [0, 1]",
    "h, out = reverse(build([1, 2, 3])), []\nwhile h:\n    out.append(h.val)\n    h = h.next\n"
    "assert out == [3, 2, 1]",
    "s = Stack()\ns.push(1)\ns.push(2)\nassert len(s) == 2 and list(s) == [1, 2] and s[0] == 1\n"
    "assert 2 in s and 5 not in s and s.items == [1, 2]",
    "def helper(n):\n    return [checked(i) for i in range(1, n)]\nassert helper(4) == [1, 2, 3]",
    "assert sorted([3, 1, 2]) == [1, 2, 3] and checked(5) == 5",
    "a = build([1])\nassert a is a and a == a and a != build([1])",
]


@needs_sandbox
def test_honest_program_passes_every_kind_of_test():
    verdict = run_assert_tests(PROGRAM, HONEST, LIMITS)
    assert verdict.error is None
    assert [i for i, ok in enumerate(verdict.passed) if not ok] == []


@needs_sandbox
def test_partial_credit_and_failures():
    code = ("import time\ndef f(x):\n    if x == 1:\n        time.sleep(60)\n"
            "    if x == 2:\n        import os; os._exit(3)\n    return x\n")
    tests = ["assert f(0) == 0", "assert f(1) == 1", "assert f(3) == 3", "assert f(2) == 2",
             "assert f(4) == 4", "assert f(5) == 6",
             "assert f(lambda: 0) == 0"]  # a lambda cannot cross: fails for every program
    with pytest.warns(RuntimeWarning, match="cannot cross to the program"):
        assert code_reward([None], [code], [tests], limits=LIMITS) == [3 / 7]


@needs_sandbox
@pytest.mark.parametrize("code", ["raise SystemExit(0)", "import time\ntime.sleep(60)",
                                  "def f(:\n    pass", "x = 1 / 0"])
def test_a_program_that_does_not_load_fails_every_test(code):
    verdict = run_assert_tests(code, ["assert f() == 1", "assert f"], LIMITS)
    assert verdict.passed == [False, False] and verdict.error is None


@needs_sandbox
def test_stdin_stdout_tests():
    echo = "n = int(input())\nprint(n * 2)  \nprint()\n"
    tests = [{"input": "4\n", "output": "8\n"}, {"input": "1", "output": "3"},
             {"input": "x", "output": ""}]  # a crash fails even with matching output
    assert code_reward([None], [echo], [tests], limits=LIMITS) == [1 / 3]
    mixed = [{"input": "2", "output": "4"}, "assert callable(f) and f() == 1"]
    good = "def f():\n    return 1\nif __name__ == '__main__':\n    print(int(input()) * 2)\n"
    assert code_reward([None], [good], [mixed], limits=LIMITS) == [0.5]  # the import reads stdin


def test_same_output():
    assert same_output("a  \nb\n\n\n", "a\nb")
    assert not same_output("a\n\nb", "a\nb") and not same_output(" a", "a")


def test_literals_round_trip_and_refuse():
    refs = []

    def ref(obj):
        refs.append(obj)
        return len(refs) - 1

    class Sub(int):
        pass

    value = [None, True, 1, -2.5, math.inf, "x", (1, (2,)), {1}, frozenset({2}),
             {"k": [1, {2: 3}]}, b"\x00", 1j, Sub(3), object]
    encoded = encode_literal(value, ref)
    assert encoded[-2:] == [{"ref": 0}, {"ref": 1}] and refs[0] == 3  # not literals: refs
    back = decode_literal(encoded, lambda n: ("ref", n))
    assert back[:-2] == value[:-2] and back[-2:] == [("ref", 0), ("ref", 1)]
    assert type(back[6]) is tuple and type(back[7]) is set and type(back[10]) is bytes
    deep = []
    for _ in range(300):
        deep = [deep]
    for bad in [{"tuple": [1], "x": 1}, {"list": [1]}, {"bytes": 1}, {"ref": -1}, {"ref": True},
                {"complex": [True, 1]}, {"dict": [[1]]}, deep]:
        with pytest.raises(BadLiteral):
            decode_literal(bad, lambda n: n)


REFUSED = {
    "assert eval(f()) == 1": "uses eval",
    "assert getattr(Solution(), 'f')() == 1": "uses getattr",
    "assert f().__class__ is int": "attribute __class__",
    "import numpy\nassert f(1)": "imports numpy",
    "from solution import f\nassert f(1)": "imports solution",
    "assert sorted([2, 1]) == [1, 2]": "uses no name the program could define",
    "assert f(": "does not parse",
}


@pytest.mark.parametrize("test", list(REFUSED))
def test_refused_tests_name_their_row(test):
    rows = [{"prompt": "p", "tests": ["assert f(1) == 2", {"input": "1", "output": "2"}]},
            {"prompt": "q", "tests": ["assert f(1) == 2", test]}]
    with pytest.raises(ValueError, match=rf"row 1: test 1 is refused: it .*{REFUSED[test]}"):
        load_dataset(rows)
    if "no name" in REFUSED[test]:  # code_reward lets it through, scored by the program loading
        assert len(parse_tests([test], "t", vacuous=True)) == 1
    else:
        with pytest.raises(ValueError, match=r"tests\[0\]: test 0 is refused"):
            code_reward([None], ["def f(): pass"], [[test]], limits=LIMITS)
    assert load_dataset(rows[:1])[0]["tests"] == rows[0]["tests"]
