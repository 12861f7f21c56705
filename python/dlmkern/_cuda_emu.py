"""Run dlmkern's CUDA code paths on the CPU (tests only).

``dlmkern._C_emu`` (built with ``DLMKERN_CUDA_EMU=ON``; ``scripts/setup.sh`` does) holds the CUDA
glue of ``csrc/cuda/*_cuda.cpp`` and the kernels of ``csrc/cuda/*.cu`` compiled as C++ against a
CPU emulator of the CUDA features they use (``csrc/emu/README.md``), registered as
``torch.ops.dlmkern_emu.*`` for CPU tensors. Inside :func:`emulated_cuda` the Python ops
(``dlmkern.ops.*``, so also the models, samplers and trainers) call those instead of
``torch.ops.dlmkern.*``: the same wrappers and autograd formulas, the CUDA kernels' arithmetic.

What this verifies: the kernels' indexing, tiling, fragment layouts, masking, reductions and
the glue's contracts. What it cannot: timing, memory-model races the emulator's schedules do not
provoke, compiler / PTX issues, anything about real GPU hardware.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

_OP_MODULES = ("dlmkern.ops.attention", "dlmkern.ops.logprobs", "dlmkern.ops.policy_value_loss")
_AUTOGRAD = {  # op -> (module, backward, setup_context) of the real op's registration
    "block_attention": ("dlmkern.ops.attention", "_backward", "_setup"),
    "masked_logprobs": ("dlmkern.ops.logprobs", "_masked_backward", "_masked_setup"),
    "logprobs_from_logits": ("dlmkern.ops.logprobs", "_logits_backward", "_logits_setup"),
    "policy_value_loss": ("dlmkern.ops.policy_value_loss", "_pv_backward", "_pv_setup"),
}
_registered = False


def available() -> bool:
    """Whether dlmkern was built with the CUDA emulator module."""
    try:
        importlib.import_module("dlmkern._C_emu")
    except ImportError:
        return False
    return True


def _register_autograd() -> None:
    global _registered
    if _registered:
        return
    importlib.import_module("dlmkern._C_emu")
    for op, (mod, backward, setup) in _AUTOGRAD.items():
        m = importlib.import_module(mod)
        torch.library.register_autograd(f"dlmkern_emu::{op}", getattr(m, backward),
                                        setup_context=getattr(m, setup))
    _registered = True


def configure(*, capturing: bool = False, schedule: str = "forward", seed: int = 0) -> None:
    """capturing: the glue sees an active CUDA-graph capture (no host value checks, device-side
    error flags). schedule: the order emulated threads run in between barriers ("forward",
    "reverse", "random"); results that change with it reveal a missing barrier."""
    order = {"forward": 0, "reverse": 1, "random": 2}[schedule]
    torch.ops.dlmkern_emu._emu_config(capturing, order, seed)


@contextlib.contextmanager
def emulated_cuda(*, capturing: bool = False, schedule: str = "forward", seed: int = 0):
    """Route dlmkern.ops through the emulated CUDA kernels (CPU tensors, bf16 / fp16 attention)."""
    _register_autograd()
    mods = [importlib.import_module(m) for m in _OP_MODULES]
    saved = [m._ops for m in mods]
    configure(capturing=capturing, schedule=schedule, seed=seed)
    try:
        for m in mods:
            m._ops = torch.ops.dlmkern_emu
        yield
    finally:
        for m, ops in zip(mods, saved, strict=True):
            m._ops = ops
        configure()
