"""The reference (plain torch) of the policy objective (dlmkern.ops.objective): the ground truth
of every objective, part of dlmkern.ops.reference (which re-exports ``objective_loss`` and
``ratio_inputs``); the fused kernel computes the settings in ``objective.FUSED`` and is tested
against it. Objectives over a sequence's noisy copies live in reference_copies."""

from __future__ import annotations

import torch

from dlmkern.ops.reference_copies import bound_term, copy_ratio_term, elbo_ratio_term


def _group_sum(x, m, gid, n):
    """Per group of `gid` (flat [T] ids in [0, n)), the sum of x over its masked-in tokens,
    read back at every token."""
    f = x.dtype
    kept = torch.where(m.reshape(-1), x.reshape(-1), torch.zeros((), dtype=f, device=x.device))
    return torch.zeros(n, dtype=f, device=x.device).index_add(0, gid, kept)[gid].reshape(x.shape)


def _group_mean(x, m, gid, n):
    """Per group of `gid`, the mean of x over its masked-in tokens, read back at every token
    (0 for a group without any)."""
    return _group_sum(x, m, gid, n) / _group_sum(m.to(x.dtype), m, gid, n).clamp(min=1)


def _ratio_groups(level, m, seq_ids, block_ids):
    """Flat group ids of the tokens for a sequence / block ratio, and their number. Masked tokens
    (padding) belong to no group: their ids are never read."""
    shape = m.shape
    if seq_ids is None:
        if len(shape) != 2:
            raise ValueError(f"dlmkern.policy_value_loss: ratio_level={level} on [T] tokens needs "
                             "`seq_ids`")
        seq_ids = torch.arange(shape[0], device=m.device)[:, None].expand(shape)
    key = torch.where(m, seq_ids, 0).reshape(-1)
    if level == "block":
        if block_ids is None:
            raise ValueError("dlmkern.policy_value_loss: ratio_level=block needs `block_ids`")
        key = torch.stack([key, torch.where(m, block_ids, 0).reshape(-1)])
        _, gid = torch.unique(key, dim=1, return_inverse=True)
    else:
        _, gid = torch.unique(key, return_inverse=True)
    return gid, int(gid.max()) + 1 if gid.numel() else 0


def ratio_inputs(o, diff, m, w, seq_ids, block_ids):
    """The objective's ratio inputs per token: (log-ratio of its group or None, its weights).
    A sequence / block ratio (``ratio_level``) takes its group's mean over masked-in tokens of
    ``diff`` = logp - old_logp, without gradient; with token weights `w` the weighted mean, and
    the weights are divided by their group's mean (so a seq_mean reduction gives one clipped term
    per sequence: ESPO, see dlmkern.ops.objective). Token ratios and none: (None, w). The fused
    kernel receives both as its ``log_ratio`` and ``weights`` inputs (one owner of the grouping)."""
    if o.ratio_level not in ("sequence", "block"):
        return None, w
    gid, n_groups = _ratio_groups(o.ratio_level, m, seq_ids, block_ids)
    d = diff.detach().float()
    if w is None:
        return _group_mean(d, m, gid, n_groups), None
    w_mean = _group_mean(w, m, gid, n_groups).masked_fill(~m, 1.0)  # padding: no 0 / 0
    return _group_mean(w * d, m, gid, n_groups) / w_mean, w / w_mean


def _kl(kind, x):
    """The per-token KL penalty of `kind`, x = target - logp."""
    if kind == "k1":
        return -x
    if kind == "k3":
        xc = torch.clamp(x, -20.0, 20.0)
        return torch.exp(xc) - xc - 1
    if kind == "quadratic":
        return 0.5 * x**2
    raise ValueError(kind)


