"""Rewards by name: the one lookup `dlmkern train`, `dlmkern eval` and the Python API share.

A reward is named by a built-in name (``math``, ``exact``, ``code``), by a file and a function in
it (``path/to/file.py:function``, loaded from its path: no PYTHONPATH needed) or by a module and a
function (``module:function``; a module in the current directory is found as ``python -m`` finds
it). A mistake is a ValueError naming the spec and what went wrong, before any work starts."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

FORMS = "math, exact, code, path/to/file.py:function or module:function"


def _cannot(spec: str, reason: str) -> ValueError:
    return ValueError(f"reward {spec!r} cannot be loaded: {reason}")


def exact_reward(prompts: list, completions: list[str], answer: list, **_columns) -> list[float]:
    """1.0 where the whole completion (stripped) is the reference answer, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def _math():
    from dlmkern.rewards.math import math_reward

    return math_reward


def _code():
    from dlmkern.rewards.code import code_reward
    from dlmkern.rewards.sandbox import SandboxUnavailable, require_sandbox

    try:  # found now, not after the first rollout
        require_sandbox()
    except SandboxUnavailable as e:
        raise ValueError(f"reward 'code': {e}") from None
    return code_reward


# name -> (loader, what it scores); the loaders import lazily (code needs a sandbox)
BUILTIN: dict[str, tuple[Callable[[], Callable], str]] = {
    "math": (_math, "the last \\boxed{} of the completion checked with math-verify against the "
                    "answer column"),
    "exact": (lambda: exact_reward, "the whole completion equals the answer column (stripped)"),
    "code": (_code, "the completion's program runs the tests column in a sandbox"),
}


def get_reward(spec) -> Callable:
    """The reward function a spec names (a callable is returned as it is)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"reward {spec!r}: expected a name ({FORMS}) or a function")
    if spec in BUILTIN:
        return BUILTIN[spec][0]()
    where, colon, name = spec.rpartition(":")
    if not colon or not where:
        raise ValueError(f"reward {spec!r}: unknown reward name; use {FORMS}")
    if not name:
        raise ValueError(f"reward {spec!r}: name the function after the colon ({FORMS})")
    if where.endswith(".py") or "/" in where or os.sep in where:
        module, label = _load_file(spec, where), where
    else:
        module, label = _import_module(spec, where), f"module {where}"
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise _cannot(spec, f"{label} has no function {name!r} (it defines: "
                            f"{', '.join(defined) or 'no functions'})")
    fn = getattr(module, name)
    if not callable(fn):
        kind = type(fn).__name__
        article = "an" if kind[:1] in "aeiou" else "a"
        raise _cannot(spec, f"{name} is {article} {kind}, not a function")
    return fn


def get_rewards(specs) -> list[Callable]:
    """Reward functions from one spec or a list of them (a trainer sums them)."""
    items = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    return [get_reward(s) for s in items]


def describe_reward(spec) -> str:
    """One line for people: the spec and what it scores."""
    if isinstance(spec, str) and spec in BUILTIN:
        return f"{spec} ({BUILTIN[spec][1]})"
    return spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))


def _load_file(spec: str, path: str):
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise _cannot(spec, f"file {path} not found (looked for {full})")
    # a private module name per file: never shadows an installed module named like the file
    tag = hashlib.sha1(full.encode()).hexdigest()[:10]
    mod_name = f"_dlmkern_reward_{os.path.splitext(os.path.basename(full))[0]}_{tag}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    loader_spec = importlib.util.spec_from_file_location(mod_name, full)
    if loader_spec is None or loader_spec.loader is None:
        raise _cannot(spec, f"{path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module  # before it runs: dataclasses and pickle look it up there
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: any error is reported by name
        del sys.modules[mod_name]
        raise _cannot(spec, f"loading {path} raised {type(e).__name__}: {e}") from None
    return module


def _import_module(spec: str, name: str):
    cwd = os.getcwd()
    for attempt in range(2):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if not (name == missing or name.startswith(missing + ".")):
                raise _cannot(spec, f"importing {name} raised ModuleNotFoundError: {e}") \
                    from None
            if attempt or cwd in sys.path or "" in sys.path:
                raise _cannot(spec, f"no module named {missing!r} (looked in the current "
                                    f"directory {cwd} and sys.path; a file works too: "
                                    "path/to/file.py:function)") from None
            sys.path.append(cwd)  # as `python -m` does (appended: installed modules win)
        except Exception as e:  # noqa: BLE001 - the user's module: any error is reported
            raise _cannot(spec, f"importing {name} raised {type(e).__name__}: {e}") from None
    raise AssertionError("unreachable")
