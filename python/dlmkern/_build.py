"""Loads the compiled extension and reports how it was built."""

from __future__ import annotations

import platform

import torch

try:
    from dlmkern import _C  # noqa: F401  (loading registers torch.ops.dlmkern.*)
    from dlmkern._build_info import BUILD_INFO
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "dlmkern's compiled extension dlmkern._C could not be loaded. Build it against the "
        "installed torch with `pip install --no-build-isolation -e .` "
        f"(torch here: {torch.__version__}). Cause: {exc}"
    ) from exc


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dlmkern::{op}", key)


def build_info() -> dict:
    """How the extension was built, and what this process can run.

    Keys: torch_version (running), torch_version_built, cuda_kernels_built, cuda_archs,
    cxx_compiler, cuda_compiler, cuda_available, python.
    """
    info = dict(BUILD_INFO)
    info["torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_kernels_registered"] = _has_kernel("masked_logprobs", "CUDA")
    info["python"] = platform.python_version()
    return info
