"""Mistakes refused before work starts, each naming the thing at fault: what a reward function
accepts and returns, the dataset columns a trainer or a reward needs, an output directory that
holds a previous run; and non-finite training stopped (or skipped) before the optimizer applies
it."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import re
import shutil

import torch

from dlmkern.trainers.config import OUTPUT_DIR_POLICIES

_P = inspect.Parameter


# ---- rewards ----------------------------------------------------------------------------------

def reward_name(fn) -> str:
    return getattr(fn, "__name__", repr(fn))


class RewardSpec:
    """How the trainer calls one reward: ``fn(prompts, completions, **columns)`` with the dataset
    columns its signature names (every column when it takes ``**kwargs``, or when its signature
    cannot be read). ``required``: named parameters without a default: the dataset must have
    them as columns."""

    def __init__(self, fn):
        self.fn = fn
        self.name = reward_name(fn)
        if not callable(fn):
            raise ValueError(f"reward {self.name!r} is not callable")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: every column
            self.names, self.takes_all, self.required = set(), True, []
            return
        params = list(sig.parameters.values())
        positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
        star = any(p.kind is _P.VAR_POSITIONAL for p in params)
        if len(positional) < 2 and not star:
            raise ValueError(f"reward {self.name!r} must accept (prompts, completions, "
                             f"**columns); its signature is {self.name}{sig}")
        rest = [p for p in params if p not in positional[:2]]
        for p in rest:
            if p.kind is _P.POSITIONAL_ONLY and p.default is p.empty:
                raise ValueError(f"reward {self.name!r}: parameter {p.name!r} is positional-only "
                                 "and has no default; columns are passed by keyword")
        named = [p for p in rest if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)]
        self.names = {p.name for p in named}
        self.required = [p.name for p in named if p.default is p.empty]
        self.takes_all = any(p.kind is _P.VAR_KEYWORD for p in params)

    def columns(self, columns: dict) -> dict:
        """The columns this reward receives."""
        if self.takes_all:
            return columns
        return {k: v for k, v in columns.items() if k in self.names}

    def __call__(self, prompts: list, completions: list, columns: dict) -> list[float]:
        """Calls the reward and checks what comes back (see check_reward_output)."""
        out = self.fn(prompts, completions, **self.columns(columns))
        return check_reward_output(self.name, out, len(completions))


class NonFiniteReward(ValueError):
    """A reward returned NaN or inf (a ValueError: the reward's mistake)."""


def check_reward_output(name: str, out, n: int) -> list[float]:
    """`out` as n floats; a ValueError naming the reward, the expected length and what came back
    when it is not a list (tuple, 1-D array / tensor) of n real numbers; NonFiniteReward when
    some are NaN or inf."""
    expect = f"expected a list of {n} floats (one per completion)"
    if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
        shape = tuple(getattr(out, "shape", ()))
        if len(shape) != 1:
            raise ValueError(f"reward {name!r} returned an array of shape {shape} for {n} "
                             f"completions; {expect}")
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise ValueError(f"reward {name!r} returned {type(out).__name__} {_short(out)} for {n} "
                         f"completions; {expect}")
    if len(out) != n:
        raise ValueError(f"reward {name!r} returned a {type(out).__name__} of length {len(out)} "
                         f"for {n} completions; {expect}")
    vals = []
    for i, x in enumerate(out):
        if isinstance(x, torch.Tensor) and x.numel() == 1:
            x = x.item()
        if not isinstance(x, numbers.Real):
            raise ValueError(f"reward {name!r} returned {type(x).__name__} {_short(x)} at index "
                             f"{i} of {n}; {expect}")
        vals.append(float(x))
    bad = [(i, v) for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        where = ", ".join(f"{v} at index {i}" for i, v in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteReward(f"reward {name!r} returned non-finite values ({where}{more}) for "
                              f"{n} completions; rewards must be finite floats (on_nonfinite: "
                              "skip drops such steps instead of stopping)")
    return vals


def _short(x, limit: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit - 3] + "..."


# ---- dataset columns --------------------------------------------------------------------------

def require_column(rows: list[dict], column: str, who: str) -> None:
    """A ValueError naming the column, `who` needs it and the first row without it."""
    for i, r in enumerate(rows):
        if column not in r:
            raise ValueError(f"{who} needs column {column!r}, but dataset row {i} has none "
                             f"(its columns: {sorted(r)})")


def check_reward_columns(rows: list[dict], specs: list[RewardSpec]) -> None:
    """Every column a reward requires (a parameter without a default) is in every row."""
    for spec in specs:
        for col in spec.required:
            require_column(rows, col, f"reward {spec.name!r} (parameter {col!r} has no default)")


# ---- output directory -------------------------------------------------------------------------

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir))
            if (_CKPT.match(n) or n == "final")
            and os.path.isfile(os.path.join(out_dir, n, "trainer_state.pt"))]


def holds_run(out_dir: str) -> bool:
    """Whether out_dir holds a previous run: a non-empty log.jsonl or a checkpoint."""
    log = os.path.join(out_dir, "log.jsonl")
    return (os.path.isfile(log) and os.path.getsize(log) > 0) or bool(_checkpoints(out_dir))


