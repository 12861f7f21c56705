"""Fused policy-value loss (SPEC 2.4): public wrapper, fake and autograd registrations.

One kernel forward computes the per-token clipped surrogate, k3 KL and clipped value loss, their
reduction and statistics, AND the per-token gradients (before the reduction weight); one kernel
backward scales those by the incoming gradient. logp and values receive gradients; every other
input (old_logp, advantages, ref_logp, old_values, returns) is treated as a constant.
"""

from __future__ import annotations

import torch

from dlmkern import _build  # noqa: F401  (loads the extension that defines the ops)
from dlmkern.ops import backend, reference

REDUCTIONS = {"token_mean": 0, "seq_mean": 1, "sum": 2}
STAT_NAMES = (
    "pg_loss", "kl", "vf_loss", "clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl",
    "ratio_mean", "ratio_max", "vf_clip_frac", "dual_clip_frac", "num_tokens",
)


def policy_value_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    vf_coef: float = 0.5,
    vf_clip: float = 0.2,
    reduction: str = "token_mean",
    seq_ids: torch.Tensor | None = None,
    normalizer: float | None = None,
    num_seqs: int | None = None,
):
    """PPO-style clipped policy loss + k3 KL + clipped value loss over masked tokens.

    Token tensors are ``[T]`` or ``[B, L]`` (fp32 / fp16 / bf16; mask bool). Per token:
    ``ratio = exp(clamp(logp - old_logp, -20, 20))``,
    ``pg = -min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A)`` (bounded by ``dual_clip*|A|``
    for A < 0 when ``dual_clip`` is set), ``kl = exp(x) - x - 1`` with
    ``x = clamp(ref - logp, -20, 20)`` when ``ref_logp`` is given (outside the clamp the KL
    term is constant: no gradient, as for the ratio), and
    ``vf = 0.5*max((V-R)^2, (V_old + clip(V-V_old, ±vf_clip) - R)^2)`` when ``values`` and
    ``returns`` are given (unclipped without ``old_values``).
    ``loss = pg + kl_coef*kl + vf_coef*vf`` reduced by ``reduction``:

    - ``"token_mean"``: sum over masked tokens / their count;
    - ``"seq_mean"``: mean over each sequence's masked tokens, then mean over sequences that have
      any (``seq_ids`` gives each token's sequence; ``[B, L]`` input defaults to one per row).
      Masked tokens belong to no sequence: their ids (padding, often -1) are never read. An
      unmasked token's id outside ``[0, num_seqs)`` raises IndexError at once on the CPU; on
      CUDA (no host sync per call) it makes the loss NaN and
      :func:`dlmkern.ops.check_device_errors` raises the IndexError. Pass ``num_seqs``: without
      it, it is read from ``seq_ids`` (a host sync);
    - ``"sum"``: sum / ``normalizer`` (Dr.GRPO's constant; plain sum when None).

    Returns ``(loss, stats)``; stats is a dict of 0-d fp32 tensors: pg_loss, kl, vf_loss (each
    reduced like the loss), clip_frac (+ _low, _high), approx_kl (mean of 0.5*(logp-old)^2),
    ratio_mean, ratio_max, vf_clip_frac, dual_clip_frac (token means over masked tokens) and
    num_tokens. An empty mask gives loss 0 and zero gradients. Masked-out tokens never
    contribute, even when they hold NaN; a NaN or inf in a masked-in token propagates to the
    loss (check ``torch.isfinite(loss)``).
    """
    tensors = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask,
               "ref_logp": ref_logp, "values": values, "old_values": old_values,
               "returns": returns, "seq_ids": seq_ids}
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(
                f"dlmkern.policy_value_loss: `{name}` must be a torch.Tensor, "
                f"got {type(t).__name__}"
            )
        if t is not None and t.device != logp.device:
            raise ValueError(
                f"dlmkern.policy_value_loss: `{name}` must be on {logp.device} like `logp`, "
                f"got {t.device}"
            )
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"dlmkern.policy_value_loss: `reduction` must be one of {sorted(REDUCTIONS)}, "
            f"got {reduction!r}"
        )
    if num_seqs is None:
        if reduction != "seq_mean":
            num_seqs = 1
        elif seq_ids is not None:
            if torch.compiler.is_compiling():
                raise ValueError("dlmkern.policy_value_loss: pass `num_seqs` with "
                                 "reduction='seq_mean' and `seq_ids` under torch.compile (it "
                                 "would otherwise be read from the data)")
            # Masked tokens' ids (padding) do not count. One host sync: pass num_seqs to avoid it.
            top = torch.where(mask, seq_ids, -1).max() if seq_ids.numel() else 0
            num_seqs = max(int(top) + 1, 1)
        else:
            num_seqs = logp.shape[0] if logp.dim() == 2 else 1
    if backend.is_reference():
        return reference.policy_value_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, values=values,
            old_values=old_values, returns=returns, eps_low=eps_low, eps_high=eps_high,
            dual_clip=dual_clip, kl_coef=kl_coef, vf_coef=vf_coef, vf_clip=vf_clip,
            reduction=reduction, seq_ids=seq_ids, normalizer=normalizer, num_seqs=num_seqs)
    loss, stats, _, _, _ = backend.ops().policy_value_loss(
        logp, old_logp, advantages, mask, ref_logp, values, old_values, returns, seq_ids,
        float(eps_low), float(eps_high), None if dual_clip is None else float(dual_clip),
        float(kl_coef), float(vf_coef), float(vf_clip), REDUCTIONS[reduction], int(num_seqs),
        1.0 if normalizer is None else float(normalizer),
    )
    return loss, dict(zip(STAT_NAMES, stats.unbind(0), strict=True))