def objective_loss(
    objective,
    logp,
    old_logp,
    advantages,
    mask,
    *,
    ref_logp=None,
    values=None,
    old_values=None,
    returns=None,
    weights=None,
    seq_ids=None,
    block_ids=None,
    num_seqs=None,
    vf_coef=0.5,
    vf_clip=0.2,
    copy_ids=None,
    positions=None,
):
    """Loss and stats of `objective` (dlmkern.ops.Objective) over masked tokens: the ground truth
    of every objective (the fused kernel covers a subset). Per token, with r the ratio of the
    objective's level: pg = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) (dual clip: at most
    -c*A for A < 0), or pg = -A*logp without a ratio; kl of its kind against ref_logp; both
    times `weights` when the objective weights tokens; plus vf_coef * the clipped value loss.
    A sequence / block ratio is exp(mean over its group's tokens of logp - old_logp) (log-ratio
    clamped to [-20, 20], no gradient outside), one clip decision per group; its gradient is
    GSPO-token's (sg(r) * exp(logp - sg(logp))). With weights the group's mean is the weighted
    mean, and the weights are divided by their group's mean (ESPO: see dlmkern.ops.objective).
    kl_level=sequence: one kind(S * xbar) / S per sequence (xbar the weighted mean of
    ref_logp - logp, S the weight sum), carried by its tokens as the pg term is."""
    o = objective
    f = torch.float32
    lp, m = logp.to(f), mask
    zero = torch.zeros((), dtype=f, device=lp.device)
    diff = lp - old_logp.to(f)
    if o.weighted != (weights is not None):
        raise ValueError(f"dlmkern.policy_value_loss: `weights` "
                         f"{'missing' if weights is None else 'given'}: the objective has "
                         f"token_weights={o.token_weights}")
    w = None if weights is None else weights.to(f)
    adv = advantages.to(f)
    pg, ratio, clipped, dual, w_pg = _policy_term(o, lp, diff, adv, m, w, seq_ids, block_ids,
                                                  copy_ids)
    kl = torch.zeros_like(pg) if ref_logp is None else _kl_term(o, ref_logp.to(f) - lp, m, w,
                                                                 w_pg, seq_ids)
    pg = _weigh(o, pg, w_pg, lp, adv, w, m, seq_ids, copy_ids, positions)
    vf, vf_clipped = _value_term(values, old_values, returns, vf_clip, pg, clipped)

    count = m.sum().to(f)
    denom = count.clamp(min=1)

    def masked(x):
        return torch.where(m, x, zero)

    def reduce(x):
        return _reduce(o, masked(x), m, denom, seq_ids, num_seqs)

    pg_loss, kl_loss, vf_loss = reduce(pg), reduce(kl), reduce(vf)
    loss = pg_loss
    if ref_logp is not None:
        loss = loss + o.kl_coef * kl_loss
    if values is not None:
        loss = loss + vf_coef * vf_loss

    def frac(b):
        return masked(b.to(f)).sum() / denom

    with torch.no_grad():
        ratio = ratio.detach()
        low = clipped & (ratio < 1 - o.eps_low)
        high = clipped & (ratio > 1 + o.eps_high)
        stats = {
            "pg_loss": pg_loss.detach(),
            "kl": kl_loss.detach(),
            "vf_loss": vf_loss.detach(),
            "clip_frac": frac(low | high),
            "clip_frac_low": frac(low),
            "clip_frac_high": frac(high),
            "approx_kl": masked(0.5 * diff**2).sum() / denom,
            "ratio_mean": masked(ratio).sum() / denom,
            "ratio_max": masked(ratio).max() if bool(m.any()) else zero,
            "vf_clip_frac": frac(vf_clipped),
            "dual_clip_frac": frac(dual),
            "num_tokens": count,
        }
    return loss, stats


def _weigh(o, pg, w_pg, lp, adv, w, m, seq_ids, copy_ids, positions):
    """pg under the token weights: times `w_pg` (the weights, normalised in their group under a
    sequence / block ratio), except that a likelihood bound and an ELBO ratio read w as 1 / t
    (the bound replaces pg; the ELBO ratio already used it)."""
    if w is not None and o.bounded:
        return bound_term(o, lp, adv, w, m, seq_ids, copy_ids, positions)
    if w_pg is None or o.ratio_level == "elbo":
        return pg
    return w_pg * pg


def _policy_term(o, lp, diff, adv, m, w, seq_ids, block_ids, copy_ids=None):
    """Per token: the policy loss pg (unweighted), the ratio (a diagnostic without one), whether
    the clip and the dual clip are active, and the token weights pg and a token-level KL are to
    be multiplied by (`w`, or under a sequence / block ratio `w` over its group's mean weight;
    None: none)."""
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    if o.ratio_level == "copy":
        return (*copy_ratio_term(o, diff, adv, m, seq_ids, copy_ids), w)
    if o.ratio_level == "elbo":
        return (*elbo_ratio_term(o, diff, adv, w, m, seq_ids, copy_ids), w)
    g, w = ratio_inputs(o, diff, m, w, seq_ids, block_ids)
    if g is not None:
        inside = (g > -20.0) & (g < 20.0)
        log_r = torch.clamp(g, -20.0, 20.0) + torch.where(inside, lp - lp.detach(), zero)
    else:
        log_r = torch.clamp(diff, -20.0, 20.0)
    ratio = ratio_of(o, log_r, adv)
    if not o.has_ratio:  # a weighted likelihood: no ratio, nothing clipped
        return -adv * lp, ratio, torch.zeros_like(m), torch.zeros_like(m), w
    pg, clipped, dual = clip_term(o, ratio, adv)
    return pg, ratio, clipped, dual, w


