"""masked_logprobs and logprobs_from_logits (SPEC 2.3): public wrappers, fake and autograd.

The kernels return (logp, entropy, lse) fp32; lse is kept for the backward pass (which recomputes
the logits chunk by chunk) and is not differentiable.
"""

from __future__ import annotations

import torch

from dlmkern import _build  # noqa: F401  (loads the extension that defines the ops)
from dlmkern.ops import backend, reference
from dlmkern.ops._checks import check_tensors


def masked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """Log-probabilities of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    hidden ``[N, H]`` and weight ``[V, H]`` (the lm_head) in fp32 / fp16 / bf16, targets ``[N]``
    int64, rows: optional int64 indices or bool mask ``[N]`` selecting the rows to compute.
    Returns logp ``[n]`` fp32 (and entropy ``[n]`` fp32 when ``return_entropy``) for the selected
    rows, in their order. Rows whose target equals ``ignore_index`` give 0 and no gradient.
    The ``[N, V]`` logits are never materialized (vocabulary streamed in chunks with an online
    log-sum-exp); the backward pass recomputes them chunk by chunk.

    A bool ``rows`` mask is turned into indices with ``nonzero()`` (a host sync, and not allowed
    inside CUDA-graph capture); pass int64 indices on hot or captured paths. Out-of-range targets
    and indices raise IndexError at once on the CPU; on CUDA they are checked on the device (no
    host sync; indices clamped for the gather) and reported by
    :func:`dlmkern.ops.check_device_errors`.
    """
    check_tensors(
        "masked_logprobs", "hidden", hidden=hidden, weight=weight, targets=targets, rows=rows
    )
    if backend.is_reference():
        return reference.masked_logprobs(hidden, weight, targets, rows=rows,
                                         temperature=temperature, return_entropy=return_entropy,
                                         ignore_index=ignore_index)
    logp, entropy, _ = backend.ops().masked_logprobs(
        hidden, weight, targets, rows, float(temperature), int(ignore_index)
    )
    return (logp, entropy) if return_entropy else logp


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """Like :func:`masked_logprobs` for callers that already hold logits ``[..., V]``.

    targets has the leading shape of logits; results are fp32 with that shape.
    """
    check_tensors("logprobs_from_logits", "logits", logits=logits, targets=targets)
    if logits.dim() < 1:
        raise ValueError("dlmkern.logprobs_from_logits: `logits` must have a vocabulary dimension")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            "dlmkern.logprobs_from_logits: `targets` must have shape "
            f"{tuple(logits.shape[:-1])} (logits without the last dim), got {tuple(targets.shape)}"
        )
    if backend.is_reference():
        return reference.logprobs_from_logits(logits, targets, temperature=temperature,
                                              return_entropy=return_entropy,
                                              ignore_index=ignore_index)
    lead = logits.shape[:-1]
    logp, entropy, _ = backend.ops().logprobs_from_logits(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        float(temperature),
        int(ignore_index),
    )
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp


# ---- fake (meta) implementations ---------------------------------------------------------------


@torch.library.register_fake("dlmkern::masked_logprobs")
def _masked_logprobs_fake(hidden, weight, targets, rows, temperature, ignore_index):
    torch._check(hidden.dim() == 2, lambda: "dlmkern.masked_logprobs: `hidden` must be 2-D")
    torch._check(weight.dim() == 2, lambda: "dlmkern.masked_logprobs: `weight` must be 2-D")
    torch._check(
        weight.shape[1] == hidden.shape[1],
        lambda: "dlmkern.masked_logprobs: `weight` and `hidden` hidden sizes differ",
    )
    if rows is None:
        n = hidden.shape[0]
    elif rows.dtype == torch.bool:
        n = torch.library.get_ctx().new_dynamic_size()
    else:
        n = rows.shape[0]
    return tuple(hidden.new_empty((n,), dtype=torch.float32) for _ in range(3))


@torch.library.register_fake("dlmkern::masked_logprobs_backward")
def _masked_logprobs_backward_fake(
    grad_logp, grad_entropy, hidden, weight, targets, rows, lse, entropy, temperature,
    ignore_index, output_mask,
):
    dh = torch.empty_like(hidden) if output_mask[0] else hidden.new_empty((0,))
    dw = torch.empty_like(weight) if output_mask[1] else weight.new_empty((0,))
    return dh, dw


@torch.library.register_fake("dlmkern::logprobs_from_logits")
def _logprobs_from_logits_fake(logits, targets, temperature, ignore_index):
    torch._check(logits.dim() == 2, lambda: "dlmkern.logprobs_from_logits: `logits` must be 2-D")
    return tuple(logits.new_empty((logits.shape[0],), dtype=torch.float32) for _ in range(3))


@torch.library.register_fake("dlmkern::logprobs_from_logits_backward")
def _logprobs_from_logits_backward_fake(
    grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index
):
    return torch.empty_like(logits)


# ---- autograd -----------------------------------------------------------------------------------


def _masked_setup(ctx, inputs, output):
    hidden, weight, targets, rows, temperature, ignore_index = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, rows, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.ops = temperature, ignore_index, backend.ops()
    ctx.mark_non_differentiable(lse)


def _masked_backward(ctx, g_logp, g_entropy, _g_lse):
    hidden, weight, targets, rows, lse, entropy = ctx.saved_tensors
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = ctx.ops.masked_logprobs_backward(
        g_logp, g_entropy, hidden, weight, targets, rows, lse, entropy,
        ctx.temperature, ctx.ignore_index, [want_h, want_w],
    )
    return (dh if want_h else None, dw if want_w else None, None, None, None, None)


torch.library.register_autograd(
    "dlmkern::masked_logprobs", _masked_backward, setup_context=_masked_setup
)


def _logits_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.ops = temperature, ignore_index, backend.ops()
    ctx.mark_non_differentiable(lse)


def _logits_backward(ctx, g_logp, g_entropy, _g_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    d_logits = ctx.ops.logprobs_from_logits_backward(
        g_logp, g_entropy, logits, targets, lse, entropy, ctx.temperature, ctx.ignore_index
    )
    return d_logits, None, None, None


torch.library.register_autograd(
    "dlmkern::logprobs_from_logits", _logits_backward, setup_context=_logits_setup
)
