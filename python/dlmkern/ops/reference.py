"""Pure-torch reference implementations: the ground truth the kernels are tested against.

They favour clarity over speed and memory (they DO materialize full logits / dense masks) and
compute in float32 (or float64 when given float64) whatever the input dtype.
"""

from __future__ import annotations

import torch

# the objective's reference (its own module), re-exported: reference.objective_loss, .ratio_inputs
from dlmkern.ops.reference_objective import objective_loss, ratio_inputs  # noqa: F401


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _select_rows(rows: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(n, device=device)
    if rows.dtype == torch.bool:
        return rows.nonzero().squeeze(1)
    return rows


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """log_softmax(logits / temperature)[target] (and the softmax entropy), fp32 results.

    Rows whose target equals ``ignore_index`` give 0 for both.
    """
    z = logits.to(_compute_dtype(logits)) / temperature
    lsm = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = lsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    # p log p -> 0 as p -> 0: -inf logits (masked tokens) add nothing (and no NaN gradient).
    finite_lsm = lsm.masked_fill(torch.isneginf(lsm), 0.0)
    entropy = -(lsm.exp() * finite_lsm).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


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
    """The naive path: full logits = hidden[rows] @ weight.T, then log_softmax and gather."""
    idx = _select_rows(rows, hidden.shape[0], hidden.device)
    dt = _compute_dtype(hidden)
    logits = hidden[idx].to(dt) @ weight.to(dt).T
    return logprobs_from_logits(
        logits,
        targets[idx],
        temperature=temperature,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
    )


def policy_value_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    ref_logp=None,
    values=None,
    old_values=None,
    returns=None,
    eps_low=None,
    eps_high=None,
    dual_clip=None,
    kl_coef=None,
    vf_coef=0.5,
    vf_clip=0.2,
    reduction=None,
    seq_ids=None,
    normalizer=None,
    num_seqs=None,
    objective=None,
    weights=None,
    block_ids=None,
    copy_ids=None,
    positions=None,
):
    """The eager torch composition of SPEC 2.4 / 4.9 (what PPO / GRPO trainers write by hand), for
    every objective. The policy settings come as an ``objective`` (dlmkern.ops.Objective) or as
    the loose keywords of the op's keyword API (eps_low, eps_high, dual_clip, kl_coef, reduction,
    normalizer: never both). Returns (loss, stats) with the same keys as
    dlmkern.ops.policy_value_loss. Gradients flow to logp and values through ordinary autograd.
    """
    from dlmkern.ops.objective import call_objective

    objective = call_objective(objective, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                           kl_coef=kl_coef, reduction=reduction, normalizer=normalizer)
    return objective_loss(objective, logp, old_logp, advantages, mask, ref_logp=ref_logp,
                          values=values, old_values=old_values, returns=returns, weights=weights,
                          seq_ids=seq_ids, block_ids=block_ids, num_seqs=num_seqs,
                          vf_coef=vf_coef, vf_clip=vf_clip, copy_ids=copy_ids,
                          positions=positions)


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[n, Hkv, D] -> [n, Hq, D] for grouped-query attention (query head h uses kv head
    h // (Hq / Hkv))."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def _attend(q, k, v, mask, scale):
    """q [n, Hq, D], k/v [m, Hq, D], mask [n, m] bool -> (out [n, Hq, D], lse [Hq, n]).

    NaN policy (README "NaN policy"): torch.softmax over the keys a row sees, so a NaN score (NaN
    or inf in q or a visible k) or a +inf score makes the row NaN. Masked scores are overwritten
    with -inf before the softmax, so a NaN in a masked-out key's k never reaches the row (torch's
    SDPA with a bool mask adds -inf to it instead, and NaN + -inf leaks). Rows whose scores are all
    -inf (nothing visible) give 0 and lse -inf, like SDPA. The product with v is a plain matmul:
    a NaN in a masked-out key's v reaches rows of the same sequence (0 * NaN), as in SDPA."""
    s = torch.einsum("nhd,mhd->hnm", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = (s == float("-inf")).all(-1, keepdim=True)  # NaN != -inf: NaN rows are not empty
    # Softmax on rows that see something; empty rows get 0 (and no NaN gradient: the where-free
    # masked_fill keeps exp(-inf - -inf) out of the graph).
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(~mask | empty, 0.0)
    lse = lse.masked_fill(p.isnan().any(-1), float("nan"))  # a +inf score: NaN row, NaN lse
    return torch.einsum("hnm,mhd->nhd", p, v), lse


def block_attention(q, k, v, cu_seqlens, block, stream, *, full=False, scale=None):
    """Dense-mask reference of dlmkern.ops.block_attention (materializes the per-sequence mask).

    Returns (out [T, Hq, D] in q's dtype, lse [Hq, T] fp32 (fp64 for fp64 input))."""
    from dlmkern.ops.layouts import visible

    dt = _compute_dtype(q)
    hq, d = q.shape[1], q.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=dt, device=q.device)
    cu = cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        if e == s:
            continue
        b, r = block[s:e].long(), stream[s:e].long()
        if full:
            mask = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device)
        else:
            mask = visible(b[:, None], r[:, None], b[None, :], r[None, :])
        o, l_ = _attend(q[s:e].to(dt), _expand_kv(k[s:e].to(dt), hq),
                        _expand_kv(v[s:e].to(dt), hq), mask, scale)
        out[s:e] = o
        lse[:, s:e] = l_
    return out.to(q.dtype), lse


def decode_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cu_seqlens_q, *,
                     commit=False, scale=None):
    """Reference of dlmkern.ops.decode_attention: sequence i's current block (queries
    q[cu[i]:cu[i+1]]) attends to its cached prefix k_cache[i, :cache_seqlens[i]] and,
    bidirectionally, to the block's own k_new / v_new. commit=True then appends the block's k/v
    to the cache and advances cache_seqlens (in place)."""
    dt = _compute_dtype(q)
    hq, d = q.shape[1], q.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=dt, device=q.device)
    cu = cu_seqlens_q.tolist()
    lens = cache_seqlens.tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        n = lens[i]
        keys = torch.cat([k_cache[i, :n], k_new[s:e]]).to(dt)
        vals = torch.cat([v_cache[i, :n], v_new[s:e]]).to(dt)
        mask = torch.ones(e - s, n + e - s, dtype=torch.bool, device=q.device)
        o, _ = _attend(q[s:e].to(dt), _expand_kv(keys, hq), _expand_kv(vals, hq), mask, scale)
        out[s:e] = o
    if commit:
        for i, (s, e) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
            n = lens[i]
            k_cache[i, n:n + e - s] = k_new[s:e]
            v_cache[i, n:n + e - s] = v_new[s:e]
        cache_seqlens += torch.tensor([e - s for s, e in zip(cu[:-1], cu[1:], strict=True)],
                                      dtype=cache_seqlens.dtype, device=cache_seqlens.device)
    return out.to(q.dtype)
