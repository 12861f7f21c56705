"""Ground truth of the objectives computed over a sequence's noisy copies (part of the reference
backend, dlmkern.ops.reference): the copy ratio (``ratio_level=copy``, BGPO), the ELBO ratio
(``ratio_level=elbo``, EBPO) and the likelihood bounds (``likelihood_bound``, SPG). Each gives
every trained token of a sequence one value, the sequence's policy term, so any reduction reads
it as a per-sequence quantity; gradients are those of that term (plain autograd). Tokens are
grouped by (sequence, copy) with ``copy_ids`` (Rows.step of a random-masking estimator) and, for
the EUBO, by (sequence, position)."""

from __future__ import annotations

import torch


def _add(n, at, vals):
    return torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add(0, at, vals)


class _Copies:
    """The masked-in tokens (``idx``) of flat token tensors, their sequences and groups."""

    def __init__(self, m, seq_ids, copy_ids, what):
        if seq_ids is None or copy_ids is None:
            raise ValueError(f"dlmkern.policy_value_loss: {what} needs `seq_ids` and `copy_ids`")
        self.idx = m.reshape(-1).nonzero().squeeze(1)
        self.sid = seq_ids.reshape(-1)[self.idx]
        self.n_seq = int(self.sid.max()) + 1 if self.idx.numel() else 0
        self.c_seq, self.c_gid, self.n_c = self.groups(copy_ids)
        one = torch.ones(self.n_c, dtype=torch.float32, device=m.device)
        self.n_copies = _add(self.n_seq, self.c_seq, one).clamp(min=1)

    def pick(self, x):
        return x.reshape(-1)[self.idx]

    def groups(self, other):
        """(owning sequence per group, group id per token, number of groups) of the tokens
        grouped by (sequence, other)."""
        uniq, gid = torch.unique(torch.stack([self.sid, self.pick(other)]), dim=1,
                                 return_inverse=True)
        return uniq[0], gid, uniq.shape[1]

    def copy_mean(self, x):
        """Per (sequence, copy) group, the mean of x over its tokens."""
        return _add(self.n_c, self.c_gid, x) / _add(self.n_c, self.c_gid, torch.ones_like(x))

    def per_seq_mean_over_copies(self, per_copy):
        return _add(self.n_seq, self.c_seq, per_copy) / self.n_copies.to(per_copy.dtype)

    def scatter(self, like, vals):
        out = torch.zeros(like.numel(), dtype=vals.dtype, device=vals.device)
        return out.index_put((self.idx,), vals).reshape(like.shape)


def copy_ratio_term(o, diff, adv, m, seq_ids, copy_ids):
    """ratio_level=copy (BGPO): per (sequence, copy) the log-ratio g = mean over the copy's
    tokens of logp - old_logp (= the difference of its ELBO samples / the completion's length
    under 1/t weights), clamped to [-20, 20]; the ratio exp(g) (or 1 + g for A > 0 with
    ratio_form=tangent), clipped and dual-clipped once per copy; every token of the sequence
    carries the mean over its copies of -min(r A, clip(r) A). Returns (pg, ratio, clipped,
    dual) per token (a token's ratio and clip flags are its copy's)."""
    from dlmkern.ops.reference_objective import clip_term, ratio_of

    c = _Copies(m, seq_ids, copy_ids, "ratio_level=copy")
    if c.idx.numel() == 0:
        z = torch.zeros_like(m)
        return 0 * diff, torch.ones_like(diff), z, z
    g = torch.clamp(c.copy_mean(c.pick(diff)), -20.0, 20.0)
    a = c.copy_mean(c.pick(adv))  # a sequence's tokens share its advantage
    ratio = ratio_of(o, g, a)
    pg, clipped, dual = clip_term(o, ratio, a)
    v = c.per_seq_mean_over_copies(pg)[c.sid]
    return (c.scatter(diff, v), c.scatter(diff, ratio[c.c_gid]).detach(),
            c.scatter(m, clipped[c.c_gid]), c.scatter(m, dual[c.c_gid]))


def elbo_ratio_term(o, diff, adv, w, m, seq_ids, copy_ids):
    """ratio_level=elbo (EBPO): per sequence the log-ratio of its Monte Carlo ELBOs,
    g = (1/M) sum over its M copies' tokens of w * (logp - old_logp) (w = 1/t), clamped to
    [-20, 20]; the ratio exp(g) (1 + g for A > 0 with ratio_form=tangent), clipped and
    dual-clipped once; every token of the sequence carries -min(r A, clip(r) A)."""
    from dlmkern.ops.reference_objective import clip_term, ratio_of

    c = _Copies(m, seq_ids, copy_ids, "ratio_level=elbo")
    if c.idx.numel() == 0:
        z = torch.zeros_like(m)
        return 0 * diff, torch.ones_like(diff), z, z
    x = c.pick(w) * c.pick(diff)
    g = torch.clamp(_add(c.n_seq, c.sid, x) / c.n_copies.to(x.dtype), -20.0, 20.0)
    a = torch.zeros(c.n_seq, dtype=x.dtype, device=x.device).index_put(
        (c.sid,), c.pick(adv))  # a sequence's tokens share its advantage
    ratio = ratio_of(o, g, a)
    pg, clipped, dual = clip_term(o, ratio, a)
    return (c.scatter(diff, pg[c.sid]), c.scatter(diff, ratio[c.sid]).detach(),
            c.scatter(m, clipped[c.sid]), c.scatter(m, dual[c.sid]))


def bound_term(o, lp, adv, w, m, seq_ids, copy_ids, positions):
    """Per token, -A times its sequence's likelihood bound (Objective.likelihood_bound; SPG):
    the ELBO (1/M) sum_m mean_{j in S_m} logp_mj, or for A <= 0 the EUBO (1/beta) mean_{j in J}
    log((1/M) sum_{m: j in S_m} p_mj^beta / t_m) (mixture: weighted with the ELBO). A copy's
    mask rate t is 1 / its elbo weight w; the inner mean is a logsumexp of beta * logp - log t
    minus log M (M: the sequence's copies)."""
    what = f"likelihood_bound={o.likelihood_bound}"
    if positions is None:
        raise ValueError(f"dlmkern.policy_value_loss: {what} needs `positions`")
    c = _Copies(m, seq_ids, copy_ids, what)
    if c.idx.numel() == 0:
        return 0 * lp
    x, a = c.pick(lp), c.pick(adv)
    elbo = c.per_seq_mean_over_copies(c.copy_mean(x))
    bound = elbo[c.sid]
    if o.likelihood_bound in ("sandwich", "mixture"):
        p_seq, p_gid, n_p = c.groups(positions)
        v = o.eubo_beta * x + torch.log(c.pick(w))  # log(p^beta / t)
        vmax = torch.full((n_p,), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(
            0, p_gid, v.detach(), "amax")
        log_avg = (torch.log(_add(n_p, p_gid, torch.exp(v - vmax[p_gid]))) + vmax
                   - torch.log(c.n_copies[p_seq].to(x.dtype)))
        eubo = (_add(c.n_seq, p_seq, log_avg) / _add(c.n_seq, p_seq, torch.ones_like(log_avg))
                / o.eubo_beta)
        if o.likelihood_bound == "mixture":
            eubo = o.mixture_weight * eubo + (1 - o.mixture_weight) * elbo
        bound = torch.where(a > 0, elbo[c.sid], eubo[c.sid])
    return c.scatter(lp, -a * bound)
