"""block_attention (SPEC 2.1) and decode_attention (SPEC 2.2): wrappers, fake and autograd."""

from __future__ import annotations

import torch

from dlmkern import _build  # noqa: F401  (loads the extension that defines the ops)
from dlmkern.ops import backend, reference
from dlmkern.ops._checks import check_device_errors, check_tensors
from dlmkern.ops.layouts import Layout


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | Layout,
    block: torch.Tensor | None = None,
    stream: torch.Tensor | None = None,
    *,
    full: bool = False,
    scale: float | None = None,
):
    """Attention over packed sequences with the block-diffusion visibility rule.

    q ``[T, Hq, D]``, k / v ``[T, Hkv, D]`` (Hq a multiple of Hkv), ``cu_seqlens`` int32
    ``[S + 1]``, ``block`` / ``stream`` int32 ``[T]`` (see :mod:`dlmkern.ops.layouts`; a
    :class:`Layout` may be passed in place of the three). Query q sees key k of its sequence iff
    ``stream[q] == 0``: k is clean and ``block[k] <= block[q]``; ``stream[q] == r >= 1``: k is
    clean and ``block[k] < block[q]``, or k is in noisy copy r and ``block[k] == block[q]``.
    ``full=True`` is bidirectional attention per sequence. Returns ``(out [T, Hq, D],
    lse [Hq, T] fp32)``; differentiable in q, k and v. No T x T mask is ever built.
    Impossible ``cu_seqlens`` / ``stream`` values raise at once on the CPU; on CUDA (no host
    read per call) they are reported by :func:`check_device_errors`.
    """
    if isinstance(cu_seqlens, Layout):
        layout = cu_seqlens
        cu_seqlens, block, stream = layout.cu_seqlens, layout.block, layout.stream
        full = full or layout.full
    if block is None or stream is None:
        if not full:
            raise ValueError("dlmkern.block_attention: `block` and `stream` are required "
                             "unless full=True")
        block = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
        stream = block
    check_tensors("block_attention", "q", q=q, k=k, v=v, cu_seqlens=cu_seqlens, block=block,
                   stream=stream)
    if backend.is_reference():
        return reference.block_attention(q, k, v, cu_seqlens, block, stream, full=bool(full),
                                         scale=scale)
    return backend.ops().block_attention(q, k, v, cu_seqlens, block, stream, bool(full),
                                         None if scale is None else float(scale))


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    commit: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """One denoising step of each sequence's current block against its KV cache.

    q ``[T, Hq, D]`` and k_new / v_new ``[T, Hkv, D]`` hold the current blocks of S sequences
    (varlen, ``cu_seqlens_q`` int32 ``[S + 1]``); ``k_cache`` / ``v_cache`` ``[S, max_len, Hkv, D]``
    hold their prefixes, ``cache_seqlens`` int32 ``[S]`` long. Each block attends to its prefix and,
    bidirectionally, to itself. ``commit=True`` appends the block's k / v to the cache and advances
    ``cache_seqlens`` in the same call (after computing the output). Inference only (no autograd).
    Impossible ``cache_seqlens`` / ``cu_seqlens_q`` values (or a commit past ``max_len``) raise
    at once on the CPU, writing nothing; on CUDA (no host read per call) the sequence's reads are
    clamped, its commit is skipped and :func:`check_device_errors` reports it.
    """
    check_tensors("decode_attention", "q", q=q, k_new=k_new, v_new=v_new, k_cache=k_cache,
                   v_cache=v_cache, cache_seqlens=cache_seqlens, cu_seqlens_q=cu_seqlens_q)
    if backend.is_reference():
        return reference.decode_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens,
                                          cu_seqlens_q, commit=bool(commit), scale=scale)
    return backend.ops().decode_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens,
                                          cu_seqlens_q, bool(commit),
                                          None if scale is None else float(scale))


# The former name of check_device_errors (the flag began with the attention layouts).
check_layout_errors = check_device_errors


@torch.library.register_fake("dlmkern::block_attention")
def _block_attention_fake(q, k, v, cu_seqlens, block, stream, full, scale):
    torch._check(q.dim() == 3 and k.dim() == 3, lambda: "q and k must be [T, H, D]")
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("dlmkern::block_attention_backward")
def _block_attention_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, block, stream, full,
                                   scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("dlmkern::decode_attention")
def _decode_attention_fake(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cu_seqlens_q, commit,
                           scale):
    return torch.empty_like(q)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, block, stream, full, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, block, stream)
    ctx.full, ctx.scale, ctx.ops = full, scale, backend.ops()
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, block, stream = ctx.saved_tensors
    dq, dk, dv = ctx.ops.block_attention_backward(grad_out.contiguous(), q, k, v, out, lse,
                                                  cu_seqlens, block, stream, ctx.full, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("dlmkern::block_attention", _backward, setup_context=_setup)
