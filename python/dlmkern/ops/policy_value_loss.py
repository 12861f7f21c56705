"""Fused policy-value loss (SPEC 2.4 / 4.9): public wrapper, fake and autograd registrations.

One kernel forward computes the per-token policy term of the objective (clipped ratio of its
level, or none), its KL and the clipped value loss, their reduction and statistics, AND the
per-token gradients (before the reduction weight); one kernel backward scales those by the
incoming gradient. logp and values receive gradients; every other input (old_logp, advantages,
ref_logp, old_values, returns, weights) is treated as a constant.

The policy settings arrive as one ``Objective`` (dlmkern.ops.objective). ``_op_arguments`` is the
one place that maps it (and the tensors) to the kernel's arguments, by name: the clip and KL
coefficients, the KL kind and whether there is a ratio as PvParams, the token weights and a
sequence / block ratio's group log-ratio as per-token inputs. An objective whose arithmetic the
kernel lacks (``Objective.fused()`` false) runs on the reference path. The fake and the autograd
functions read and return the op's arguments by the names of its registered schema (``_OpArgs``),
never by position.
"""

from __future__ import annotations

import torch

from dlmkern import _build  # noqa: F401  (loads the extension that defines the ops)
from dlmkern.ops import backend, reference
from dlmkern.ops.objective import Objective, call_objective

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
    objective: Objective | None = None,
    weights: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    copy_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    kl_coef: float | None = None,
    vf_coef: float = 0.5,
    vf_clip: float = 0.2,
    reduction: str | None = None,
    seq_ids: torch.Tensor | None = None,
    normalizer: float | None = None,
    num_seqs: int | None = None,
):
    """Policy loss of an objective (PPO-style clipped ratio + KL by default) + clipped value loss
    over masked tokens.

    Token tensors are ``[T]`` or ``[B, L]`` (fp32 / fp16 / bf16; mask bool). The policy settings
    are ``objective`` (a :class:`dlmkern.ops.Objective`: ratio level, clip, dual clip, KL kind,
    token weights, reduction), or, without one, the keywords ``eps_low`` (default 0.2),
    ``eps_high`` (0.2), ``dual_clip`` (None: off), ``kl_coef`` (0), ``reduction``
    ("token_mean") and ``normalizer`` (None: 1), which make a token-ratio, k3-KL objective;
    giving both is a TypeError. Per token of that default objective:
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

    Other objectives (see dlmkern.ops.objective): a sequence ratio groups tokens by ``seq_ids``
    (``[B, L]``: by row), a block ratio by (``seq_ids``, ``block_ids``); ``weights`` (per token)
    are required exactly when the objective weights tokens; a KL of kind k1 / quadratic replaces
    k3; a copy ratio (BGPO) reads each token's sequence (``seq_ids``) and noisy copy
    (``copy_ids``), a likelihood bound (SPG) also its position in its completion
    (``positions``), int64, required exactly then. The fused kernel computes every setting
    listed in ``objective.FUSED``; one it lacks runs on the reference path (plain torch
    autograd) whatever the backend:
    ``objective.fused()`` says which.

    Returns ``(loss, stats)``; stats is a dict of 0-d fp32 tensors: pg_loss, kl, vf_loss (each
    reduced like the loss), clip_frac (+ _low, _high), approx_kl (mean of 0.5*(logp-old)^2),
    ratio_mean, ratio_max, vf_clip_frac, dual_clip_frac (token means over masked tokens) and
    num_tokens. An empty mask gives loss 0 and zero gradients. Masked-out tokens never
    contribute, even when they hold NaN; a NaN or inf in a masked-in token propagates to the
    loss (check ``torch.isfinite(loss)``).
    """
    tensors = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask,
               "ref_logp": ref_logp, "values": values, "old_values": old_values,
               "returns": returns, "seq_ids": seq_ids, "weights": weights,
               "block_ids": block_ids, "copy_ids": copy_ids, "positions": positions}
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
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(
            f"dlmkern.policy_value_loss: `reduction` must be one of {sorted(REDUCTIONS)}, "
            f"got {reduction!r}"
        )
    objective = call_objective(objective, eps_low=eps_low, eps_high=eps_high,
                               dual_clip=dual_clip, kl_coef=kl_coef, reduction=reduction,
                               normalizer=normalizer)
    _check_objective_inputs(objective, logp, weights, block_ids)
    _check_bound_inputs(objective, logp, seq_ids, copy_ids, positions)
    if num_seqs is None:
        if objective.reduction != "seq_mean":
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
    if backend.is_reference() or not objective.fused(kl_term=ref_logp is not None):
        return reference.objective_loss(
            objective, logp, old_logp, advantages, mask, ref_logp=ref_logp, values=values,
            old_values=old_values, returns=returns, weights=weights, seq_ids=seq_ids,
            block_ids=block_ids, num_seqs=num_seqs, vf_coef=vf_coef, vf_clip=vf_clip,
            copy_ids=copy_ids, positions=positions)
    args = _op_arguments(objective, logp=logp, old_logp=old_logp, advantages=advantages,
                         mask=mask, ref_logp=ref_logp, values=values, old_values=old_values,
                         returns=returns, seq_ids=seq_ids, weights=weights,
                         block_ids=block_ids, vf_coef=vf_coef, vf_clip=vf_clip,
                         num_seqs=num_seqs)
    loss, stats, _, _, _ = backend.ops().policy_value_loss(*_ARGS.in_order(args))
    return loss, dict(zip(STAT_NAMES, stats.unbind(0), strict=True))


