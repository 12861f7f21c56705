import dlmkern
import torch


def test_build_info_reports_build_and_runtime():
    info = dlmkern.build_info()
    for key in ("torch_version", "torch_version_built", "cuda_kernels_built", "cuda_archs",
                "cxx_compiler", "cuda_compiler", "cuda_available", "python"):
        assert key in info
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_kernels_built"], bool)
    # CUDA kernels are registered exactly when they were built.
    assert info["cuda_kernels_registered"] == info["cuda_kernels_built"]
    if info["cuda_kernels_built"]:
        assert info["cuda_archs"] and info["cuda_compiler"]


def test_ops_are_registered_with_cpu_kernels():
    for op in ("masked_logprobs", "masked_logprobs_backward", "logprobs_from_logits",
               "logprobs_from_logits_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dlmkern::{op}", "CPU")
