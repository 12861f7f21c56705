"""The rollout stage (SPEC 4.6): sample completions with the live weights, score them (IGPO:
re-sample all-fail groups with inpainted hints, dlmkern.trainers.inpaint), and the group filters
and pass rates that read only rewards. Produces a `RolloutBatch`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from dlmkern import distributed
from dlmkern._host import HOST, on_host
from dlmkern.rl import group_advantages, keep_groups
from dlmkern.rl.advantages import mdpo_step_advantages, top_steps
from dlmkern.sampling import sampler_for
from dlmkern.sampling.block import Trajectory
from dlmkern.trainers.checks import NonFiniteReward, RewardSpec
from dlmkern.trainers.inpaint import inpaint_failed
from dlmkern.trainers.rl_config import RLConfig


@dataclass
class RolloutBatch:
    """Completions of whole prompt groups (group_size consecutive trajectories per prompt)."""

    trajs: list[Trajectory]
    rewards: torch.Tensor                     # [n] summed rewards (host, fp32)
    prompts: list[int]                        # each group's global prompt index in the step
    group_size: int
    time_sample: float = 0.0
    time_reward: float = 0.0
    # [n] cfg.advantage (no value model); advantage=tree: [n, tree depth]; advantage=mdpo:
    # [n, steps], each step's
    advantages: torch.Tensor | None = field(default=None)

    def __len__(self) -> int:
        return len(self.trajs)

    @on_host
    def groups(self, keep: torch.Tensor) -> RolloutBatch:
        """The groups where `keep` [num groups] is True."""
        g = self.group_size
        kept = keep.nonzero().flatten().tolist()
        idx = [i for gi in kept for i in range(gi * g, gi * g + g)]
        sel = torch.tensor(idx, dtype=torch.long, device=HOST)
        return RolloutBatch([self.trajs[i] for i in idx], self.rewards[sel],
                            [self.prompts[gi] for gi in kept], g,
                            advantages=None if self.advantages is None else self.advantages[sel])

    @staticmethod
    @on_host
    def cat(batches: list[RolloutBatch], group_size: int) -> RolloutBatch:
        adv = [b.advantages for b in batches]
        return RolloutBatch(
            [t for b in batches for t in b.trajs],
            torch.cat([b.rewards for b in batches]) if batches else torch.zeros(0, device=HOST),
            [p for b in batches for p in b.prompts], group_size,
            sum(b.time_sample for b in batches), sum(b.time_reward for b in batches),
            _cat_advantages(adv) if batches and all(a is not None for a in adv) else None)

    def positions(self) -> tuple[list[int], int]:
        """Each trajectory's place in the step's global order of kept trajectories (prompt index
        order over all ranks), and that order's length: mini-batches are cut from it, so they
        do not depend on the number of ranks."""
        order = sorted(p for ranks in distributed.all_gather(self.prompts) for p in ranks)
        where = {p: i for i, p in enumerate(order)}
        g = self.group_size
        return [where[p] * g + k for p in self.prompts for k in range(g)], len(order) * g


def _cat_advantages(adv: list[torch.Tensor]) -> torch.Tensor:
    """Per-trajectory advantages back to back; step-level ones ([n, steps], MDPO) padded with 0
    to the most steps (a trajectory never trains a step it did not run)."""
    if adv[0].dim() == 1:
        return torch.cat(adv)
    S = max(a.shape[1] for a in adv)
    return torch.cat([torch.nn.functional.pad(a, (0, S - a.shape[1])) for a in adv])


@on_host
def keep_mask(rewards: torch.Tensor, cfg: RLConfig) -> torch.Tensor:
    """Bool per group: which groups are trained (dlmkern.rl.keep_groups: the config's bounds on
    the mean reward, or DAPO's groups with a reward spread)."""
    return keep_groups(rewards, cfg.group_size, cfg.pass_rate_low, cfg.pass_rate_high,
                       dynamic=cfg.dynamic_sampling)


class Rollout:
    """Samples `group_size` completions per prompt and sums the rewards. Each reward receives the
    dataset columns its signature names (dlmkern.trainers.checks.RewardSpec)."""

    def __init__(self, cfg: RLConfig, tokenizer, prompt_format, reward_fns):
        self.cfg, self.tok, self.prompt_format = cfg, tokenizer, prompt_format
        self.reward_fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) \
            else [reward_fns]
        self._specs: dict[int, RewardSpec] = {}

    def spec(self, fn) -> RewardSpec:
        spec = self._specs.get(id(fn))
        if spec is None or spec.fn is not fn:
            spec = self._specs[id(fn)] = RewardSpec(fn)
        return spec

    def sampler(self, model):
        cfg = self.cfg
        return sampler_for(model, cfg.sampling, cfg.max_new_tokens, cfg.gen_block_length,
                           self.tok.eos_token_id, record_predictions=cfg.advantage == "mdpo")

    def __call__(self, model, rows: list[dict], indices: list[int], step: int,
                 with_advantages: bool) -> RolloutBatch:
        """`indices`: the rows' positions among the step's prompts (over all ranks): a sample
        always draws from the same seed, whichever rank samples it. Collective: every rank
        calls it, with or without rows."""
        g = self.cfg.group_size
        model.eval()
        base = (self.cfg.seed * 7919 + step) * 1000003
        seeds = [base + i * g + k for i in indices for k in range(g)]
        t0 = time.perf_counter()
        with distributed.gathered(model):  # collective: ranks without prompts join too
            if not rows:
                return RolloutBatch([], torch.zeros(0, device=HOST), [], g)
            prompts = [self.prompt_format.encode(r, self.tok) for r in rows]
            sampler = self.sampler(model)
            tree = self.cfg.tree_spec(model.config.block_size if model.config.block_causal
                                      else None)
            trajs = sampler.generate(prompts, n_samples=g, seeds=seeds) if tree is None else \
                sampler.generate_tree(prompts, tree, seeds=seeds)  # d-TreeRPO
            t1 = time.perf_counter()
            rewards = None
            if self.cfg.inpaint_column:  # IGPO: all-fail groups re-sampled with hints (it
                rewards = self.score(rows, trajs)  # scores while the weights are gathered)
                trajs, rewards = inpaint_failed(self, sampler, rows, prompts, trajs, rewards,
                                                seeds)
        if rewards is None:
            rewards = self.score(rows, trajs)
        batch = RolloutBatch(trajs, rewards, list(indices), g, t1 - t0,
                             time.perf_counter() - t1)
        if with_advantages and self.cfg.advantage == "mdpo":  # each step's decoded completion
            batch.advantages = self.step_advantages(rows, trajs)
        elif with_advantages:  # computed once, here; a value model's GAE replaces them
            batch.advantages = group_advantages(rewards, g, self.cfg.advantage,
                                                self.cfg.wd1_psi,
                                                self.cfg.tree_factors())
        return batch

    @on_host
    def step_advantages(self, rows: list[dict], trajs: list[Trajectory]) -> torch.Tensor:
        """MDPO: the completion decoded at each sampler step is rewarded (one reward call per
        step and completion), step-level advantages [n, steps] computed from those rewards
        (mdpo_step_advantages; a sequence that stopped early keeps its last reward), and only
        the mdpo_train_steps steps of largest summed |advantage| are kept on the trajectories
        (Trajectory.step_predictions / prediction_steps: the steps the rows train)."""
        g, eos = self.cfg.group_size, self.tok.eos_token_id
        counts = [t.step_predictions.shape[0] for t in trajs]  # >= 1: every sequence steps
        S = max(counts)
        texts = [self.tok.decode(_until_eos(p, eos), skip_special_tokens=True)
                 for t in trajs for p in t.step_predictions.tolist()]
        owner = [i for i, c in enumerate(counts) for _ in range(c)]
        flat = self.score_texts([rows[i // g] for i in owner], texts)
        step_r = torch.zeros(len(trajs), S, device=HOST)
        at = 0
        for i, c in enumerate(counts):
            step_r[i, :c] = flat[at:at + c]
            step_r[i, c:] = flat[at + c - 1]  # the state after its last step stays final
            at += c
        adv = mdpo_step_advantages(step_r, g)
        keep = top_steps(adv, self.cfg.mdpo_train_steps).tolist()
        for t, c in zip(trajs, counts, strict=True):
            mine = [k for k in keep if k < c]
            t.step_predictions, t.prediction_steps = t.step_predictions[mine], mine
        return adv

    @on_host
    def score(self, rows: list[dict], trajs: list[Trajectory]) -> torch.Tensor:
        """Summed rewards [len(trajs)] (host): each reward checked to return n finite floats,
        else a ValueError naming it (NaN / inf: NonFiniteReward)."""
        g = self.cfg.group_size
        return self.score_texts([r for r in rows for _ in range(g)],
                                [t.text(self.tok) for t in trajs])

    @on_host
    def score_texts(self, expanded: list[dict], completions: list[str]) -> torch.Tensor:
        """Summed rewards of completions [k] (host), completion i answering row expanded[i]."""
        keys = dict.fromkeys(k for r in expanded for k in r if k != "prompt")
        columns = {k: [r.get(k) for r in expanded] for k in keys}
        prompt_text = [r["prompt"] for r in expanded]
        rewards = torch.zeros(len(completions), device=HOST)  # rewards, advantages: host-side
        for fn in self.reward_fns:
            rewards += torch.tensor(self.spec(fn)(prompt_text, completions, columns),
                                    dtype=torch.float32, device=HOST)
        return rewards


def collect(cfg: RLConfig, next_rows, rollout):
    """Rollout rounds until prompts_per_step groups are kept on all ranks together (one round
    without dynamic sampling). `next_rows(n)`: the next n prompt rows of the data (the same on
    every rank); `rollout(rows, indices)`: this rank's RolloutBatch of them (the trainer's
    rollout with its live weights). Returns (kept, sampled, kept group count, error): error is
    the message of a non-finite reward under on_nonfinite: skip (agreed by every rank)."""
    rank, world = distributed.rank(), distributed.world()
    rounds = 1 + (cfg.max_oversample_rounds if cfg.dynamic_sampling else 0)
    kept, sampled, drawn, n_kept = [], [], 0, 0
    for _ in range(rounds):
        needed = cfg.prompts_per_step - n_kept  # exactly what 1 process draws
        rows = next_rows(needed)
        mine = list(range(rank, needed, world))
        bad = None
        try:
            batch = rollout([rows[i] for i in mine], [drawn + i for i in mine])
        except NonFiniteReward as e:  # "stop": the reward's ValueError, as it is
            if cfg.on_nonfinite == "stop":
                raise
            bad = str(e)
        if cfg.on_nonfinite == "skip" and distributed.enabled() and \
                distributed.all_sum(float(bad is not None)) > 0 and bad is None:
            bad = "a reward returned non-finite values on another rank"
        if bad is not None:
            return None, None, 0, bad
        drawn += needed
        sampled.append(batch)
        if len(batch):
            kept.append(batch.groups(keep_mask(batch.rewards, cfg)))
        n_kept = int(distributed.all_sum(sum(len(b) for b in kept) // cfg.group_size))
        if n_kept >= cfg.prompts_per_step:
            break
    g = cfg.group_size
    return RolloutBatch.cat(kept, g), RolloutBatch.cat(sampled, g), n_kept, None


@on_host
def reward_stats(sampled: RolloutBatch, cfg: RLConfig) -> dict:
    """Reward mean / std and pass rate over every sampled completion on every rank, and the
    groups and tokens sampled (dynamic sampling: every round's); IGPO: the completions kept
    with inpainted hints (their rewards are in the mean)."""
    r = sampled.rewards
    n = distributed.all_sum(r.numel())
    mean = distributed.all_sum(float(r.sum())) / n
    sq = distributed.all_sum(float((r - mean).pow(2).sum()))
    passed = distributed.all_sum(float((r >= cfg.pass_threshold).sum()))
    out = {"reward_mean": mean, "reward_std": math.sqrt(sq / (n - 1)) if n > 1 else 0.0,
           "pass_rate": passed / n, "sampled_groups": int(n) // cfg.group_size,
           "sampled_tokens": int(distributed.all_sum(sum(len(t.token_ids)
                                                         for t in sampled.trajs)))}
    if cfg.inpaint_column:  # IGPO: completions that hold inpainted hints
        out["inpainted"] = int(distributed.all_sum(sum(bool(t.inpainted)
                                                       for t in sampled.trajs)))
    return out


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    """A decoded completion up to its first EOS (included), as the sampler ends a sequence."""
    return tokens[:tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens
