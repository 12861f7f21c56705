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

import torch

from dlmkern.models.config import ModelConfig
from dlmkern.plan.tracker import StageTracker
from dlmkern.plan.world import default_dtype, fake_world

STAGES = ("load", "rollout_prefill", "rollout_blocks", "rows", "old_logp", "update_forward",
          "update_backward", "optimizer_step")


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
        tracker.tag([*opt._grad_acc.values(), *(p.grad for g in opt.param_groups
                                                for p in g["params"] if p.grad is not None)],
                    "grads")

    probes = [(DiffusionLM, "prefill", "rollout_prefill", False, None),
              (BlockSampler, "_block", "rollout_blocks", False, None),
              (FullSampler, "_plan", "rollout_blocks", False, None),
              (FullSampler, "_denoise", "rollout_blocks", False, None),
              (RLTrainer, "rows", "rows", False, None),
              (Update, "prepare", "old_logp", False, None),
              (Update, "_pass", "update", True, None),
              (MixedPrecisionAdamW, "step", "optimizer_step", False, None),
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


@dataclasses.dataclass
class StepResult:
    stages: dict[str, dict[str, int]]     # stage -> {category: bytes, "total": bytes}, one rank
    params: dict[str, int]                # model -> parameter count
    state_bytes: dict[str, int]           # model -> resident bytes at the end (params + opt)
    trainer: object = None


def run_step(model_config: ModelConfig, cfg, ranks: int = 1, prompt_tokens: int = 512,
             dtype: torch.dtype = torch.bfloat16, steps: int = 1) -> StepResult:
    """The recipe's RL step (`cfg`: an RLConfig preset) on `ranks` fake ranks, at full size."""
    from dlmkern.models.transformer import DiffusionLM, ValueModel
    from dlmkern.trainers.rl import RLTrainer

    with tempfile.TemporaryDirectory() as out, fake_world(ranks):
        cfg = dataclasses.replace(cfg, output_dir=out, existing_output_dir="overwrite",
                                  progress_bar=False, save_every=0, eval_every=0)
        with default_dtype(dtype):  # fake weights in `dtype`, at full size
            model = DiffusionLM(model_config)
            value = ValueModel(model_config) if cfg.use_value_model else None
        data = [{"prompt": "p"} for _ in range(cfg.prompts_per_step)]
        trainer = RLTrainer(model, PlanTokenizer(prompt_tokens), data, half_pass, cfg,
                            value_model=value)
        tracker = StageTracker("cpu")
        models = [m for m in (trainer.model, trainer.value_model, trainer.ref_model) if m]
        tracker.track_external(*models, *[o for o in (trainer.opt, trainer.value_opt) if o])
        with tracker, _probes(tracker):
            with tracker.stage("load"):
                pass
            for _ in range(steps):
                trainer.train_step()
        trainer.logger.close()
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                  (("policy", trainer.model), ("value", trainer.value_model),
                   ("reference", trainer.ref_model)) if m is not None}
        return StepResult(tracker.stages, params, tracker.current(), trainer)
