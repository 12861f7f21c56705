"""Argument checks: those the op wrappers run before dispatch (where mixed devices would otherwise
be routed to whichever backend wins, with a less helpful message), and the reader of the
device-side error flag that the CUDA ops set instead of reading argument values on the host."""

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


def check_device_errors(device: torch.device | str | None = None) -> None:
    """Raises if an op on ``device`` (default: the current CUDA device, else the CPU) met
    impossible argument values since the last check, naming them, and clears the record.

    On CUDA the ops never read argument values on the host (each read is a device sync, per call
    and per layer): the kernels keep every access inside the tensors whatever ``cu_seqlens``,
    ``stream``, ``cache_seqlens``, ``cu_seqlens_q``, ``targets``, ``rows`` or ``seq_ids`` hold,
    and set a bit of a device-side flag for each impossible value. This reads that flag: one
    host read, at a point of the caller's choosing (once per sampler block or training step,
    where it syncs anyway). IndexError for out-of-range ``targets`` / ``rows`` / ``seq_ids``
    alone, else ValueError. The CPU kernels check on every call and raise at once (reading a CPU
    tensor costs no sync), so on the CPU there is never anything to report here."""
    from dlmkern.ops import backend

    if device is None:
        on_cuda = torch.cuda.is_available() and backend.current() != "emulator"
        device = "cuda" if on_cuda else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend.ops()._check_device_errors(device)
