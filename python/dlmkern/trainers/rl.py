"""The RL loop (SPEC 4.6) shared by TraceRL and DiPO: sample with the live weights -> reward ->
advantages and group filters -> packed rows -> (value update) -> policy update, in one process.
Optimizer state persists across steps; checkpoints hold model, value model, optimizer, RNG, step
and data position, written atomically, and resume exactly."""

from __future__ import annotations

import copy
import math
import os
import time

import torch

from dlmkern import distributed
from dlmkern._host import HOST
from dlmkern.data import PromptFormat, load_dataset
from dlmkern.models import DiffusionLM, ValueModel, load
from dlmkern.ops import policy_value_loss
from dlmkern.rl import (
    baseline_rows,
    block_rows,
    full_rows,
    group_zscore,
    keep_groups,
    trace_gae,
)
from dlmkern.sampling import BlockSampler, FullSampler
from dlmkern.sampling.block import Trajectory
from dlmkern.trainers.checkpoint import Checkpointing
from dlmkern.trainers.checks import (
    NonFiniteReward,
    RewardSpec,
    check_reward_columns,
    nonfinite_guard,
    prepare_output_dir,
)
from dlmkern.trainers.config import RLConfig, to_dict
from dlmkern.trainers.logging import RunLogger
from dlmkern.trainers.optim import MixedPrecisionAdamW