def ratio_of(o, log_r, adv):
    """exp(log r); ratio_form=tangent: 1 + log r where A > 0 (BGPO's tangent lower bound)."""
    ratio = torch.exp(log_r)
    if o.ratio_form == "tangent":
        ratio = torch.where(adv > 0, 1 + log_r, ratio)
    return ratio


def clip_term(o, ratio, adv):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), at most -c A for A < 0 (dual clip c);
    whether the clip and the dual clip are active."""
    s1 = ratio * adv
    s2 = torch.clamp(ratio, 1 - o.eps_low, 1 + o.eps_high) * adv
    pg = -torch.minimum(s1, s2)
    clipped = s2 < s1
    dual = torch.zeros_like(clipped)
    if o.dual_clip > 0:
        bound = -o.dual_clip * adv
        dual = (adv < 0) & (bound < pg)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    return pg, clipped, dual


def _kl_term(o, x, m, w, w_pg, seq_ids):
    """Per token, the weighted KL penalty, x = target - logp. kl_level=token: its kind at each
    token, times the pg term's weights. kl_level=sequence: per sequence, with xbar the weighted
    mean of x and S the weight sum (the token count unweighted), kind(S * xbar) / S, carried
    by each token times its weight over the sequence's mean weight (so a sequence's mean over
    its tokens is its KL)."""
    if o.kl_level == "token":
        kl = _kl(o.kl_kind, x)
        return kl if w_pg is None else w_pg * kl
    gid, n = _ratio_groups("sequence", m, seq_ids, None)
    w = torch.ones_like(x) if w is None else w
    total = _group_sum(w, m, gid, n).masked_fill(~m, 1.0)  # S (padding: no 0 / 0)
    share = w * _group_sum(m.to(w.dtype), m, gid, n) / total  # w over the sequence's mean w
    return share * _kl(o.kl_kind, _group_sum(w * x, m, gid, n)) / total


def _value_term(values, old_values, returns, vf_clip, like, clipped_like):
    """Per token: 0.5 * max((V-R)^2, (V_old + clip(V-V_old, ±vf_clip) - R)^2) and whether the
    clipped error is the larger (zeros without values)."""
    if values is None:
        return torch.zeros_like(like), torch.zeros_like(clipped_like)
    f = torch.float32
    v, r = values.to(f), returns.to(f)
    vf1 = (v - r) ** 2
    if old_values is None:
        return 0.5 * vf1, torch.zeros_like(clipped_like)
    ov = old_values.to(f)
    vclip = ov + torch.clamp(v - ov, -vf_clip, vf_clip)
    vf2 = (vclip - r) ** 2
    return 0.5 * torch.maximum(vf1, vf2), vf2 > vf1


def _reduce(o, x, m, denom, seq_ids, num_seqs):
    """The objective's reduction of x (already 0 at masked-out tokens)."""
    f = x.dtype
    if o.reduction == "token_mean":
        return x.sum() / denom
    if o.reduction == "sum":
        return x.sum() / o.loss_normalizer
    if o.reduction == "seq_mean":
        sid = seq_ids if seq_ids is not None else (
            torch.arange(x.shape[0], device=x.device)[:, None].expand_as(x))
        # Masked tokens belong to no sequence: their ids (padding, often -1) are not used.
        sid = torch.where(m.reshape(-1), sid.reshape(-1), 0)
        n_seq = num_seqs or (int(sid.max()) + 1 if sid.numel() else 0)
        per_sum = torch.zeros(n_seq, dtype=f, device=x.device).index_add(0, sid, x.reshape(-1))
        per_cnt = torch.zeros(n_seq, dtype=f, device=x.device).index_add(
            0, sid, m.reshape(-1).to(f))
        nonempty = per_cnt > 0
        if not bool(nonempty.any()):
            return x.sum() * 0
        return (per_sum[nonempty] / per_cnt[nonempty]).mean()
    raise ValueError(o.reduction)
