"""Advantages (SPEC 4.3 / 4.4): group z-scores, group filters, and GAE over trace steps."""

from __future__ import annotations

import torch


def group_zscore(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within consecutive groups of `group_size` samples of one prompt;
    0 for a group whose rewards are all equal (std == 0). std is the unbiased estimate (GRPO)."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = torch.where(std > 0, (r - mean) / (std + eps), torch.zeros_like(r))
    return adv.view(-1)


def keep_groups(rewards: torch.Tensor, group_size: int, low: float, high: float,
                strict: bool = False) -> torch.Tensor:
    """Bool [num_groups]: groups whose mean reward (pass rate) lies in [low, high]
    (TraceRL keeps 0.2..0.8), or in (low, high) with strict=True (DAPO: 0 < mean < 1)."""
    mean = rewards.float().view(-1, group_size).mean(-1)
    if strict:
        return (mean > low) & (mean < high)
    return (mean >= low) & (mean <= high)


def trace_gae(step_ids: torch.Tensor, values: torch.Tensor, reward: float, gamma: float = 1.0,
              lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Value-based advantages of one trajectory over its trace steps (SPEC 4.3).

    step_ids [n] (shrunk) step of each trained token, values [n] V_j read at each token's noisy
    position. Steps are ordered by id; V*_k is the mean value of step k's tokens; the reward sits
    on the last step. Returns (advantages [n], returns [n]) per token:
      R*_k = r*_k + g R*_{k+1},  delta*_k = r*_k - V*_k + g V*_{k+1},
      A*_k = delta*_k + g l A*_{k+1},
      A_j = r_j - V_j + g V*_{k+1} + g l A*_{k+1},  return_j = r_j + g R*_{k+1}
    (g = l = 1 gives A_j = R - V_j)."""
    steps = torch.unique(step_ids, sorted=True)
    K = steps.numel()
    which = torch.searchsorted(steps, step_ids)
    v = values.float()
    v_step = torch.zeros(K, dtype=torch.float32, device=v.device).index_add(0, which, v)
    v_step = v_step / torch.bincount(which, minlength=K).clamp(min=1).to(v.dtype)
    r_step = torch.zeros(K, dtype=torch.float32, device=v.device)
    if K:
        r_step[-1] = reward
    R = torch.zeros(K + 1, device=v.device)
    A = torch.zeros(K + 1, device=v.device)
    V = torch.cat([v_step, torch.zeros(1, device=v.device)])
    for k in range(K - 1, -1, -1):
        R[k] = r_step[k] + gamma * R[k + 1]
        A[k] = r_step[k] - V[k] + gamma * V[k + 1] + gamma * lam * A[k + 1]
    r_tok = r_step[which]
    adv = r_tok - v + gamma * V[which + 1] + gamma * lam * A[which + 1]
    ret = r_tok + gamma * R[which + 1]
    return adv, ret
