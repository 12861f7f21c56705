"""One real RL step of a recipe, run on fake tensors under torch's memory tracker.

The trainer is dlmkern's own (RLTrainer, its rollout, rows, step plan and update); only what it
is given is the planner's: models built at their real size from config.json with fake weights,
prompts of a fixed length, a reward that keeps every group (half of each group passes), and a
tokenizer without EOS. Stage probes wrap the stages' methods for the run, so each stage's peak
is recorded by category (plan.tracker). Samplers run two blocks: every later block has the same
shapes (the KV cache and step buffers are sized for the whole generation up front), and their
trajectories are the planner's worst case (dlmkern.sampling.planned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import warnings

import torch

from dlmkern.models.config import ModelConfig
from dlmkern.plan.tracker import StageTracker
from dlmkern.plan.world import default_dtype, fake_world

STAGES = ("load", "rollout_prefill", "rollout_blocks", "rows", "old_logp", "update_forward",
          "update_backward", "optimizer_step", "checkpoint")


class PlanTokenizer:
    """Every prompt encodes to `prompt_tokens` ids; completions decode to nothing; no EOS."""

    eos_token_id = None

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * self.prompt_tokens

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def half_pass(prompts, completions, **columns) -> list[float]:
    """The planner's reward: alternate 0 / 1, so every group has a spread and a pass rate of about
    one half (kept by every group filter: the most trajectories train)."""
    return [float(i % 2) for i in range(len(completions))]


@contextlib.contextmanager
def _probes(tracker: StageTracker):
    """For the block, each stage's methods run inside tracker.stage(name), and the tensors the
    categories cannot tell apart are tagged: KV caches, and the optimizer's fp32 gradient sums
    and the gradients it puts back (made outside autograd, they would count as activations)."""
    from dlmkern.models.transformer import DiffusionLM, KVCache
    from dlmkern.sampling import BlockSampler, FullSampler
    from dlmkern.trainers.optim import MixedPrecisionAdamW
    from dlmkern.trainers.rl import RLTrainer
    from dlmkern.trainers.update import Update

    def kv(cache, *_):
        tracker.tag([*cache.k, *cache.v, *cache.seqlens], "kv_cache")

    def grads(_, opt, *__):
        sums = list(opt._grad_acc.values())
        if opt.sums_on_host:  # the fp32 sums live on the host
            tracker.exclude(sums)
            sums = []
        tracker.tag([*sums, *(p.grad for g in opt.param_groups for p in g["params"]
                              if p.grad is not None)], "grads")

    def state(_, opt, *__):
        if opt.offload:
            tracker.exclude(host_state(opt))

    probes = [(DiffusionLM, "prefill", "rollout_prefill", False, None),
              (BlockSampler, "_block", "rollout_blocks", False, None),
              (BlockSampler, "step", "decode_step", False, None),
              (FullSampler, "_plan", "rollout_blocks", False, None),
              (FullSampler, "_denoise", "rollout_blocks", False, None),
              (RLTrainer, "rows", "rows", False, None),
              (Update, "prepare", "old_logp", False, None),
              (Update, "_pass", "update", True, None),
              (MixedPrecisionAdamW, "step", "optimizer_step", False, state),
              (MixedPrecisionAdamW, "stash_grads", None, False, grads),
              (MixedPrecisionAdamW, "unstash_grads", None, False, grads),
              (KVCache, "empty", None, False, kv)]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, *_ in probes]

    def wrap(fn, stage, split, after):
        static = isinstance(fn, classmethod)
        call = fn.__func__ if static else fn

        def probed(*args, **kwargs):
            with tracker.stage(stage, split_backward=split) if stage else \
                    contextlib.nullcontext():
                out = call(*args, **kwargs)
            if after is not None:
                after(out, *args)
            return out
        return classmethod(probed) if static else probed

    try:
        for cls, name, stage, split, after in probes:
            setattr(cls, name, wrap(cls.__dict__[name], stage, split, after))
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def trainer_inputs(cfg, prompt_tokens: int):
    """What the planner gives the real trainer: its tokenizer, prompts and reward."""
    data = [{"prompt": "p"} for _ in range(cfg.prompts_per_step)]
    return PlanTokenizer(prompt_tokens), data, half_pass


def tracked(trainer, stages: dict | None = None) -> StageTracker:
    """A tracker that counts the trainer's models and optimizers as resident (`stages`: a dict
    the tracker records into, shared by several trials)."""
    tracker = StageTracker("cpu")
    if stages is not None:
        tracker.stages = stages
    opts = [o for o in (trainer.opt, trainer.value_opt) if o is not None]
    tracker.track_external(*[m for m in (trainer.model, trainer.value_model, trainer.ref_model)
                             if m is not None], *[o for o in opts if not o.offload])
    for o in opts:
        if o.offload:
            tracker.exclude(host_state(o))
    return tracker


def host_state(opt) -> list:
    """An offloading optimizer's host tensors: fp32 masters and moments (the step counters are
    host scalars either way)."""
    from dlmkern.trainers.optim import _local

    return [_local(v) for st in opt.state.values() for k, v in st.items()
            if k in ("master", "exp_avg", "exp_avg_sq") and torch.is_tensor(v) and
            _local(v).device.type == "cpu"]


def run_tracked(trainer, fn, stages: dict | None = None) -> StageTracker:
    """fn() under a tracker with the stage probes (tracker.stages: the peaks of one rank)."""
    tracker = tracked(trainer, stages)
    with tracker, _probes(tracker):
        fn()
    return tracker


def params_of(trainer) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in
            (("policy", trainer.model), ("value", trainer.value_model),
             ("reference", trainer.ref_model)) if m is not None}


class PlannedRun:
    """``with PlannedRun(model_config, cfg, ranks) as run:`` the recipe's RLTrainer at full size on
    fake tensors, with its optimizer state made (the steady state of step 2 on); ``run.load()``,
    ``run.rollout(max_seqs)`` and ``run.update(...)`` are trials of its stages, each returning
    the stages' peaks by category (bytes of one rank). The knobs are the config's: a trial sets
    them on the live trainer."""

    def __init__(self, model_config: ModelConfig, cfg, ranks: int = 1, prompt_tokens: int = 512,
                 dtype: torch.dtype = torch.bfloat16):
        self.model_config, self.ranks, self.dtype = model_config, ranks, dtype
        self.cfg, self.prompt_tokens = cfg, prompt_tokens
        self._stack = contextlib.ExitStack()
        self.batch = None
        self.host_bytes = 0

    def __enter__(self) -> PlannedRun:
        from dlmkern.models.transformer import DiffusionLM, ValueModel
        from dlmkern.trainers.rl import RLTrainer

        out = self._stack.enter_context(tempfile.TemporaryDirectory())
        self._stack.enter_context(fake_world(self.ranks))
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", UserWarning)  # torch's module tracker on re-entry
        cfg = dataclasses.replace(self.cfg, output_dir=out, existing_output_dir="overwrite",
                                  progress_bar=False, save_every=0, eval_every=0)
        with default_dtype(self.dtype):  # fake weights in `dtype`, at full size
            model = DiffusionLM(self.model_config)
            value = ValueModel(self.model_config) if cfg.use_value_model else None
        self.trainer = RLTrainer(model, *trainer_inputs(cfg, self.prompt_tokens), cfg,
                                 value_model=value)
        self._make_states()
        self.params = params_of(self.trainer)
        return self

    def __exit__(self, *exc):
        self.trainer.logger.close()
        return self._stack.__exit__(*exc)

    def set_offload(self, offload: bool, grad_sums: bool = True) -> None:
        """The optimizers with their state on the host (optimizer_offload; the fp32 gradient
        sums too with grad_sums) or on the GPU."""
        t = self.trainer
        if (t.cfg.optimizer_offload, t.cfg.offload_grad_sums) != (offload, grad_sums):
            t.cfg.optimizer_offload, t.cfg.offload_grad_sums = offload, grad_sums
            t.make_optimizers()
            self._make_states()

    def _make_states(self) -> None:
        t = self.trainer
        for opt, model in ((t.opt, t.model), (t.value_opt, t.value_model)):
            if opt is not None:
                _make_state(opt, model)

    def load(self) -> dict:
        """What is resident between steps: weights and optimizer state."""
        tracker = tracked(self.trainer)
        self.host_bytes = tracker.host_bytes  # an offloaded optimizer state, on the host
        return {"load": tracker.current()}

    def rollout(self, max_seqs: int) -> dict:
        """The rollout (prefill, blocks) with `max_seqs` sequences at a time."""
        from dlmkern.trainers.rollout import collect

        t = self.trainer
        t.cfg.sampling = dataclasses.replace(t.cfg.sampling, max_seqs=max_seqs)
        t.data_pos = 0
        out = {}

        def go():
            self.batch = collect(t.cfg, t._next_rows, t.rollout)
        tracker = run_tracked(t, go, out)
        # dlmkern's own accounting (no GPU here): a CUDA graph's private pool keeps what its
        # captured step allocated for the whole generate() call, beside everything the block
        # does outside the graph (the commit); counted as the step's measured rise
        pool = tracker.transient.get("decode_step", 0)
        if "rollout_blocks" in out and t.model.config.block_causal:
            blk = out["rollout_blocks"]
            blk["graph_pool"] = pool
            blk["total"] += pool
        out.pop("decode_step", None)
        return out

    def update(self, micro_batch_tokens: int, gradient_checkpointing: bool) -> dict:
        """Rows, old log-probs, forward / backward of the micro-batches, optimizer step."""
        t = self.trainer
        if self.batch is None:
            self.rollout(t.cfg.sampling.max_seqs)
        t.cfg.micro_batch_tokens = micro_batch_tokens
        for m in (t.model, t.value_model and t.value_model.trunk):
            if m is not None:
                m.gradient_checkpointing = gradient_checkpointing
        kept = self.batch[0]
        positions, n_global = kept.positions()
        tracker = run_tracked(t, lambda: t.update(kept.trajs, kept.advantages, kept.rewards,
                                                  positions=positions, n_global=n_global), {})
        # host peak of an offloaded optimizer: its state and the fp32 gradient sums
        self.host_bytes = max(self.host_bytes, tracker.host_bytes)
        return tracker.stages


def _make_state(opt, model) -> None:
    """The optimizer's state as after a first step (zero gradients, one step, none kept), for
    the parameters a step gives gradients: all but a value model's lm_head (its forward never
    reaches it; tied, it is the embedding, which is used)."""
    unused = set()
    trunk = getattr(model, "trunk", None)
    if trunk is not None and trunk.lm_head.weight is not trunk.embed.weight:
        unused = {id(trunk.lm_head.weight)}
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) not in unused:
                p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