def latest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint of out_dir (checkpoint-N or final) with the highest step."""
    best, best_step = None, -1
    for path in _checkpoints(out_dir):
        m = _CKPT.match(os.path.basename(path))
        if m:
            step = int(m.group(1))
        else:  # final: its step is in its state
            meta = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False,
                              map_location="cpu")
            step = int(meta.get("step", 0))
        if step > best_step or (step == best_step and not m):
            best, best_step = path, step
    return best


def _inside(path: str, out_dir: str) -> bool:
    path, out_dir = os.path.realpath(path), os.path.realpath(out_dir)
    return os.path.commonpath([path, out_dir]) == out_dir


def check_output_dir(out_dir: str, policy: str, resume_from: str | None = None) -> None:
    """Refuses (policy "refuse") an output directory that holds a previous run, or (policy
    "resume") one whose run left a log but no checkpoint; changes nothing. A checkpoint to resume
    from inside out_dir continues that run: no policy applies."""
    if policy not in OUTPUT_DIR_POLICIES:
        raise ValueError(f"config: existing_output_dir must be one of {OUTPUT_DIR_POLICIES}, "
                         f"got {policy!r}")
    if resume_from is not None and not os.path.isfile(os.path.join(resume_from,
                                                                   "trainer_state.pt")):
        raise ValueError(f"resume_from {resume_from!r} is not a dlmkern checkpoint directory")
    if resume_from is not None and _inside(resume_from, out_dir):
        return
    if policy == "refuse" and holds_run(out_dir):
        raise ValueError(f"output_dir {out_dir!r} holds a previous run (log.jsonl or "
                         "checkpoints); set existing_output_dir: resume to continue it from its "
                         "latest checkpoint, overwrite to start afresh, or choose another "
                         "output_dir")
    if policy == "resume" and resume_from is None and holds_run(out_dir) and \
            not _checkpoints(out_dir):  # a fresh start would log its steps again after these
        raise ValueError(f"existing_output_dir: resume, but output_dir {out_dir!r} holds no "
                         "checkpoint to resume from, only the log.jsonl of a run that stopped "
                         "before saving one (save_every: 0 saves only at the end); set "
                         "existing_output_dir: overwrite to start afresh (its log is deleted), "
                         "or choose another output_dir")


def prepare_output_dir(out_dir: str, policy: str, writer: bool = True,
                       resume_from: str | None = None) -> str | None:
    """Applies the existing_output_dir policy before a trainer does any work: "refuse" raises on
    a previous run, "overwrite" deletes its log, curves, TensorBoard events and checkpoints (the
    writer rank only; nothing else in the directory), "resume" returns its latest checkpoint
    (None when out_dir holds no run: a fresh start; a log without a checkpoint is refused). An
    explicit `resume_from` checkpoint wins over "resume"; inside out_dir it continues that run
    (no policy applies, nothing is deleted). Returns the checkpoint to resume from."""
    check_output_dir(out_dir, policy, resume_from)
    if resume_from is not None and _inside(resume_from, out_dir):
        return resume_from
    if resume_from is None and policy == "resume":
        return latest_checkpoint(out_dir)
    if policy == "overwrite" and writer and os.path.isdir(out_dir):
        for n in os.listdir(out_dir):
            p = os.path.join(out_dir, n)
            base = n[:-4] if n.endswith(".tmp") else n
            if n in ("log.jsonl", "curves.png"):
                os.remove(p)
            elif n == "tb" or ((_CKPT.match(base) or base == "final") and os.path.isdir(p)
                               and (n.endswith(".tmp") or
                                    os.path.isfile(os.path.join(p, "trainer_state.pt")))):
                shutil.rmtree(p)
    return resume_from


# ---- non-finite training ----------------------------------------------------------------------

def nonfinite_guard(trainer, opt, what: str, values: dict, agree: bool = False) -> bool:
    """True when every value (host floats: loss, grad_norm, ...) is finite: apply the optimizer
    step. Otherwise the gradients are dropped and, by trainer.cfg.on_nonfinite, "stop" raises a
    RuntimeError naming the step, the quantity and its value, "skip" warns and counts the skip
    (trainer.nonfinite_skipped). `agree`: the values differ between ranks; the ranks agree on the
    decision (one collective, distributed runs only)."""
    from dlmkern import distributed

    bad = next(((k, v) for k, v in values.items() if v is not None and not math.isfinite(v)),
               None)
    if agree and trainer.distributed:
        if distributed.all_sum(float(bad is not None)) > 0 and bad is None:
            bad = ("a value on another rank", float("nan"))
    if bad is None:
        return True
    opt.zero_grad(set_to_none=True)
    k, v = bad
    msg = (f"step {trainer.step}: non-finite {k} = {v} in the {what} update; the optimizer step "
           "was not applied")
    if trainer.cfg.on_nonfinite == "stop":
        raise RuntimeError(f"{msg}. Training stopped (on_nonfinite: stop); common causes: a "
                           "learning rate too high, non-finite weights or inputs, fp16 / bf16 "
                           "overflow. on_nonfinite: skip drops such updates and continues")
    trainer.nonfinite_skipped += 1
    trainer.logger.warn(f"{msg} (on_nonfinite: skip; {trainer.nonfinite_skipped} skipped so far)")
    return False
