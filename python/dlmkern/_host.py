"""Where host-side work runs: layouts, training rows and sampler plans are built on the CPU and
moved to the model's device in one copy. ``on_host`` pins a builder's factory calls to the CPU
even when the caller set another default device (``torch.set_default_device("cuda")``), so no
builder silently creates device tensors (and then syncs reading them back)."""

from __future__ import annotations

import functools

import torch

HOST = torch.device("cpu")


def on_host(fn):
    """Decorator: run ``fn`` with the CPU as the default device for factory calls."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced: dynamo cannot enter a device context, and
            return fn(*args, **kwargs)     # the compiled graph places its own tensors
        if torch.get_default_device() == HOST:  # already: the device context would only add
            return fn(*args, **kwargs)          # a dispatch hook to every torch call inside
        with HOST:
            return fn(*args, **kwargs)

    return wrapper
