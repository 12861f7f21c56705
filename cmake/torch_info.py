"""Prints what CMake needs from the installed torch as `KEY=VALUE;`-separated CMake list entries.

Run by CMakeLists.txt at configure time so the extension is built against exactly the torch in
the active environment (hence `pip install --no-build-isolation`).
"""

import glob
import os
import sys

import torch
import torch.utils.cpp_extension as ce


def _nvidia_dirs(sub):
    # CUDA wheels ship headers / libraries under site-packages/nvidia/cu*/ (cuBLAS etc.).
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", sub))) + sorted(
        glob.glob(os.path.join(site, "nvidia", "*", sub))
    )


info = {
    "TORCH_VERSION": torch.__version__,
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_CXX11_ABI": int(torch._C._GLIBCXX_USE_CXX11_ABI),
    "TORCH_INCLUDE_DIRS": "|".join(ce.include_paths()),
    "TORCH_LIB_DIR": os.path.join(os.path.dirname(torch.__file__), "lib"),
    "NVIDIA_INCLUDE_DIRS": "|".join(_nvidia_dirs("include")),
    "NVIDIA_LIB_DIRS": "|".join(_nvidia_dirs("lib")),
}
sys.stdout.write(";".join(f"{k}={v}" for k, v in info.items()))
