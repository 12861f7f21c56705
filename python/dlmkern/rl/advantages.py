"""Advantages (SPEC 4.3 / 4.4): group z-scores, group filters, and GAE over trace steps."""

from __future__ import annotations

import torch

from dlmkern._host import HOST


def group_zscore(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within consecutive groups of `group_size` samples of one prompt;
    0 for a group whose rewards are all equal (std == 0). std is the unbiased estimate (GRPO)."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = torch.where(std > 0, (r - mean) / (std + eps), torch.zeros_like(r))
    return adv.view(-1)


def keep_groups(rewards: torch.Tensor, group_size: int, low: float, high: float,
                dynamic: bool = False) -> torch.Tensor:
    """Bool [num_groups]: the prompt groups that train. Their mean reward (the pass rate, for
    0 / 1 rewards) must lie in [low, high] (TraceRL's code keeps 0.2..0.8); `dynamic` (DAPO's
    dynamic sampling) keeps instead the groups whose rewards are not all equal: 0 < pass rate
    < 1 for 0 / 1 rewards, any spread for partial credit (verl's rule: std > 0)."""
    r = rewards.float().view(-1, group_size)
    if dynamic:
        return (r != r[:, :1]).any(-1)
    mean = r.mean(-1)
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
    zeros = torch.zeros(step_ids.numel(), dtype=torch.long, device=HOST)
    return trace_gae_batch(zeros, step_ids, values,
                           torch.tensor([float(reward)], device=HOST), gamma, lam)


def trace_gae_batch(traj: torch.Tensor, step_ids: torch.Tensor, values: torch.Tensor,
                    rewards: torch.Tensor, gamma: float = 1.0,
                    lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """trace_gae of many trajectories at once. traj / step_ids [n] on the host (the rows' host
    copies: the step structure is read there, so nothing is read back from the device), values
    [n] and rewards [num trajectories] on the compute device. The recursions run over the
    longest trace, all trajectories together (shorter ones are zero-padded at the end, which
    leaves their values unchanged)."""
    dev = values.device
    n_traj = int(rewards.numel())
    if step_ids.numel() == 0:
        return values.float() * 0, values.float() * 0
    traj, step_ids = traj.cpu().long(), step_ids.cpu().long()
    # rank of each token's step among its trajectory's distinct steps (host)
    span = int(step_ids.max()) + 1
    key = traj * span + step_ids
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    owner = uniq // span
    first = torch.searchsorted(owner, torch.arange(n_traj, device=HOST))
    count = torch.bincount(owner, minlength=n_traj)
    rank = inverse - first[traj]
    K = int(count.max())
    flat = (traj * (K + 1) + rank).to(dev)
    v = values.float()
    shape = (n_traj, K + 1)
    v_step = torch.zeros(n_traj * (K + 1), device=dev).index_add(0, flat, v)
    n_step = torch.zeros(n_traj * (K + 1), device=dev).index_add(0, flat, torch.ones_like(v))
    V = (v_step / n_step.clamp(min=1)).view(shape)
    r_step = torch.zeros(shape, device=HOST)  # the reward sits on each trajectory's last step
    has = count > 0
    r_step[torch.arange(n_traj, device=HOST)[has], count[has] - 1] = rewards.float().cpu()[has]
    r_step = r_step.to(dev)
    R = torch.zeros(shape, device=dev)
    A = torch.zeros(shape, device=dev)
    for k in range(K - 1, -1, -1):  # column K stays 0: past every trace's end
        R[:, k] = r_step[:, k] + gamma * R[:, k + 1]
        A[:, k] = r_step[:, k] - V[:, k] + gamma * V[:, k + 1] + gamma * lam * A[:, k + 1]
    r_tok = r_step.view(-1)[flat]
    nxt = flat + 1
    adv = r_tok - v + gamma * V.view(-1)[nxt] + gamma * lam * A.view(-1)[nxt]
    ret = r_tok + gamma * R.view(-1)[nxt]
    return adv, ret
