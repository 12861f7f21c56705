import dlmkern  # noqa: F401  (registers the ops)
import pytest
import torch

HAS_CUDA = torch.cuda.is_available() and dlmkern.build_info()["cuda_kernels_registered"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and dlmkern built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    """Device params: cpu always, cuda marked (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
