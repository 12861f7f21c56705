"""The world a planned step runs in: fake tensors for everything on the device, a fake process
group standing for N ranks (every rank runs this process's worst case), and dlmkern's planning
mode (host reads answered by the planner, see dlmkern._host)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from dlmkern._host import Planning, planned


@contextlib.contextmanager
def _fake_process_group(ranks: int):
    """torch's fake process group (collectives return this rank's data) and the torchrun
    variables dlmkern reads, for the block; nothing when ranks == 1."""
    if ranks <= 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("dlmkern.plan: a process group is already initialised; plan runs "
                           "in its own process (not under torchrun)")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    env = {"WORLD_SIZE": str(ranks), "RANK": "0", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": str(ranks)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("fake", rank=0, world_size=ranks, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fake_world(ranks: int = 1, blocks: int = 2):
    """Fake tensors, a fake process group of `ranks`, and the planner's host decisions (samplers
    run `blocks` blocks)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_process_group(ranks), planned(Planning(blocks=blocks)), mode:
        yield mode


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created in the block are `dtype` (no copy, no cast: a fake parameter cannot be
    converted in place)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
