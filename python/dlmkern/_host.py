"""Where host-side work runs, and the one way hot loops read device values back.

Layouts, training rows and sampler plans are built on the CPU and moved to the model's device in
one copy. ``on_host`` pins a builder's factory calls to the CPU even when the caller set another
default device (``torch.set_default_device("cuda")``), so no builder silently creates device
tensors (and then syncs reading them back).

``read`` is how the sampler and the update read device values (a sampler block's tokens, a
micro-batch's loss statistics): all the tensors of one decision in one synchronisation, counted
in ``READS`` (tests assert the count does not grow with sequences or layers). While
``dlmkern.plan`` runs the real step on fake tensors (``planned``), a read returns zeros of each
tensor's shape, the planner's worst case: no EOS is seen, no block finishes early, every loss is
finite; samplers run one chunk of sequences and stop after the planned number of blocks (every
later block and chunk has the same shapes: the KV cache and the step buffers are allocated for
the whole generation up front; a full-attention prefix cache, which grows, runs every block),
and the update runs the planned number of micro-batches of its first mini-batch (every later one
is cut to the same token budget).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

HOST = torch.device("cpu")


@dataclasses.dataclass
class _Reads:
    count: int = 0   # read() calls (one device synchronisation each, on CUDA)


READS = _Reads()


@dataclasses.dataclass
class Planning:
    """What the planner decides in place of device values it cannot read."""

    blocks: int = 2  # sampler blocks run per generate() call (the rest repeat their shapes)
    passes: int = 2  # micro-batches run of one mini-batch (the second holds the first's sums)


_PLANNING: Planning | None = None


def planning() -> Planning | None:
    """The planner's decisions while dlmkern.plan runs a step on fake tensors, else None."""
    return _PLANNING


@contextlib.contextmanager
def planned(decisions: Planning | None = None):
    """Runs the block as the planner: reads return zeros, samplers stop early (see module doc)."""
    global _PLANNING
    old, _PLANNING = _PLANNING, decisions or Planning()
    try:
        yield _PLANNING
    finally:
        _PLANNING = old


def _real_modes_off():
    """No dispatch mode (fake tensors, memory trackers) for the block: host work stays real."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def read(*tensors: torch.Tensor) -> list:
    """Each tensor's values as Python scalars / lists (``tolist``), with one synchronisation for
    all of them (device tensors are copied to the host asynchronously, then the streams they
    were queued on are waited for once). Counted in READS. Planning: zeros of each shape."""
    READS.count += 1
    if _PLANNING is not None:
        with _real_modes_off():
            return [torch.zeros(t.shape, dtype=t.dtype).tolist() for t in tensors]
    host = [t.detach().to(HOST, non_blocking=True) for t in tensors]
    for dev in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.current_stream(dev).synchronize()
    return [h.tolist() for h in host]


def read_floats(values: dict) -> dict:
    """{key: float} of a dict of 0-d tensors (and floats), in one read."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if k not in keys}
    if keys:
        stacked = torch.stack([_gathered(values[k]).detach().reshape(()).double() for k in keys])
        out.update(zip(keys, read(stacked)[0], strict=True))
    return {k: out[k] for k in values}


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of t's value: a DTensor (an FSDP gradient norm) is gathered (every rank
    reads at the same point, so the collective is matched)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def on_host(fn):
    """Decorator: run ``fn`` with the CPU as the default device for factory calls (and, while
    planning, on real tensors: host bookkeeping is never faked or counted as device memory)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced: dynamo cannot enter a device context, and
            return fn(*args, **kwargs)     # the compiled graph places its own tensors
        if _PLANNING is not None:
            with _real_modes_off(), HOST:
                return fn(*args, **kwargs)
        if torch.get_default_device() == HOST:  # already: the device context would only add
            return fn(*args, **kwargs)          # a dispatch hook to every torch call inside
        with HOST:
            return fn(*args, **kwargs)

    return wrapper
