"""The RL loop (SPEC 4.6 / 4.7), one stage per owner: rollout (sample + reward -> RolloutBatch,
trainers.rollout) -> group filter and advantages (computed once: group z-scores, or GAE over trace
steps with a value model) -> rows (one estimator per algorithm, dlmkern.rl.estimators) -> step
plan (trainers.plan) -> update (trainers.update). Optimizer state persists across steps;
checkpoints hold model, value model, optimizer, RNG, step and data position, written atomically,
and resume exactly (trainers.checkpoint)."""

from __future__ import annotations

import copy
import time
from typing import ClassVar

import torch

from dlmkern import distributed
from dlmkern._host import HOST, on_host, planning, read
from dlmkern.data import PromptFormat, load_dataset
from dlmkern.data.checks import check_vocabulary
from dlmkern.evaluate import HeldOut, eval_due
from dlmkern.models import DiffusionLM, ValueModel
from dlmkern.models.io import load_config, load_for_run, run_target
from dlmkern.models.lora import apply_lora, has_adapters, shared_trunk
from dlmkern.ops.objective import Objective
from dlmkern.rewards.registry import get_rewards
from dlmkern.rl import RowSpec
from dlmkern.rl.estimators import from_config as estimator_from_config
from dlmkern.sampling.block import Trajectory
from dlmkern.trainers.checkpoint import Checkpointing
from dlmkern.trainers.checks import (
    check_output_dir,
    check_reward_columns,
    nonfinite_guard,
    prepare_output_dir,
)
from dlmkern.trainers.config import build_config, to_dict
from dlmkern.trainers.logging import RunLogger
from dlmkern.trainers.optim import MixedPrecisionAdamW, trained
from dlmkern.trainers.plan import plan_step, planned_trajectories
from dlmkern.trainers.presets import DiPOConfig, TraceRLConfig
from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rollout import Rollout, RolloutBatch, collect, reward_stats
from dlmkern.trainers.update import Update, UpdateModels, UpdateSettings


