"""Which implementation the public ops run: the one switch for every caller.

- ``"native"`` (default): the C++ / CUDA kernels, ``torch.ops.dlmkern.*``.
- ``"reference"``: the pure-torch references of :mod:`dlmkern.ops.reference` (dense masks, full
  logits, eager loss), through the same public wrappers and argument checks; autograd is plain
  torch autograd. Used for convergence tests and as the peers' baseline in benchmarks.
- ``"emulator"``: the CUDA glue and kernels compiled against the CPU emulator of CUDA
  (``torch.ops.dlmkern_emu.*``, CPU tensors; built with ``DLMKERN_CUDA_EMU=ON``, tests only).

``use_backend(name)`` switches for the whole process and returns a handle that, used as a context
manager, switches back on exit::

    with dlmkern.ops.use_backend("reference"):
        loss = trainer.train_step()
"""

from __future__ import annotations

import importlib

import torch

BACKENDS = ("native", "reference", "emulator")
_current = "native"
_emu_autograd = False


def current() -> str:
    """The backend the public ops run now."""
    return _current


def is_reference() -> bool:
    return _current == "reference"


def ops():
    """The op namespace of the kernel backends (native or emulator)."""
    return torch.ops.dlmkern_emu if _current == "emulator" else torch.ops.dlmkern


def emulator_available() -> bool:
    """Whether dlmkern was built with the CUDA emulator module (``dlmkern._C_emu``)."""
    try:
        importlib.import_module("dlmkern._C_emu")
    except ImportError:
        return False
    return True


class _Scope:
    def __init__(self, previous: str):
        self.previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _set(self.previous)
        return False


def _set(name: str) -> None:
    global _current
    if name == "emulator":
        _register_emulator_autograd()
    _current = name


def use_backend(name: str) -> _Scope:
    """Switch the public ops to backend ``name`` (see the module docstring); returns a handle
    whose ``with`` block restores the previous backend."""
    if name not in BACKENDS:
        raise ValueError(f"dlmkern.ops.use_backend: unknown backend {name!r}; expected one of "
                         f"{BACKENDS}")
    if name == "emulator" and not emulator_available():
        raise RuntimeError("dlmkern.ops.use_backend: the 'emulator' backend needs dlmkern built "
                           "with DLMKERN_CUDA_EMU=ON (scripts/test.sh builds it)")
    previous = _current
    _set(name)
    return _Scope(previous)


# op -> (module, backward, setup_context) of the native op's autograd registration, reused for
# the emulator's ops (same schemas, same formulas)
_AUTOGRAD = {
    "block_attention": ("dlmkern.ops.attention", "_backward", "_setup"),
    "masked_logprobs": ("dlmkern.ops.logprobs", "_masked_backward", "_masked_setup"),
    "logprobs_from_logits": ("dlmkern.ops.logprobs", "_logits_backward", "_logits_setup"),
    "policy_value_loss": ("dlmkern.ops.policy_value_loss", "_pv_backward", "_pv_setup"),
}


def _register_emulator_autograd() -> None:
    global _emu_autograd
    if _emu_autograd:
        return
    importlib.import_module("dlmkern._C_emu")
    for op, (mod, backward, setup) in _AUTOGRAD.items():
        m = importlib.import_module(mod)
        torch.library.register_autograd(f"dlmkern_emu::{op}", getattr(m, backward),
                                        setup_context=getattr(m, setup))
    _emu_autograd = True
