"""Advantages (SPEC 4.3 / 4.4): group z-scores, wd1's group weights, MDPO's step-level
advantages, group filters, and GAE over trace steps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dlmkern._host import HOST, on_host


def group_zscore(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within consecutive groups of `group_size` samples of one prompt;
    0 for a group whose rewards are all equal (std == 0). std is the unbiased estimate (GRPO)."""
    r = rewards.float().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = torch.where(std > 0, (r - mean) / (std + eps), torch.zeros_like(r))
    return adv.view(-1)


ADVANTAGES = ("zscore", "wd1", "tree", "mdpo")


def wd1_weights(rewards: torch.Tensor, group_size: int, psi: float = 1.0) -> torch.Tensor:
    """wd1's per-completion weight w+ - w- (Tang et al. 2025): with A = r - mean(r) over the
    group, w+ = softmax(psi * A) and w- = softmax(-psi * A) over the group's completions. The
    objective -sum_i (w+_i - w-_i) log pi(o_i | q) raises the likelihood of completions above the
    group mean and lowers that of those below; a group whose rewards are all equal has w+ = w-
    (weight 0)."""
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(-1, keepdim=True)
    return (torch.softmax(psi * a, -1) - torch.softmax(-psi * a, -1)).view(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "zscore",
                     psi: float = 1.0, factors: tuple[int, ...] = ()) -> torch.Tensor:
    """Per-completion advantages from rewards [n] of consecutive groups (the config's
    `advantage`): ``zscore`` (group_zscore: GRPO / TraceRL / DiPO), ``wd1`` (wd1_weights, the
    weights of wd1's weighted likelihood, with ratio_level none) or ``tree`` (a group is a tree
    of `factors`: tree_advantages, [n, depth], one advantage per leaf and depth)."""
    if kind == "zscore":
        return group_zscore(rewards, group_size)
    if kind == "wd1":
        return wd1_weights(rewards, group_size, psi)
    if kind == "tree":
        if math.prod(factors) != group_size:
            raise ValueError(f"advantage=tree: a group of {group_size} is not a tree of "
                             f"factors {factors}")
        return tree_advantages(rewards, factors)
    if kind == "mdpo":
        raise ValueError("advantage=mdpo is step-level: mdpo_step_advantages of each step's "
                         "rewards (the rollout computes it), not of the completions' rewards")
    raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {kind!r}")