class RLTrainer(Checkpointing):
    """The RL trainer of every algorithm; the config (a preset of dlmkern.trainers.rl_config)
    is the algorithm. ``model``: a DiffusionLM or a checkpoint path; ``tokenizer``: encode /
    decode / eos_token_id; ``dataset``: rows with "prompt" or "messages" (+ reward columns), or a
    dataset file / directory (dlmkern.data.load_dataset, with config.columns), rendered by the
    config's prompt format; ``reward_fns``: callables ``f(prompts, completions, **columns) ->
    list[float]`` (summed), each receiving the dataset columns its signature names (checked when
    the trainer is built), or their names (``"math"``, ``"exact"``, ``"file.py:function"``: the
    names of dlmkern.rewards.get_reward); ``config``: an instance of ``config_class`` (or a
    subclass), a dict of overrides of it, or None for its defaults. Before any model work the
    trainer applies the ``existing_output_dir`` policy. ``resume_from``: a checkpoint directory
    to start from. ``eval_dataset``: held-out rows (or a file, as ``dataset``) scored with the
    rewards every ``eval_every`` steps (dlmkern.evaluate: the code of `dlmkern eval`), logged as
    eval_accuracy. A ``model`` path loads onto ``device`` in ``dtype`` (defaults: this rank's
    device, bfloat16 on CUDA, float32 on CPU; models.io.run_target); a module is used as it
    is."""

    config_class: ClassVar[type[RLConfig]] = RLConfig

    def __init__(self, model, tokenizer, dataset, reward_fns, config=None,
                 value_model: ValueModel | None = None, resume_from: str | None = None,
                 device=None, dtype=None, eval_dataset=None):
        self.cfg = self._config(config).validate(value_model=value_model is not None)
        self.objective = Objective.from_config(self.cfg)  # the policy loss, built once
        target = run_target(model, device, dtype)  # refused before any work
        self.name = self.cfg.algo
        torch.manual_seed(self.cfg.seed)
        self.distributed = distributed.init()
        # mistakes refused before any model work: rewards that cannot be called, columns they
        # need that the dataset lacks, rows the prompt format cannot render, a previous run
        self.data = load_dataset(dataset, self.cfg.columns)
        self.prompt_format = PromptFormat.from_config(self.cfg)
        self.prompt_format.check(self.data, tokenizer)
        self.rollout_stage = Rollout(self.cfg, tokenizer, self.prompt_format,
                                     get_rewards(reward_fns))
        check_reward_columns(self.data, [self.rollout_stage.spec(f) for f in self.reward_fns])
        # eval_fn(model) -> float every eval_every steps (all ranks); set it to evaluate your way
        self.eval_fn = None if eval_dataset is None else HeldOut.for_rl(
            load_dataset(eval_dataset, self.cfg.columns), tokenizer, self.reward_fns, self.cfg,
            self.prompt_format)
        # a previous run refused, then the model kind read from its config.json, before
        # output_dir is touched (overwrite) and the weights load
        check_output_dir(self.cfg.output_dir, self.cfg.existing_output_dir, resume_from)
        model_config = model.config if isinstance(model, DiffusionLM) else load_config(model)
        self.cfg.check_model(model_config)
        check_vocabulary(tokenizer, model_config)  # ids beyond it: an IndexError in step 0
        start_from = prepare_output_dir(self.cfg.output_dir, self.cfg.existing_output_dir,
                                        writer=distributed.rank() == 0, resume_from=resume_from)
        self.tok = tokenizer
        self._models(load_for_run(model, target), value_model)
        self.estimator = estimator_from_config(self.cfg)
        c = self.model.config
        self.row_spec = RowSpec(c.mask_token_id, c.block_size if c.block_causal else None,
                                self.cfg.resolved_shrinkage(c.block_causal))
        self.plot_marks: dict = {}  # {log key: (value, label)}: reference lines in curves.png
        self.step, self.data_pos, self.nonfinite_skipped = 0, 0, 0
        self.data_order = self._permutation(0)
        self.logger = RunLogger(self.cfg.output_dir, to_dict(self.cfg),
                                enabled=distributed.rank() == 0)
        if self.objective.path_note():  # settings the fused loss kernel lacks: said once
            self.logger.warn(self.objective.path_note())
        if start_from is not None:  # resume_from, or existing_output_dir: resume
            self.resume(start_from)
            self.logger.warn(f"resumed from {start_from} (step {self.step})")

    @classmethod
    def _config(cls, config) -> RLConfig:
        want = cls.config_class
        if config is None:
            return want()
        if isinstance(config, dict):  # validated once, by __init__ (knowing the value model)
            return build_config(want, config, validate=False)
        if not isinstance(config, want):
            raise TypeError(
                f"{cls.__name__} takes a {want.__name__} (its defaults are the algorithm), got "
                f"{type(config).__name__}: write {want.__name__}(...) with the fields you "
                "change, pass them as a dict, or use RLTrainer for any RLConfig")
        return config

    def _models(self, model: DiffusionLM, value_model: ValueModel | None) -> None:
        cfg, lora = self.cfg, self.cfg.lora
        self.model = distributed.to_local_device(model)
        self.device = next(self.model.parameters()).device
        if lora.enabled:  # adapters on the policy, its base frozen (models.lora)
            apply_lora(self.model, lora)
        self.value_model = self._value_model(value_model)
        # the frozen reference policy exists only when a KL to it is asked for; with LoRA it is
        # the policy with its adapters disabled (Update), no copy
        self.ref_model = None
        if cfg.kl_coef > 0 and cfg.kl_to == "ref" and not lora.enabled:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        if self.value_model is not None:
            self.value_model.trunk.gradient_checkpointing = cfg.gradient_checkpointing
        if self.distributed:  # FSDP2 before the optimizers see the parameters
            for m in (self.model, self.value_model, self.ref_model):
                if m is not None:
                    distributed.shard(m)
        self.make_optimizers()

    def _value_model(self, value_model: ValueModel | None) -> ValueModel | None:
        """The value model: the one given, or (use_value_model) one built from the policy: with
        lora.value, a trunk sharing the policy's frozen base weights with a LoRA of its own (and
        its head); else a copy of the base weights. A given one gets its own LoRA too."""
        cfg, lora = self.cfg, self.cfg.lora
        if value_model is None and cfg.use_value_model:
            if lora.enabled and lora.value:
                value_model = ValueModel.around(shared_trunk(self.model))
            else:
                value_model = ValueModel.from_policy(self.model)
            fresh = True
        else:
            fresh = False
        if value_model is None:
            return None
        distributed.to_local_device(value_model)
        if lora.enabled and lora.value and (fresh or not has_adapters(value_model.trunk)):
            apply_lora(value_model.trunk, lora)
        return value_model

    def make_optimizers(self) -> None:
        """The policy's (and value model's) optimizer, fresh, as the config sets them (also
        dlmkern.plan's, when it tries optimizer_offload)."""
        cfg = self.cfg
        self.opt = MixedPrecisionAdamW(trained(self.model), lr=cfg.lr,
                                       weight_decay=cfg.weight_decay,
                                       offload=cfg.optimizer_offload,
                                       offload_grad_sums=cfg.offload_grad_sums)
        self.value_opt = None if self.value_model is None else MixedPrecisionAdamW(
            trained(self.value_model), lr=cfg.value_lr, weight_decay=cfg.weight_decay,
            offload=cfg.optimizer_offload, offload_grad_sums=cfg.offload_grad_sums)
        self.updater = self._update_stage()  # it trains with these optimizers

    def _update_stage(self) -> Update:
        """The update stage, given the models, optimizers, objective and settings it uses (and
        the trainer's non-finite policy), never the trainer."""
        cfg, c = self.cfg, self.model.config
        models = UpdateModels(self.model, self.opt, self.ref_model, self.value_model,
                              self.value_opt, ref_is_base=self.cfg.lora.enabled and
                              self.cfg.kl_to == "ref")
        settings = UpdateSettings(gamma=cfg.gamma, lam=cfg.lam, vf_clip=cfg.vf_clip,
                                  max_grad_norm=cfg.max_grad_norm,
                                  block_size=c.block_size if c.block_causal else None,
                                  gen_block_length=cfg.gen_block_length)
        return Update(models, self.objective, settings, self.device, self._nonfinite_ok)

    def _nonfinite_ok(self, opt, what: str, values: dict) -> bool:
        """The update's guard: apply an optimizer step? (on_nonfinite; ranks agree)."""
        return nonfinite_guard(self, opt, what, values, agree=True)

    @property
    def reward_fns(self) -> list:
        return self.rollout_stage.reward_fns

    @reward_fns.setter
    def reward_fns(self, fns) -> None:
        self.rollout_stage.reward_fns = list(fns)

    # ---- data ---------------------------------------------------------------------------------

    @on_host
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

    # ---- stages -------------------------------------------------------------------------------

    def rollout(self, rows: list[dict], indices: list[int] | None = None) -> RolloutBatch:
        """group_size completions per row with the live weights, and their summed rewards."""
        indices = list(range(len(rows))) if indices is None else indices
        return self.rollout_stage(self.model, rows, indices, self.step,
                                  with_advantages=self.value_model is None)

    def rows(self, trajs, positions=None, per_copy: bool = False) -> list:
        """Each trajectory's training rows (built once: every pass and epoch reuses them). Random
        estimators draw a trajectory's masks from a generator seeded by (seed, step, its place
        in the step's global order): rows do not depend on batching or the number of ranks.
        `per_copy`: each trajectory's list of one Rows per noisy copy (split_copies)."""
        positions = range(len(trajs)) if positions is None else positions
        est, spec = self.estimator, self.row_spec
        build = est.copy_rows if per_copy else est.rows
        if not est.random:
            return [build(t, spec) for t in trajs]
        base = (self.cfg.seed * 31 + self.step) * 1000003
        return [build(t, spec, torch.Generator().manual_seed(base + pos + 1))
                for t, pos in zip(trajs, positions, strict=True)]

    def _copy_items(self, trajs, positions, sample_adv, rewards):
        """split_copies (or an estimator whose copies are the loss's sequences, d-TreeRPO's
        segments): every noisy copy becomes an item of its own (its trajectory's position,
        advantage and reward), so micro-batches may cut between a trajectory's copies. With
        seq_mean and as many copies per trajectory, the mean over items is the mean over
        trajectories of the mean over their copies: the unsplit loss of a copy ratio."""
        per = self.rows(trajs, positions, per_copy=True)
        idx = [i for i, rs in enumerate(per) for _ in rs]
        items = [r for rs in per for r in rs]
        adv = None if sample_adv is None else sample_adv[idx]
        return items, [trajs[i] for i in idx], [positions[i] for i in idx], adv, rewards[idx]

    def update(self, trajs, sample_adv: torch.Tensor | None, rewards: torch.Tensor,
               weight: float = 1.0, positions: list[int] | None = None,
               n_global: int | None = None) -> dict:
        """ppo_epochs passes over these trajectories, one optimizer step per mini-batch. old_logp
        (and reference log-probs, values and GAE targets) are fixed before the first step, so
        later steps see ratio != 1. `sample_adv`: per-trajectory advantages (unused with a value
        model: GAE gives per-token ones). `positions` / `n_global`: places in the step's global
        order; `weight` 0: this rank only joins the collectives. Returns the last step's stats
        plus means over steps."""
        if positions is None:
            positions, n_global = list(range(len(trajs))), len(trajs)
        cfg = self.cfg
        if planning() is not None:  # dlmkern.plan: the first passes stand for the rest
            keep = planned_trajectories(positions, n_global, self.rows(trajs[:1]).pop(), cfg,
                                        planning().passes)
            trajs, positions = [trajs[i] for i in keep], [positions[i] for i in keep]
            sample_adv = None if sample_adv is None else sample_adv[keep]
            rewards = rewards[keep]
        if self.estimator.copies_are_items or (cfg.split_copies and cfg.micro_batch_tokens > 0):
            rows, trajs, positions, sample_adv, rewards = self._copy_items(
                trajs, positions, sample_adv, rewards)
        else:
            rows = self.rows(trajs, positions)
        plan = plan_step(positions, n_global, rows, cfg.reduction, cfg.num_minibatches,
                         cfg.micro_batch_tokens, weight)
        prepared = [self.updater.prepare(mb, rows, trajs, sample_adv, rewards,
                                         self.estimator.trace_steps) for mb in plan]
        steps = [(mb.weight, self.updater.step(mb, prep))
                 for _ in range(cfg.ppo_epochs) for mb, prep in zip(plan, prepared, strict=True)]
        real = [st for w, st in steps if w > 0] or [st for _, st in steps]
        if not real:
            return {"skipped": "no trained tokens"}
        stats = dict(real[-1])
        for key in ("clip_frac", "kl", "approx_kl", "ratio_max"):
            if key in stats:
                stats[key + "_mean"] = sum(st[key] for st in real) / len(real)
        mine = [mb for mb in plan if mb.weight > 0]
        stats.update(train_tokens=sum(mb.n_tokens for mb in mine),
                     row_tokens=sum(mb.row_tokens for mb in mine), optimizer_steps=len(steps))
        if self.estimator.trace_steps:  # over every rank's trained tokens
            gaps = [x.logp_gap for prep in prepared for x in prep if x.plan.weight > 0]
            gap = sum(read(torch.stack(gaps))[0]) if gaps else 0.0
            n = distributed.all_sum(stats["train_tokens"])
            stats["sampler_logp_gap"] = distributed.all_sum(gap) / n if n else 0.0
        return stats

    # ---- the loop -----------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One step. With several ranks every rank draws the same global prompts and samples its
        share (prompts rank, rank + world, ...); groups stay whole on one rank, so advantages are
        the single-process ones; kept-group counts are summed across ranks so the oversampling
        loop and the skip decision agree everywhere."""
        t0 = time.perf_counter()
        kept, sampled, n_kept, bad = collect(self.cfg, self._next_rows, self.rollout)
        if bad is not None:
            return self._skip_nonfinite_step(bad)
        log = {"step": self.step, **reward_stats(sampled, self.cfg), "kept_groups": n_kept,
               "gen_tokens": None}
        ttrain = time.perf_counter()
        positions, n_global = kept.positions()
        if n_kept == 0:
            log["skipped"] = "all groups filtered (no pass-rate spread in range); no update"
            self.logger.warn(f"step {self.step}: {log['skipped']}")
        elif len(kept):
            log.update(self.update(kept.trajs, kept.advantages, kept.rewards,
                                   positions=positions, n_global=n_global))
            if "skipped" in log:
                self.logger.warn(f"step {self.step}: {log['skipped']} (empty completions); "
                                 "no update")
            log["gen_tokens"] = int(distributed.all_sum(sum(len(t.token_ids)
                                                            for t in kept.trajs)))
        else:  # this rank kept nothing: join the collectives with zero weight
            self._stand_in_update(sampled, n_global)
        log.update(time_sample=sampled.time_sample, time_reward=sampled.time_reward,
                   time_train=time.perf_counter() - ttrain, time_step=time.perf_counter() - t0,
                   nonfinite_skipped=self.nonfinite_skipped)
        if self.eval_fn is not None and eval_due(self.step, self.cfg.eval_every,
                                                 self.cfg.total_steps):
            with distributed.gathered(self.model):  # full weights, as for sampling
                log["eval_accuracy"] = float(self.eval_fn(self.model))
        if self.step % self.cfg.log_every == 0 or self.step + 1 == self.cfg.total_steps or \
                "eval_accuracy" in log:
            self.logger.log(log)
        self.step += 1
        return log

    def _stand_in_update(self, sampled: RolloutBatch, n_global: int) -> None:
        trajs, rewards = sampled.trajs[:1], sampled.rewards[:1]  # one is enough to join in
        if not trajs:  # it sampled nothing either: a stand-in trajectory
            trajs = [Trajectory(prompt_ids=[0], token_ids=[0], step_map=[0], logprobs=[0.0])]
            rewards = torch.zeros(1, device=HOST)
        self.update(trajs, torch.zeros_like(rewards), rewards, weight=0.0, n_global=n_global)
        distributed.all_sum(0)  # the kept ranks' gen_tokens sum

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
        """Runs until config.total_steps, saving every save_every steps and at the end
        (output_dir/final, the model in final/model); on Ctrl-C, SIGTERM or SIGUSR1 it stops
        with a checkpoint (Checkpointing.run_steps)."""
        self.run_steps(self.name)
        return self

    def finish_logs(self) -> None:
        """Draws the run's curves (output_dir/curves.png) and closes its logger: at the end of a
        run and when a signal stops it (trainers.preemption)."""
        self.logger.plot(("reward_mean", "pass_rate", "eval_accuracy"), title=self.name,
                         marks=self.plot_marks)
        self.logger.close()

    # ---- checkpoints (save / resume: trainers.checkpoint) -------------------------------------

    def _progress(self) -> dict:
        return {"step": self.step, "data_pos": self.data_pos, "data_order": self.data_order,
                "nonfinite_skipped": self.nonfinite_skipped}

    def _set_progress(self, meta: dict) -> None:
        self.step, self.data_pos, self.data_order = (meta["step"], meta["data_pos"],
                                                     meta["data_order"])
        self.nonfinite_skipped = meta.get("nonfinite_skipped", 0)


class TraceRL(RLTrainer):
    """TraceRL with its preset, TraceRLConfig: trajectory-aware rows, shrinkage,
    optional value model with GAE over trace steps, clipped surrogate, pass-rate filter."""

    config_class = TraceRLConfig


class DiPO(RLTrainer):
    """DiPO with its preset, DiPOConfig: group z-scores, clip-higher, k3 KL to a
    frozen reference (loaded only when kl_coef > 0), DAPO dynamic sampling."""

    config_class = DiPOConfig

    def __init__(self, model, tokenizer, dataset, reward_fns, config=None,
                 resume_from: str | None = None, device=None, dtype=None, eval_dataset=None):
        super().__init__(model, tokenizer, dataset, reward_fns, config, resume_from=resume_from,
                         device=device, dtype=dtype, eval_dataset=eval_dataset)
