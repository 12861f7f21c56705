"""Pure-torch reference implementations: the ground truth the kernels are tested against.

They favour clarity over speed and memory (they DO materialize full logits / dense masks) and
compute in float32 (or float64 when given float64) whatever the input dtype.
"""

from __future__ import annotations

import torch


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
    entropy = -(lsm.exp() * lsm).sum(-1)
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