def tree_advantages(rewards: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """d-TreeRPO's local advantages (dlmkern.sampling.tree: a prompt's leaves in mixed-radix
    order, factors[d] children per depth-d node). A leaf's value is its reward, an inner node's
    the mean of its children's values; a node's local advantage is its value minus the mean of
    its siblings' values, the node itself left out (DARE's dtreerpo_algos.py; 0 without
    siblings). rewards [n_prompts * prod(factors)] -> [n, D]: column d-1 holds the advantage of
    each leaf's depth-d ancestor (the node whose segment unmasked its steps in [b_{d-1}, b_d))."""
    D, L = len(factors), math.prod(factors)
    values = [rewards.float().view(-1, *factors)]  # values[j]: nodes of depth D - j
    for _ in range(D - 1):
        values.append(values[-1].mean(-1))
    cols = []
    for d in range(1, D + 1):  # the depth-d nodes: [P, k_1, ..., k_d]
        v, k = values[D - d], factors[d - 1]
        rest = (v.sum(-1, keepdim=True) - v) / max(k - 1, 1)
        adv = v - rest if k > 1 else torch.zeros_like(v)
        cols.append(adv.reshape(*adv.shape, *([1] * (D - d))).expand(-1, *factors).reshape(-1))
    return torch.stack(cols, -1).view(-1, L, D).view(-1, D)


def mdpo_step_advantages(step_rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                         scale: bool = True) -> torch.Tensor:
    """MDPO's step-level advantages (He et al. 2025; DARE's compute_step_wise_advantage) from
    the rewards [n, S] of the completions decoded at each of S sampler steps: the score of step
    k is its reward gain plus one, (r_k - r_{k-1}) + 1 (r_{-1} = 0), plus the mean reward of the
    later steps, mean(r_{k+1..S-1}) (the last step: r_{S-1}); each step's scores are then
    z-scored over the group of one prompt's completions, (x - mean) / (std + eps), std the
    unbiased estimate (scale=False: x - mean, Dr.GRPO; a group of one: x itself)."""
    r = step_rewards.float()
    n, S = r.shape
    gain = torch.cat([r[:, :1], r[:, 1:] - r[:, :-1]], 1) + 1.0
    later = r.flip(1).cumsum(1).flip(1)  # sum of r_k..r_{S-1}
    count = torch.arange(S - 1, 0, -1, dtype=r.dtype, device=r.device)
    future = torch.cat([(later[:, 1:] / count) if S > 1 else r[:, :0], r[:, -1:]], 1)
    x = (gain + future).view(-1, group_size, S)
    if group_size == 1:
        return x.view(n, S)
    x = x - x.mean(1, keepdim=True)
    if scale:
        x = x / (x.std(1, keepdim=True) + eps)
    return x.view(n, S)


def top_steps(step_adv: torch.Tensor, k: int) -> torch.Tensor:
    """The k steps (ascending) of largest summed |advantage| over the batch [n, S] (MDPO trains
    those only; DARE's select_top_k_steps); every step when k <= 0 or k >= S."""
    S = step_adv.shape[1]
    if k <= 0 or k >= S:
        return torch.arange(S, device=step_adv.device)
    return step_adv.abs().sum(0).topk(k).indices.sort().values


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
    [n] and rewards [num trajectories] on the compute device. The recursions over trace steps run
    as discounted suffix sums over all trajectories and steps together (a fixed number of ops
    whatever the trace length; shorter traces are zero-padded at the end, which leaves their
    values unchanged)."""
    dev = values.device
    n_traj = int(rewards.numel())
    if step_ids.numel() == 0:
        return values.float() * 0, values.float() * 0
    slot, ends, K = _step_slots(traj.cpu().long(), step_ids.cpu().long(), n_traj)
    flat = slot.to(dev)
    v = values.float()
    cols = K + 1  # column K stays 0: past every trace's end
    v_step = torch.zeros(n_traj * cols, device=dev).index_add(0, flat, v)
    n_step = torch.zeros(n_traj * cols, device=dev).index_add(0, flat, torch.ones_like(v))
    V = (v_step / n_step.clamp(min=1)).view(n_traj, cols)
    # the reward sits on each trajectory's last step (scattered on the device: no read-back)
    owners, last = ends.to(dev).unbind(0)
    r_step = torch.zeros(n_traj * cols, device=dev).index_put_(
        (last,), rewards.float().index_select(0, owners)).view(n_traj, cols)
    delta = r_step[:, :K] - V[:, :K] + gamma * V[:, 1:]
    A = F.pad(discounted_suffix_sum(delta, gamma * lam), (0, 1))
    R = F.pad(discounted_suffix_sum(r_step[:, :K], gamma), (0, 1))
    r_tok = r_step.view(-1)[flat]
    nxt = flat + 1
    adv = r_tok - v + gamma * V.view(-1)[nxt] + gamma * lam * A.view(-1)[nxt]
    ret = r_tok + gamma * R.view(-1)[nxt]
    return adv, ret


@on_host
def _step_slots(traj: torch.Tensor, step_ids: torch.Tensor,
                n_traj: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Host work: each token's slot traj * (K + 1) + (rank of its step among its trajectory's
    distinct steps), the [2, m] (trajectory, slot of its last step) of the m trajectories with
    tokens, and K, the longest trace."""
    span = int(step_ids.max()) + 1
    key = traj * span + step_ids
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    owner = uniq // span
    first = torch.searchsorted(owner, torch.arange(n_traj, device=HOST))
    count = torch.bincount(owner, minlength=n_traj)
    K = int(count.max())
    slot = traj * (K + 1) + inverse - first[traj]
    has = torch.nonzero(count).view(-1)
    return slot, torch.stack([has, has * (K + 1) + count[has] - 1]), K


def discounted_suffix_sum(x: torch.Tensor, c: float) -> torch.Tensor:
    """out[:, k] = sum_{j >= k} c^(j - k) x[:, j], i.e. out_k = x_k + c out_{k+1}, for x [n, K],
    without a loop over k: the steps are cut into blocks of C ~ sqrt(K); a C x C matrix of
    discounts sums within each block and an nb x nb one carries later blocks back. Only powers
    c^m with m >= 0 appear (for c <= 1 they underflow harmlessly to 0 and never overflow, unlike
    a cumsum of x_j c^-j), in float64 (no TF32 matmul)."""
    n, K = x.shape
    if K == 0:
        return x.clone()
    C = math.isqrt(K - 1) + 1  # ceil(sqrt(K))
    nb = -(-K // C)
    dev = x.device
    blocks = F.pad(x.double(), (0, nb * C - K)).view(n, nb, C)
    local = blocks @ _discounts(C, c, 1, dev).T  # local[:, b, i]: block b's own steps from i on
    head = local[:, :, 0] @ _discounts(nb, c, C, dev).T  # head[:, b]: everything from block b on
    carry = F.pad(head[:, 1:], (0, 1))  # what blocks after b contribute, seen from its end
    tail = c ** (C - torch.arange(C, device=dev, dtype=torch.float64))
    out = local + carry[:, :, None] * tail
    return out.view(n, nb * C)[:, :K].to(x.dtype)


def _discounts(m: int, c: float, stride: int, device) -> torch.Tensor:
    """[m, m] float64: c^(stride * (j - i)) for j >= i, else 0."""
    i = torch.arange(m, device=device, dtype=torch.float64)
    e = i[None, :] - i[:, None]
    return torch.where(e >= 0, c ** (stride * e.clamp(min=0)), 0.0)