def _check_objective_inputs(o: Objective, logp, weights, block_ids) -> None:
    """The per-token inputs an objective reads are given exactly when it reads them."""
    op = "dlmkern.policy_value_loss"
    if o.weighted != (weights is not None):
        raise ValueError(f"{op}: `weights` {'missing' if o.weighted else 'given'}: the "
                         f"objective has token_weights={o.token_weights} (per-token weights are "
                         f"passed exactly when it weights tokens)")
    if (o.ratio_level == "block") != (block_ids is not None):
        raise ValueError(f"{op}: `block_ids` {'missing' if block_ids is None else 'given'}: the "
                         f"objective has ratio_level={o.ratio_level} (block ids are passed "
                         f"exactly for ratio_level=block)")
    for name, t in (("weights", weights), ("block_ids", block_ids)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{op}: `{name}` must have the shape of `logp` "
                             f"{tuple(logp.shape)}, got {tuple(t.shape)}")
    if block_ids is not None and block_ids.dtype != torch.int64:
        raise TypeError(f"{op}: `block_ids` must be int64, got {block_ids.dtype}")


def _check_bound_inputs(o: Objective, logp, seq_ids, copy_ids, positions) -> None:
    """The per-token ids of an objective over noisy copies: `copy_ids` exactly when it groups by
    copy (ratio_level=copy, a likelihood bound), `positions` exactly with a bound; shaped like
    `logp`, int64."""
    op = "dlmkern.policy_value_loss"
    what = (f"likelihood_bound={o.likelihood_bound}" if o.bounded else
            f"ratio_level={o.ratio_level}")
    for name, t, need in (("copy_ids", copy_ids, o.over_copies),
                          ("positions", positions, o.bounded)):
        if (t is not None) != need:
            raise ValueError(f"{op}: `{name}` {'given' if t is not None else 'missing'}: the "
                             f"objective has {what} (copy ids are passed exactly when it "
                             f"groups by noisy copy, positions when it has a likelihood bound)")
        if t is not None and (t.shape != logp.shape or t.dtype != torch.int64):
            raise ValueError(f"{op}: `{name}` must be int64 shaped like `logp` "
                             f"{tuple(logp.shape)}, got {t.dtype} {tuple(t.shape)}")
    if o.over_copies and seq_ids is None:
        raise ValueError(f"{op}: {what} needs `seq_ids`")


KL_CODES = {"k1": 0, "k3": 1, "quadratic": 2}  # the kernel's PvKlKind


def _op_arguments(o: Objective, *, vf_coef: float, vf_clip: float, num_seqs: int,
                  block_ids, **tensors) -> dict:
    """The fused kernel's arguments, by name: the objective's fields and the tensors, with the
    objective's per-token inputs: a sequence / block ratio's group log-ratio
    (reference.ratio_inputs, the one owner of the grouping: the kernel reads it as the token's
    log-ratio) and the token weights (normalised in their group under a weighted group ratio).
    The one place that knows how the objective reaches the kernel's PvParams."""
    log_ratio = None
    if o.ratio_level in ("sequence", "block"):
        logp, old, w = tensors["logp"], tensors["old_logp"], tensors["weights"]
        if old.shape != logp.shape:  # the kernel's own check, before the grouping reads them
            raise ValueError(f"dlmkern.policy_value_loss: `old_logp` must have the shape of "
                             f"`logp` {tuple(logp.shape)}, got {tuple(old.shape)}")
        log_ratio, tensors["weights"] = reference.ratio_inputs(
            o, logp.detach().float() - old.float(), tensors["mask"],
            None if w is None else w.float(), tensors["seq_ids"], block_ids)
    return dict(
        tensors, log_ratio=log_ratio,
        eps_low=float(o.eps_low), eps_high=float(o.eps_high),
        dual_clip=float(o.dual_clip) if o.dual_clip > 0 else None,
        kl_coef=float(o.kl_coef), vf_coef=float(vf_coef), vf_clip=float(vf_clip),
        reduction=REDUCTIONS[o.reduction], num_seqs=int(num_seqs),
        normalizer=float(o.loss_normalizer), kl_kind=KL_CODES[o.kl_kind],
        has_ratio=o.has_ratio,
    )


