"""What a code test is (SPEC 5) and which ones the code reward refuses, before any program runs.

A row's `tests` is one test or a list of them. A test is either
- assert-style: Python statements (text) run by the trusted driver (`verdict.py`), the program's
  names reaching into the program's sandbox; or
- stdin/stdout: {"input": text, "output": text}: the program runs with that stdin and the trainer
  compares what it printed with the output (trailing whitespace of each line and trailing blank
  lines ignored).

Refused (a ValueError naming the row and the test), because the driver could not decide them
soundly: a test that does not parse; one that uses eval / exec / compile / __import__ / getattr
and the like (a string from the program would run, or reach the driver's own objects, inside the
driver), reads a dunder attribute (`x.__class__`: interpreter internals), imports a module outside
the standard library (the driver has nothing else), or uses no name the program could define
(only builtins, standard-library modules and its own names: it would pass for any program that
loads). `check_code_tests` is what dataset loading calls on a `tests` column.
"""

from __future__ import annotations

import ast
import builtins
import sys
from dataclasses import dataclass

from dlmkern.rewards._test_driver import module_names

REFUSED_NAMES = frozenset({
    "eval", "exec", "compile", "__import__", "breakpoint", "globals", "locals", "vars", "open",
    "input", "getattr", "setattr", "delattr", "exit", "quit", "help",
})
_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class IOTest:
    """A stdin/stdout test: the program's output for `stdin` must be `stdout`."""

    stdin: str
    stdout: str


def _bound_and_loaded(tree) -> tuple[set, set]:
    bound, loaded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound, loaded


VACUOUS = "uses no name the program could define: it would pass for any program that loads"


def assert_test_problem(source: str) -> str | None:
    """Why the driver cannot decide the assert-style test `source` soundly (VACUOUS: it decides
    nothing about the program), or None."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:
        return f"does not parse ({e})"
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in REFUSED_NAMES:
            return f"uses {node.id}, which could run the program's strings inside the driver"
        if isinstance(node, ast.Attribute) and node.attr.startswith("__"):
            return f"reads the attribute {node.attr} (interpreter internals)"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] not in sys.stdlib_module_names:
                    return f"imports {name or 'a relative module'}, which is not in the " \
                           "standard library (the driver has nothing else)"
    bound, loaded = _bound_and_loaded(tree)
    if not loaded - bound - _BUILTINS - module_names(tree):
        return VACUOUS
    return None


def parse_tests(tests, where: str, vacuous: bool = False) -> list:
    """One row's tests as a list of assert-style sources (str) and IOTests; a ValueError naming
    `where` and the test for anything the code reward cannot decide soundly (with `vacuous`,
    a test that uses nothing of the program is let through: code_reward scores it by whether
    the program loaded, and warns)."""
    items = [tests] if isinstance(tests, (str, dict)) else tests
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{where}: tests must be a test or a list of tests (assert statements "
                         f"as text, or {{'input': ..., 'output': ...}}), got "
                         f"{type(tests).__name__}")
    out = []
    for j, t in enumerate(items):
        if isinstance(t, dict) and set(t) == {"input", "output"} and \
                all(isinstance(v, str) for v in t.values()):
            out.append(IOTest(t["input"], t["output"]))
        elif isinstance(t, str):
            problem = assert_test_problem(t)
            if problem and not (vacuous and problem == VACUOUS):
                raise ValueError(f"{where}: test {j} is refused: it {problem}: {t!r:.120}")
            out.append(t)
        else:
            raise ValueError(f"{where}: test {j} must be assert statements (text) or "
                             f"{{'input': text, 'output': text}}, got {t!r:.80}")
    return out


def check_code_tests(tests, where: str) -> None:
    """Dataset loading: refuses a row whose `tests` the code reward cannot decide soundly."""
    parse_tests(tests, where)


def same_output(printed: str, expected: str) -> bool:
    """stdin/stdout tests: equal up to trailing whitespace on each line and trailing blank
    lines."""
    def norm(text: str) -> list[str]:
        lines = [ln.rstrip() for ln in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines
    return norm(printed) == norm(expected)