class RLTrainer(Checkpointing):
    """Base of TraceRL and DiPO. ``model``: a DiffusionLM or a checkpoint path; ``tokenizer``:
    encode / decode / eos_token_id; ``dataset``: rows with "prompt" or "messages" (+ reward
    columns), or a dataset file / directory (dlmkern.data.load_dataset, with config.columns);
    prompts are rendered by config's prompt format (dlmkern.data.PromptFormat: the tokenizer's
    chat template when it has one) and rewards receive the row's prompt text;
    ``reward_fns``: callables ``f(prompts, completions, **columns) -> list[float]`` (summed).

    Each reward receives, as keyword arguments, only the dataset columns its signature names
    (every column when it takes ``**kwargs``); a named parameter without a default must be a
    column of every row, which is checked when the trainer is built. A reward must return one
    finite float per completion: anything else is a ValueError naming the reward (NaN / inf:
    see ``on_nonfinite``). Before any model work the trainer also applies the
    ``existing_output_dir`` policy to ``output_dir``. ``resume_from``: a checkpoint directory to
    start from (inside output_dir it continues that run whatever the policy)."""

    name = "rl"

    def __init__(self, model, tokenizer, dataset, reward_fns, config: RLConfig | None = None,
                 value_model: ValueModel | None = None, resume_from: str | None = None):
        self.cfg = (config or RLConfig()).validate(value_model=value_model is not None)
        torch.manual_seed(self.cfg.seed)
        self.distributed = distributed.init()
        # mistakes refused before any model work: rewards that cannot be called, columns they
        # need that the dataset lacks, rows the prompt format cannot render, a previous run in
        # output_dir (then, only then, "overwrite" deletes it)
        self.data = load_dataset(dataset, self.cfg.columns)
        self.prompt_format = PromptFormat.from_config(self.cfg)
        self.prompt_format.check(self.data, tokenizer)
        self.reward_fns = reward_fns if isinstance(reward_fns, (list, tuple)) else [reward_fns]
        self._reward_specs = {}
        check_reward_columns(self.data, [self._reward_spec(fn) for fn in self.reward_fns])
        start_from = prepare_output_dir(self.cfg.output_dir, self.cfg.existing_output_dir,
                                        writer=distributed.rank() == 0, resume_from=resume_from)
        self.model: DiffusionLM = distributed.to_local_device(
            load(model) if isinstance(model, str) else model)
        self.tok = tokenizer
        self.device = next(self.model.parameters()).device
        self.value_model = value_model
        if value_model is not None:
            distributed.to_local_device(value_model)
        if self.cfg.use_value_model and self.value_model is None:
            self.value_model = ValueModel.from_policy(self.model)
        # the frozen reference policy exists only when a KL to it is asked for
        self.ref_model = None
        if self.cfg.kl_coef > 0 and self.cfg.kl_to == "ref":
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.gradient_checkpointing = self.cfg.gradient_checkpointing
        if self.value_model is not None:
            self.value_model.trunk.gradient_checkpointing = self.cfg.gradient_checkpointing
        if self.distributed:  # FSDP2 before the optimizers see the parameters
            for m in (self.model, self.value_model, self.ref_model):
                if m is not None:
                    distributed.shard(m)
        self.opt = MixedPrecisionAdamW(self.model.parameters(), lr=self.cfg.lr,
                                       weight_decay=self.cfg.weight_decay)
        self.value_opt = None
        if self.value_model is not None:
            self.value_opt = MixedPrecisionAdamW(self.value_model.parameters(),
                                                 lr=self.cfg.value_lr,
                                                 weight_decay=self.cfg.weight_decay)
        # optional held-out evaluation: eval_fn(model) -> float, every eval_every steps (called
        # on every rank; logged as eval_accuracy and plotted)
        self.eval_fn = None
        # {log key: (value, label)} drawn as reference lines in curves.png (e.g. the held-out
        # accuracy the run started from)
        self.plot_marks: dict = {}
        self.step = 0
        self.data_pos = 0
        self.data_order = self._permutation(0)
        self.nonfinite_skipped = 0  # updates dropped for a non-finite value (on_nonfinite: skip)
        self.logger = RunLogger(self.cfg.output_dir, to_dict(self.cfg),
                                enabled=distributed.rank() == 0)
        if start_from is not None:  # resume_from, or existing_output_dir: resume
            self.resume(start_from)
            self.logger.warn(f"resumed from {start_from} (step {self.step})")

    def _reward_spec(self, fn) -> RewardSpec:
        spec = self._reward_specs.get(id(fn))
        if spec is None or spec.fn is not fn:
            spec = self._reward_specs[id(fn)] = RewardSpec(fn)
        return spec

    # ---- data ---------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        return torch.randperm(len(self.data), generator=g, device=HOST).tolist()

    def _next_rows(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            epoch, i = divmod(self.data_pos, len(self.data))
            if i == 0 and epoch > 0 and len(self.data_order) == len(self.data):
                self.data_order = self._permutation(epoch)
            out.append(self.data[self.data_order[i]])
            self.data_pos += 1
        return out

    # ---- rollout ------------------------------------------------------------------------------

    def _sampler(self):
        cfg = self.cfg.sampling()
        if self.model.config.block_causal:
            return BlockSampler(self.model, cfg, max_new_tokens=self.cfg.max_new_tokens,
                                eos_token_id=self.tok.eos_token_id)
        return FullSampler(self.model, cfg, gen_length=self.cfg.max_new_tokens,
                           block_length=min(self.cfg.gen_block_length, self.cfg.max_new_tokens),
                           eos_token_id=self.tok.eos_token_id)

    def rollout(self, rows: list[dict], indices: list[int] | None = None):
        """Samples group_size completions per row with the live weights; returns trajectories
        and summed rewards [len(rows) * group_size]. `indices` are the rows' positions among the
        step's prompts (over all ranks): a sample always draws from the same seed, whichever
        rank samples it."""
        self.model.eval()
        g = self.cfg.group_size
        prompts = [self.prompt_format.encode(r, self.tok) for r in rows]
        base = (self.cfg.seed * 7919 + self.step) * 1000003
        indices = list(range(len(rows))) if indices is None else indices
        seeds = [base + i * g + k for i in indices for k in range(g)]
        self.last_reward_time = 0.0
        with distributed.gathered(self.model):  # collective: ranks without prompts join too
            if not rows:
                return [], torch.zeros(0, device=HOST)
            trajs = self._sampler().generate(prompts, n_samples=g, seeds=seeds)
        completions = [t.text(self.tok) for t in trajs]
        expanded = [r for r in rows for _ in range(g)]
        keys = dict.fromkeys(k for r in rows for k in r if k != "prompt")
        columns = {k: [r.get(k) for r in expanded] for k in keys}
        prompt_text = [r["prompt"] for r in expanded]
        t0 = time.perf_counter()
        rewards = torch.zeros(len(trajs), device=HOST)  # rewards, advantages: host-side
        for fn in self.reward_fns:  # each checked: n finite floats (else a ValueError naming it)
            rewards += torch.tensor(self._reward_spec(fn)(prompt_text, completions, columns),
                                    dtype=torch.float32, device=HOST)
        self.last_reward_time = time.perf_counter() - t0
        return trajs, rewards

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Per-sample advantages (group z-score); subclasses change the formula."""
        return group_zscore(rewards, self.cfg.group_size)

    def keep(self, rewards: torch.Tensor) -> torch.Tensor:
        """Bool per group: which groups are trained."""
        if self.cfg.dynamic_sampling:
            return keep_groups(rewards, self.cfg.group_size, 0.0, 1.0, strict=True)
        return keep_groups(rewards, self.cfg.group_size, self.cfg.pass_rate_low,
                           self.cfg.pass_rate_high)

    # ---- training -----------------------------------------------------------------------------

    def _rows(self, trajs, positions: list[int] | None = None):
        """Training rows of these trajectories. Baseline estimators draw each trajectory's masks
        from a generator seeded by (seed, step, its position in the step's global order), so the
        rows do not depend on mini-batching or on the number of ranks."""
        c = self.model.config
        if self.cfg.estimator != "trace":
            positions = range(len(trajs)) if positions is None else positions
            base = (self.cfg.seed * 31 + self.step) * 1000003
            gens = [torch.Generator().manual_seed(base + pos + 1) for pos in positions]
            return baseline_rows(self.cfg.estimator, trajs, c.mask_token_id, gens,
                                 c.block_size if c.block_causal else None)
        if c.block_causal:
            return block_rows(trajs, c.block_size, c.mask_token_id, self.cfg.shrinkage)
        return full_rows(trajs, c.mask_token_id, self.cfg.shrinkage)

    def _logp(self, model, rows):
        dev = self.device
        return model(rows.input_ids.to(dev), rows.layout.to(dev), rows=rows.train_rows.to(dev),
                     targets=rows.targets.to(dev))

    def _global_scale(self, n_local: int, what: str) -> float:
        """Factor that turns a rank-local mean into its share of the global mean (FSDP averages
        gradients over ranks): local count / global count * world size."""
        if not self.distributed:
            return 1.0
        n_global = distributed.all_sum(n_local)
        if self.cfg.reduction == "sum" and what == "policy":
            return float(distributed.world())
        return n_local / max(n_global, 1.0) * distributed.world()

    def _minibatches(self, positions: list[int], n_global: int) -> list[list[int]]:
        """num_minibatches chunks of the global trajectory order (contiguous, as equal as
        possible); for each, the local indices whose global position falls in it. Chunking by
        global position makes the steps independent of how trajectories are spread over ranks."""
        m = self.cfg.num_minibatches
        bounds = [round(k * n_global / m) for k in range(m + 1)]
        return [[i for i, pos in enumerate(positions) if bounds[k] <= pos < bounds[k + 1]]
                for k in range(m)]

    def update(self, trajs, sample_adv: torch.Tensor, rewards: torch.Tensor,
               weight: float = 1.0, positions: list[int] | None = None,
               n_global: int | None = None) -> dict:
        """Policy (and value) updates on these trajectories: ppo_epochs passes, each one optimizer
        step per mini-batch (num_minibatches chunks of the trajectories). old_logp (and the
        reference log-probs, and the value targets) are computed once, before the first step, so
        from the second step on the ratio moves off 1 and the clip / KL terms act. Returns the
        last step's stats plus means over steps. `positions` / `n_global`: the trajectories'
        places in the step's global order (default: this list is everything). `weight` 0 lets a
        rank without kept groups take part in the collectives of a distributed step."""
        if positions is None:
            positions, n_global = list(range(len(trajs))), len(trajs)
        if weight == 0:
            positions = [-1] * len(trajs)  # in no chunk: only stand-in steps below
        prepared = []
        for idx in self._minibatches(positions, n_global):
            if distributed.all_sum(len(idx)) == 0:
                continue  # no trajectory on any rank: no step anywhere (ranks agree)
            w = weight if idx else 0.0
            idx = idx or [0]  # none here: join the other ranks' step with zero weight
            prepared.append(self._prepare([trajs[i] for i in idx], sample_adv[idx],
                                          rewards[idx], [positions[i] for i in idx], w))
        if not self.distributed and all(p is None for p in prepared):
            return {"skipped": "no trained tokens"}
        steps = []  # (weight, stats)
        for _ in range(self.cfg.ppo_epochs):
            for p in prepared:
                if p is not None:
                    steps.append((p["weight"], self._step(p)))
        real = [st for w, st in steps if w > 0] or [st for _, st in steps]
        if not real:
            return {"skipped": "no trained tokens"}
        stats = dict(real[-1])
        for key in ("clip_frac", "kl", "approx_kl", "ratio_max"):
            if key in stats:
                stats[key + "_mean"] = sum(st[key] for st in real) / len(real)
        mine = [p for p in prepared if p is not None and p["weight"] > 0]
        stats.update(train_tokens=sum(p["n_tokens"] for p in mine),
                     row_tokens=sum(p["row_tokens"] for p in mine),
                     optimizer_steps=len(steps))
        return stats

    def _micro_groups(self, trajs, positions: list[int]) -> list[list[int] | None]:
        """Consecutive groups of these trajectories whose packed rows fit micro_batch_tokens (a
        trajectory over the budget is a group of its own); one group when there is no budget.
        Every rank runs as many groups as the rank with the most (FSDP forwards and backwards
        are collectives): the missing ones are zero-weight repeats."""
        budget = self.cfg.micro_batch_tokens
        groups = [list(range(len(trajs)))]
        if budget > 0 and len(trajs) > 1:
            groups, size = [[]], 0
            for i, (t, pos) in enumerate(zip(trajs, positions, strict=True)):
                n = self._rows([t], [pos]).num_tokens
                if groups[-1] and size + n > budget:
                    groups.append([])
                    size = 0
                groups[-1].append(i)
                size += n
        if self.distributed and budget > 0:
            most = max(distributed.all_gather(len(groups)))
            groups += [None] * (most - len(groups))  # stand-ins, filled in by _prepare
        return groups

    def _prepare(self, trajs, sample_adv, rewards, positions: list[int], weight: float):
        """Rows, old / reference log-probs and advantages of one mini-batch (no gradients),
        split into micro-batches (see micro_batch_tokens)."""
        micro = []
        for group in self._micro_groups(trajs, positions):
            w = weight if group is not None else 0.0
            group = group if group is not None else micro[-1]["group"]
            m = self._prepare_micro([trajs[i] for i in group], sample_adv[group],
                                    rewards[group], [positions[i] for i in group])
            micro.append(dict(m, group=group, w=w))
        n_tokens = sum(m["n_tokens"] for m in micro if m["w"] > 0 or weight == 0)
        if n_tokens == 0 and not self.distributed:
            return None
        return {"micro": micro, "weight": weight, "n_tokens": n_tokens,
                "row_tokens": sum(m["rows"].num_tokens for m in micro if m["w"] > 0),
                "n_seq_trained": sum(m["n_seq_trained"] for m in micro if m["w"] > 0)}

    def _prepare_micro(self, trajs, sample_adv, rewards, positions: list[int]) -> dict:
        dev = self.device
        rows = self._rows(trajs, positions).to(dev)  # once: every epoch's forwards reuse it
        traj_idx = rows.traj
        with torch.no_grad():
            self.model.eval()
            old_logp = self._logp(self.model, rows)
            ref_logp = None
            if self.cfg.kl_coef > 0:
                ref_logp = self._logp(self.ref_model, rows) if self.ref_model else old_logp
        prep = {"rows": rows, "traj_idx": traj_idx, "old_logp": old_logp, "ref_logp": ref_logp,
                "adv": sample_adv.to(dev)[traj_idx], "n_seq": len(trajs),
                "n_tokens": int(old_logp.numel()),
                # seq_mean averages over the sequences that have trained tokens: count those
                "n_seq_trained": int(traj_idx.unique().numel())}
        if self.value_model is not None:
            prep.update(self._value_targets(rows, rewards, traj_idx))
            prep["adv"] = prep["gae_adv"]
        return prep

    def _shares(self, p, key: str) -> list[float]:
        """Each micro-batch's share of the mini-batch's mean (by `key` counts; 0 for stand-ins),
        so that the accumulated gradient is the gradient of the whole mini-batch's loss."""
        total = max(sum(m[key] for m in p["micro"] if m["w"] > 0), 1)
        if len(p["micro"]) == 1:
            return [1.0]
        return [m[key] / total if m["w"] > 0 else 0.0 for m in p["micro"]]

    def _step(self, p) -> dict:
        """One optimizer step of the policy (and value model) on a prepared mini-batch."""
        stats = {}
        if self.value_model is not None:
            stats.update(self._value_step(p))
        self.model.train()
        seq = self.cfg.reduction == "seq_mean"
        n_local = p["n_seq_trained"] if seq else p["n_tokens"]
        weight = p["weight"]
        scale = self._global_scale(n_local * (weight > 0), "policy") * weight
        if self.cfg.reduction == "sum":  # sums add up: every real micro-batch counts fully
            shares = [1.0 if m["w"] > 0 or len(p["micro"]) == 1 else 0.0 for m in p["micro"]]
        else:
            shares = self._shares(p, "n_seq_trained" if seq else "n_tokens")
        self.opt.zero_grad(set_to_none=True)
        parts = []
        for m, share in zip(p["micro"], shares, strict=True):
            logp = self._logp(self.model, m["rows"])
            mask = torch.ones_like(logp, dtype=torch.bool)
            loss, pstats = policy_value_loss(
                logp, m["old_logp"], m["adv"], mask, ref_logp=m["ref_logp"],
                eps_low=self.cfg.eps_low, eps_high=self.cfg.eps_high,
                dual_clip=self.cfg.dual_clip or None, kl_coef=self.cfg.kl_coef,
                reduction=self.cfg.reduction, seq_ids=m["traj_idx"], num_seqs=m["n_seq"],
                normalizer=self.cfg.loss_normalizer)
            # a single micro-batch keeps the expression (and its rounding) of an unsplit step
            (loss * scale if len(shares) == 1 else loss * (scale * share)).backward()
            if len(shares) > 1:
                self.opt.stash_grads()  # bf16 gradients summed in fp32
            if m["w"] > 0 or weight == 0 or len(shares) == 1:  # stand-in ranks keep theirs
                parts.append((share, loss.detach(), pstats))
        self.opt.unstash_grads()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        # to host once, after every pass is queued (no sync between micro-batches), and before
        # the optimizer step: a non-finite loss or gradient norm never reaches the weights
        parts = [(share, float(loss), {k: float(v) for k, v in st.items()})
                 for share, loss, st in parts]
        stats.update(_combine_stats(parts))
        stats["grad_norm"] = float(gnorm)
        if nonfinite_guard(self, self.opt, "policy",
                           {"loss": stats["loss"], "grad_norm": stats["grad_norm"]}, agree=True):
            self.opt.step()
        return stats

    def _value_targets(self, rows, rewards, traj_idx) -> dict:
        """Values of the rollout-time value model at each trained token's noisy position, and
        GAE advantages / returns over trace steps (no gradients)."""
        dev = self.device
        vm = self.value_model
        ids, lay = rows.input_ids.to(dev), rows.layout.to(dev)
        sel = rows.train_rows.to(dev)
        with torch.no_grad():
            vm.eval()
            old_v = vm(ids, lay)[sel]
        adv = torch.zeros_like(old_v)
        ret = torch.zeros_like(old_v)
        for t in traj_idx.unique().tolist():
            m = traj_idx == t
            a, r = trace_gae(rows.step.to(dev)[m], old_v[m], float(rewards[t]), self.cfg.gamma,
                             self.cfg.lam)
            adv[m], ret[m] = a, r
        return {"old_v": old_v, "returns": ret, "gae_adv": adv.detach()}

    def _value_step(self, p) -> dict:
        """One clipped value-loss step of the value model on a prepared mini-batch."""
        dev = self.device
        vm = self.value_model
        vm.train()
        weight = p["weight"]
        scale = self._global_scale(p["n_tokens"] * (weight > 0), "value") * weight
        self.value_opt.zero_grad(set_to_none=True)
        parts = []
        for m, share in zip(p["micro"], self._shares(p, "n_tokens"), strict=True):
            rows = m["rows"]
            v = vm(rows.input_ids.to(dev), rows.layout.to(dev))[rows.train_rows.to(dev)]
            zeros = torch.zeros_like(v)
            vloss, vstats = policy_value_loss(zeros, zeros, zeros,
                                              torch.ones_like(v, dtype=torch.bool), values=v,
                                              old_values=m["old_v"], returns=m["returns"],
                                              vf_coef=1.0, vf_clip=self.cfg.vf_clip)
            (vloss * scale if len(p["micro"]) == 1 else vloss * (scale * share)).backward()
            if len(p["micro"]) > 1:
                self.value_opt.stash_grads()
            if m["w"] > 0 or weight == 0 or len(p["micro"]) == 1:
                parts.append((share, vloss.detach(), vstats["vf_clip_frac"], m["old_v"].sum(),
                              m["old_v"].numel()))
        self.value_opt.unstash_grads()
        vnorm = torch.nn.utils.clip_grad_norm_(vm.parameters(), self.cfg.max_grad_norm)
        parts = [(share, float(loss), float(clip), float(vsum), n)
                 for share, loss, clip, vsum, n in parts]  # to host once, after the passes
        n = max(sum(x[4] for x in parts), 1)
        out = {"value_loss": sum(s * loss for s, loss, *_ in parts),
               "vf_clip_frac": sum(x[2] * x[4] for x in parts) / n,
               "value_mean": sum(x[3] for x in parts) / n, "value_grad_norm": float(vnorm)}
        if nonfinite_guard(self, self.value_opt, "value",
                           {"value_loss": out["value_loss"],
                            "value_grad_norm": out["value_grad_norm"]}, agree=True):
            self.value_opt.step()
        return out

    def train_step(self) -> dict:
        """One step. With several ranks, every rank draws the same global prompts and samples
        its share (prompts rank, rank + world, ...); groups stay whole on one rank, so the
        advantages are the single-process ones; kept-group counts are summed across ranks so the
        dynamic-sampling loop and the skip decision agree everywhere."""
        t0 = time.perf_counter()
        g, rank, world = self.cfg.group_size, distributed.rank(), distributed.world()
        kept_trajs, kept_rewards, kept_adv, all_rewards, last = [], [], [], [], None
        kept_prompts = []  # global prompt index of each kept group (order of kept_trajs)
        rounds = 1 + (self.cfg.max_oversample_rounds if self.cfg.dynamic_sampling else 0)
        t_sample = t_reward = 0.0
        global_kept, drawn = 0, 0
        for _ in range(rounds):
            needed = self.cfg.prompts_per_step - global_kept  # exactly what 1 process draws
            rows = self._next_rows(needed)
            mine = list(range(rank, needed, world))
            ts = time.perf_counter()
            try:
                trajs, rewards = self.rollout([rows[i] for i in mine], [drawn + i for i in mine])
                bad = None
            except NonFiniteReward as e:  # "stop": the reward's ValueError, as it is
                if self.cfg.on_nonfinite == "stop":
                    raise
                bad, trajs, rewards = str(e), [], torch.zeros(0, device=HOST)
            if self.cfg.on_nonfinite == "skip" and self.distributed and \
                    distributed.all_sum(float(bad is not None)) > 0 and bad is None:
                bad = "a reward returned non-finite values on another rank"
            if bad is not None:
                return self._skip_nonfinite_step(bad)
            round_base = drawn
            drawn += needed
            t_reward += self.last_reward_time
            t_sample += time.perf_counter() - ts - self.last_reward_time
            all_rewards.append(rewards)
            if not trajs:  # no prompt on this rank this round
                global_kept = int(distributed.all_sum(len(kept_trajs) // g))
                if global_kept >= self.cfg.prompts_per_step:
                    break
                continue
            adv = self.advantages(rewards)
            keep = self.keep(rewards)
            last = (trajs, adv, rewards)
            for gi in keep.nonzero().flatten().tolist():
                kept_prompts.append(round_base + mine[gi])
                kept_trajs += trajs[gi * g:(gi + 1) * g]
                kept_rewards.append(rewards[gi * g:(gi + 1) * g])
                kept_adv.append(adv[gi * g:(gi + 1) * g])
            global_kept = int(distributed.all_sum(len(kept_trajs) // g))
            if global_kept >= self.cfg.prompts_per_step:
                break
        rewards = torch.cat(all_rewards)
        n_all = distributed.all_sum(rewards.numel())
        mean = distributed.all_sum(float(rewards.sum())) / n_all
        sq = distributed.all_sum(float((rewards - mean).pow(2).sum()))
        log = {"step": self.step, "reward_mean": mean,
               "reward_std": math.sqrt(sq / (n_all - 1)) if n_all > 1 else 0.0,
               "accuracy": distributed.all_sum(float((rewards >= 1).sum())) / n_all,
               "kept_groups": global_kept, "sampled_groups": int(n_all) // g, "gen_tokens": None}
        ttrain = time.perf_counter()
        # every kept trajectory's place in the global (prompt-index) order: mini-batches are cut
        # from that order, so they do not depend on the number of ranks
        order = sorted(p for ranks in distributed.all_gather(kept_prompts) for p in ranks)
        where = {p: i for i, p in enumerate(order)}
        positions = [where[p] * g + k for p in kept_prompts for k in range(g)]
        if global_kept == 0:
            log["skipped"] = "all groups filtered (no reward variance in range); no update"
            self.logger.warn(f"step {self.step}: {log['skipped']}")
        elif kept_trajs:
            log.update(self.update(kept_trajs, torch.cat(kept_adv), torch.cat(kept_rewards),
                                   positions=positions, n_global=len(order) * g))
            if "skipped" in log:
                self.logger.warn(f"step {self.step}: {log['skipped']} (empty completions); "
                                 "no update")
            log["gen_tokens"] = int(distributed.all_sum(sum(len(t.token_ids)
                                                            for t in kept_trajs)))
        else:  # this rank kept nothing: join the collectives with zero weight
            if last is None:  # it sampled nothing either: a stand-in trajectory
                stand_in = Trajectory(prompt_ids=[0], token_ids=[0], step_map=[0], logprobs=[0.0])
                last = ([stand_in], torch.zeros(1, device=HOST), torch.zeros(1, device=HOST))
            self.update(last[0], torch.zeros_like(last[1]), last[2], weight=0.0,
                        n_global=len(order) * g)
            distributed.all_sum(0)
        log.update(time_sample=t_sample, time_reward=t_reward,
                   time_train=time.perf_counter() - ttrain, time_step=time.perf_counter() - t0,
                   nonfinite_skipped=self.nonfinite_skipped)
        if self.eval_fn is not None and self.cfg.eval_every and \
                (self.step + 1) % self.cfg.eval_every == 0:
            with distributed.gathered(self.model):  # full weights, as for sampling
                log["eval_accuracy"] = float(self.eval_fn(self.model))
        if self.step % self.cfg.log_every == 0 or "eval_accuracy" in log:
            self.logger.log(log)
        self.step += 1
        return log

    def _skip_nonfinite_step(self, reason: str) -> dict:
        """on_nonfinite: skip, a reward returned NaN / inf: the step trains nothing (logged)."""
        self.nonfinite_skipped += 1
        log = {"step": self.step, "skipped": f"{reason}; no update",
               "nonfinite_skipped": self.nonfinite_skipped}
        self.logger.warn(f"step {self.step}: {reason}; no update (on_nonfinite: skip, "
                         f"{self.nonfinite_skipped} skipped so far)")
        self.logger.log(log)
        self.step += 1
        return log

    def train(self):
        """Runs until config.total_steps, saving every save_every steps and at the end."""
        from dlmkern.trainers.logging import progress

        bar = progress(range(self.step, self.cfg.total_steps), self.cfg.progress_bar, self.name)
        for _ in bar:
            log = self.train_step()
            if hasattr(bar, "set_postfix") and "reward_mean" in log:
                bar.set_postfix(reward=f"{log['reward_mean']:.3f}")
            if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                self.save(os.path.join(self.cfg.output_dir, f"checkpoint-{self.step}"))
        self.save(os.path.join(self.cfg.output_dir, "final"))
        self.logger.plot(("reward_mean", "accuracy", "eval_accuracy"), title=self.name,
                         marks=self.plot_marks)
        self.logger.close()
        return self

    # ---- checkpoints (save / resume: trainers.checkpoint) -------------------------------------

    def _progress(self) -> dict:
        return {"step": self.step, "data_pos": self.data_pos, "data_order": self.data_order,
                "nonfinite_skipped": self.nonfinite_skipped}

    def _set_progress(self, meta: dict) -> None:
        self.step, self.data_pos, self.data_order = (meta["step"], meta["data_pos"],
                                                     meta["data_order"])
        self.nonfinite_skipped = meta.get("nonfinite_skipped", 0)


class TraceRL(RLTrainer):
    """TraceRL (SPEC 4.3): trajectory-aware rows, shrinkage, optional value model with GAE over
    trace steps, clipped surrogate, k3 KL to the rollout policy. Defaults as in the paper's code:
    groups with pass rate in [0.2, 0.8]."""

    name = "tracerl"

    def __init__(self, model, tokenizer, dataset, reward_fns, config: RLConfig | None = None,
                 value_model=None, resume_from: str | None = None):
        cfg = config or RLConfig(pass_rate_low=0.2, pass_rate_high=0.8)
        super().__init__(model, tokenizer, dataset, reward_fns, cfg, value_model, resume_from)


class DiPO(RLTrainer):
    """DiPO (SPEC 4.4): A = (r - mean) / (std + eps) per group, clip-higher [0.8, 1.28], k3 KL to
    a frozen reference loaded only when kl_coef > 0, token-mean (DAPO) or per-sequence (GRPO)
    normalisation, DAPO dynamic sampling with oversampling."""

    name = "dipo"

    def __init__(self, model, tokenizer, dataset, reward_fns, config: RLConfig | None = None,
                 resume_from: str | None = None):
        cfg = config or RLConfig(eps_high=0.28, kl_to="ref", dynamic_sampling=True)
        super().__init__(model, tokenizer, dataset, reward_fns, cfg, resume_from=resume_from)


_TOKEN_MEANS = ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean",
                "vf_clip_frac", "dual_clip_frac")


def _combine_stats(parts) -> dict:
    """Mini-batch statistics from its micro-batches' (share, loss, stats): the loss terms by
    their share of the reduction, token fractions by token counts, the max ratio by max."""
    if len(parts) == 1:
        _, loss, st = parts[0]
        return dict(st, loss=loss)
    tokens = max(sum(st["num_tokens"] for _, _, st in parts), 1.0)
    out = {"loss": sum(share * loss for share, loss, _ in parts)}
    for key in parts[0][2]:
        vals = [(share, st[key], st["num_tokens"]) for share, _, st in parts]
        if key == "ratio_max":
            out[key] = max(v for _, v, _ in vals)
        elif key == "num_tokens":
            out[key] = sum(v for _, v, _ in vals)
        elif key in _TOKEN_MEANS:
            out[key] = sum(v * n for _, v, n in vals) / tokens
        else:  # pg_loss, kl, vf_loss: reduced like the loss
            out[key] = sum(share * v for share, v, _ in vals)
    return out