class _OpArgs:
    """The op's arguments by the names of its registered schema (the one source of their order):
    ``in_order`` lays named arguments out for the call, ``bind`` names the positional inputs the
    fake and setup_context receive, ``grads`` places named gradients where backward must return
    them."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def in_order(self, named: dict) -> tuple:
        if set(named) != set(self.names):  # the kernel's schema changed: map it by name
            raise TypeError(f"dlmkern.policy_value_loss: the kernel takes {list(self.names)}, "
                            f"got {sorted(named)}")
        return tuple(named[n] for n in self.names)

    def bind(self, args, kwargs=None) -> dict:
        out = dict(zip(self.names, args, strict=False))
        out.update(kwargs or {})
        return out

    def grads(self, **named) -> tuple:
        unknown = set(named) - set(self.names)
        if unknown:
            raise KeyError(f"policy_value_loss backward: no argument named {sorted(unknown)}")
        return tuple(named.get(n) for n in self.names)

    def needs_grad(self, ctx, name: str) -> bool:
        return ctx.needs_input_grad[self.names.index(name)]


def _schema_names(op) -> tuple[str, ...]:
    return tuple(a.name for a in op.default._schema.arguments)


_ARGS = _OpArgs(_schema_names(torch.ops.dlmkern.policy_value_loss))
_BACKWARD_ARGS = _OpArgs(_schema_names(torch.ops.dlmkern.policy_value_loss_backward))


@torch.library.register_fake("dlmkern::policy_value_loss")
def _pv_fake(*args, **kwargs):
    a = _ARGS.bind(args, kwargs)
    logp = a["logp"]
    torch._check(a["old_logp"].shape == logp.shape, lambda: "`old_logp` must match `logp`")
    f32 = torch.float32
    n_scale = a["num_seqs"] if a["reduction"] == REDUCTIONS["seq_mean"] else 1
    u_v = logp.new_empty(logp.shape, dtype=f32) if a["values"] is not None else logp.new_empty(
        (0,), dtype=f32)
    return (logp.new_empty((), dtype=f32), logp.new_empty((len(STAT_NAMES),), dtype=f32),
            logp.new_empty(logp.shape, dtype=f32), u_v, logp.new_empty((n_scale,), dtype=f32))


@torch.library.register_fake("dlmkern::policy_value_loss_backward")
def _pv_backward_fake(*args, **kwargs):
    a = _BACKWARD_ARGS.bind(args, kwargs)
    return torch.empty_like(a["u_logp"]), torch.empty_like(a["u_values"])


def _pv_setup(ctx, inputs, output):
    a = _ARGS.bind(inputs)
    _, stats, u_logp, u_values, seq_scale = output
    ctx.save_for_backward(u_logp, u_values, a["seq_ids"], seq_scale)
    ctx.reduction, ctx.ops = a["reduction"], backend.ops()
    ctx.logp_dtype = a["logp"].dtype
    ctx.values_dtype = None if a["values"] is None else a["values"].dtype
    ctx.mark_non_differentiable(stats, u_logp, u_values, seq_scale)


def _pv_backward(ctx, g_loss, *_unused):
    u_logp, u_values, seq_ids, seq_scale = ctx.saved_tensors
    g_logp, g_values = ctx.ops.policy_value_loss_backward(*_BACKWARD_ARGS.in_order(dict(
        grad_loss=g_loss, u_logp=u_logp, u_values=u_values, seq_ids=seq_ids,
        seq_scale=seq_scale, reduction=ctx.reduction)))
    g_logp = g_logp.to(ctx.logp_dtype) if _ARGS.needs_grad(ctx, "logp") else None
    if ctx.values_dtype is not None and _ARGS.needs_grad(ctx, "values"):
        g_values = g_values.to(ctx.values_dtype)
    else:
        g_values = None
    return _ARGS.grads(logp=g_logp, values=g_values)


torch.library.register_autograd(
    "dlmkern::policy_value_loss", _pv_backward, setup_context=_pv_setup
)
