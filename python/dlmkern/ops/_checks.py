"""Argument checks the op wrappers run before dispatch (where mixed devices would otherwise be
routed to whichever backend wins, with a less helpful message)."""

from __future__ import annotations

import torch


def check_tensors(op: str, first: str, **tensors):
    """Every non-None argument is a tensor on the device of `first`."""
    device = tensors[first].device if isinstance(tensors[first], torch.Tensor) else None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"dlmkern.{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.device != device:
            raise ValueError(
                f"dlmkern.{op}: `{name}` must be on {device} like `{first}`, got {t.device}"
            )