@torch.library.register_fake("dlmkern::policy_value_loss")
def _pv_fake(logp, old_logp, advantages, mask, ref_logp, values, old_values, returns, seq_ids,
             eps_low, eps_high, dual_clip, kl_coef, vf_coef, vf_clip, reduction, num_seqs,
             normalizer):
    torch._check(old_logp.shape == logp.shape, lambda: "`old_logp` must match `logp`")
    f32 = torch.float32
    n_scale = num_seqs if reduction == REDUCTIONS["seq_mean"] else 1
    u_v = logp.new_empty(logp.shape, dtype=f32) if values is not None else logp.new_empty(
        (0,), dtype=f32)
    return (logp.new_empty((), dtype=f32), logp.new_empty((len(STAT_NAMES),), dtype=f32),
            logp.new_empty(logp.shape, dtype=f32), u_v, logp.new_empty((n_scale,), dtype=f32))


@torch.library.register_fake("dlmkern::policy_value_loss_backward")
def _pv_backward_fake(grad_loss, u_logp, u_values, seq_ids, seq_scale, reduction):
    return torch.empty_like(u_logp), torch.empty_like(u_values)


def _pv_setup(ctx, inputs, output):
    logp, values, seq_ids, reduction = inputs[0], inputs[5], inputs[8], inputs[15]
    _, stats, u_logp, u_values, seq_scale = output
    ctx.save_for_backward(u_logp, u_values, seq_ids, seq_scale)
    ctx.reduction, ctx.ops = reduction, backend.ops()
    ctx.logp_dtype = logp.dtype
    ctx.values_dtype = None if values is None else values.dtype
    ctx.mark_non_differentiable(stats, u_logp, u_values, seq_scale)


def _pv_backward(ctx, g_loss, *_unused):
    u_logp, u_values, seq_ids, seq_scale = ctx.saved_tensors
    g_logp, g_values = ctx.ops.policy_value_loss_backward(
        g_loss, u_logp, u_values, seq_ids, seq_scale, ctx.reduction
    )
    g_logp = g_logp.to(ctx.logp_dtype) if ctx.needs_input_grad[0] else None
    if ctx.values_dtype is not None and ctx.needs_input_grad[5]:
        g_values = g_values.to(ctx.values_dtype)
    else:
        g_values = None
    return (g_logp, None, None, None, None, g_values) + (None,) * 12


torch.library.register_autograd(
    "dlmkern::policy_value_loss", _pv_backward, setup_context=_pv_setup
)
