"""Run dlmkern's CUDA code paths on the CPU (tests only).

``dlmkern._C_emu`` (built with ``DLMKERN_CUDA_EMU=ON``; ``scripts/setup.sh`` does) holds the CUDA
glue of ``csrc/cuda/*_cuda.cpp`` and the kernels of ``csrc/cuda/*.cu`` compiled as C++ against a
CPU emulator of the CUDA features they use (``csrc/emu/README.md``), registered as
``torch.ops.dlmkern_emu.*`` for CPU tensors. Under ``dlmkern.ops.use_backend("emulator")`` (or
:func:`emulated_cuda`) the Python ops (``dlmkern.ops.*``, so also the models, samplers and
trainers) call those instead of ``torch.ops.dlmkern.*``: the same wrappers and autograd
formulas, the CUDA kernels' arithmetic.

What this verifies: the kernels' indexing, tiling, fragment layouts, masking, reductions and
the glue's contracts. What it cannot: timing, memory-model races the emulator's schedules do not
provoke, compiler / PTX issues, anything about real GPU hardware.
"""

from __future__ import annotations

import contextlib

import torch

from dlmkern.ops import backend

available = backend.emulator_available


def configure(*, capturing: bool = False, schedule: str = "forward", seed: int = 0) -> None:
    """capturing: the glue sees an active CUDA-graph capture (no host value checks, device-side
    error flags). schedule: the order emulated threads run in between barriers ("forward",
    "reverse", "random"); results that change with it reveal a missing barrier."""
    order = {"forward": 0, "reverse": 1, "random": 2}[schedule]
    torch.ops.dlmkern_emu._emu_config(capturing, order, seed)


@contextlib.contextmanager
def emulated_cuda(*, capturing: bool = False, schedule: str = "forward", seed: int = 0):
    """dlmkern.ops on the emulated CUDA kernels (``use_backend("emulator")``, CPU tensors,
    bf16 / fp16 attention), with the emulator configured as given for the block."""
    with backend.use_backend("emulator"):
        configure(capturing=capturing, schedule=schedule, seed=seed)
        try:
            yield
        finally:
            configure()
