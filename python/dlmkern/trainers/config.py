"""Typed trainer configuration: dataclasses loadable from YAML with key=value overrides.
Unknown keys and wrongly typed values fail before any work starts, naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields


@dataclass
class DataConfig:
    """Dataset columns and prompt format, shared by every trainer (dlmkern.data)."""

    # {name the trainer / rewards read: source column or dot path}, e.g. {prompt: question,
    # answer: reward_model.ground_truth}; on the command line columns.answer=reward_model.x
    columns: dict = field(default_factory=dict)
    system_prompt: str = ""
    instruction: str = ""                # added to the user turn (after a newline, or {prompt})
    chat_template: bool | None = None    # None: when the tokenizer has one
    prompt_template: str = ""            # a whole prompt with {prompt} (replaces the template)


@dataclass
class RLConfig(DataConfig):
    # rollout
    prompts_per_step: int = 8
    group_size: int = 8                  # samples per prompt
    max_new_tokens: int = 256
    steps_per_block: int = 4             # block models: denoising steps per block
    gen_block_length: int = 32           # full-attention models: semi-AR block length
    # sampling (SamplingConfig's fields, checked with it: RLConfig.sampling())
    rule: str = "static"                 # static | dynamic | entropy_bounded | sequential
    threshold: float = 0.9               # dynamic: unmask every token with confidence above
    entropy_bound: float = 1.0           # entropy_bounded: entropy budget per step
    temperature: float = 1.0
    top_k: int = 0                       # 0 = off
    top_p: float = 1.0                   # 1 = off
    confidence: str = "prob"             # what ranks positions: prob | margin | neg_entropy
    schedule: str = "even"               # static counts: even (LLaDA) | dream (Dream's timesteps)
    cfg_scale: float = 0.0               # LLaDA classifier-free guidance (full-attention; 0 = off)
    steps_total: int = 0                 # LLaDA's convention: steps over all blocks (0: use
    #                                      steps_per_block / gen_block_length's blocks)
    # algorithm
    estimator: str = "trace"             # trace | random_mask | coupled | diffu_grpo (baselines)
    shrinkage: int = 1                   # trace shrinkage s (TraceRL: 1 block models, 8 full)
    reduction: str = "token_mean"        # token_mean | seq_mean | sum
    loss_normalizer: float = 1.0         # for reduction="sum" (Dr.GRPO constant)
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 0.0               # 0 = off
    kl_coef: float = 0.0
    kl_to: str = "old"                   # "old" (TraceRL) or "ref" (frozen reference policy)
    pass_rate_low: float = 0.0           # keep groups whose mean reward lies in [low, high]
    pass_rate_high: float = 1.0
    dynamic_sampling: bool = False       # DAPO: keep 0 < mean < 1, oversample to fill the batch
    max_oversample_rounds: int = 4
    use_value_model: bool = False
    gamma: float = 1.0
    lam: float = 1.0
    vf_clip: float = 0.2
    # optimisation
    lr: float = 1e-6
    value_lr: float = 5e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    total_steps: int = 100
    gradient_checkpointing: bool = False  # recompute layer activations in backward (policy, value)
    num_minibatches: int = 1             # optimizer steps per pass over a step's trajectories
    ppo_epochs: int = 1                  # passes over them (old log-probs fixed at rollout)
    # packed row tokens per forward: a mini-batch runs as several forward / backward passes
    # (whole trajectories each) with accumulated gradients; 0 = the mini-batch in one forward
    micro_batch_tokens: int = 0
    # bookkeeping
    seed: int = 0
    output_dir: str = "runs/rl"
    save_every: int = 0                  # 0 = only at the end
    log_every: int = 1                   # JSONL / TensorBoard / W&B row every N steps
    eval_every: int = 0                  # run trainer.eval_fn every N steps (0: never)
    progress_bar: bool = True
    # output_dir already holding a run (log.jsonl / checkpoints): refuse (error) | overwrite
    # (delete its log, curves, checkpoints) | resume (from its latest checkpoint-N / final)
    existing_output_dir: str = "refuse"
    on_nonfinite: str = "stop"           # NaN / inf loss, grad norm or reward: stop | skip it

    def sampling(self):
        """The rollout's SamplingConfig (validated: a bad rule or value fails here, naming it)."""
        from dlmkern.sampling.rules import SamplingConfig

        return SamplingConfig(
            rule=self.rule, steps=self.steps_per_block, threshold=self.threshold,
            entropy_bound=self.entropy_bound, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, confidence=self.confidence, schedule=self.schedule,
            cfg_scale=self.cfg_scale, steps_total=self.steps_total)

    def validate(self, value_model: bool = False):
        """`value_model`: the trainer has one (given explicitly) even if use_value_model is off."""
        try:
            self.sampling()
        except ValueError as e:  # before any model is loaded
            raise ValueError(f"config: sampling: {e}") from None
        group_relative = not (self.use_value_model or value_model)
        checks = [
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.group_size >= 1, "group_size must be >= 1"),
            (self.group_size >= 2 or not group_relative,
             "group_size=1 with a group-relative advantage (the group z-score of TraceRL without "
             "a value model, DiPO, the GRPO-style baselines) gives every sample advantage 0: "
             "nothing would train; use group_size >= 2 or use_value_model: true"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.reduction in ("token_mean", "seq_mean", "sum"),
             "reduction must be token_mean, seq_mean or sum"),
            (self.kl_to in ("old", "ref"), "kl_to must be 'old' or 'ref'"),
            (self.estimator in ("trace", "random_mask", "coupled", "diffu_grpo"),
             "estimator must be trace, random_mask, coupled or diffu_grpo"),
            (self.shrinkage >= 1, "shrinkage must be >= 1"),
            (self.num_minibatches >= 1, "num_minibatches must be >= 1"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
            (self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0"),
            (0 <= self.pass_rate_low <= self.pass_rate_high <= 1,
             "need 0 <= pass_rate_low <= pass_rate_high <= 1"),
            *_policy_checks(self),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"config: {msg}")
        return self


@dataclass
class SFTConfig(DataConfig):
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    total_steps: int = 200
    min_mask_ratio: float = 1e-3         # t ~ U(eps, 1)
    gradient_checkpointing: bool = False  # recompute layer activations in backward
    # packed tokens per forward: a step's rows run as several forward / backward passes with
    # accumulated gradients (0: all of this rank's rows in one forward)
    micro_batch_tokens: int = 0
    seed: int = 0
    output_dir: str = "runs/sft"
    save_every: int = 0                  # checkpoint every N steps (0: only at the end)
    log_every: int = 10
    progress_bar: bool = True
    # output_dir already holding a run (log.jsonl / checkpoints): refuse (error) | overwrite
    # (delete its log, curves, checkpoints) | resume (from its latest checkpoint-N / final)
    existing_output_dir: str = "refuse"
    on_nonfinite: str = "stop"           # NaN / inf loss or grad norm: stop | skip the update

    def validate(self):
        checks = [
            (0 < self.min_mask_ratio < 1, "min_mask_ratio must lie in (0, 1)"),
            (self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            *_policy_checks(self),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"config: {msg}")
        return self


OUTPUT_DIR_POLICIES = ("refuse", "overwrite", "resume")
NONFINITE_POLICIES = ("stop", "skip")


def _policy_checks(cfg) -> list:
    return [(cfg.existing_output_dir in OUTPUT_DIR_POLICIES,
             f"existing_output_dir must be one of {', '.join(OUTPUT_DIR_POLICIES)}, got "
             f"{cfg.existing_output_dir!r}"),
            (cfg.on_nonfinite in NONFINITE_POLICIES,
             f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got "
             f"{cfg.on_nonfinite!r}"),
            (not cfg.prompt_template or "{prompt}" in cfg.prompt_template,
             "prompt_template must contain {prompt} (where the user text goes)"),
            (not cfg.prompt_template or not (cfg.system_prompt or cfg.chat_template),
             "prompt_template is the whole prompt: drop system_prompt and chat_template: true")]


def _coerce(cls, key: str, value):
    types_ = typing.get_type_hints(cls)
    if key not in types_:
        known = ", ".join(f.name for f in fields(cls))
        raise ValueError(f"config: unknown key {key!r} for {cls.__name__} (known: {known})")
    t = types_[key]
    if isinstance(t, types.UnionType):  # X | None: None, "none" / "null" / "auto", or an X
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto")):
            return None
        t = next(a for a in t.__args__ if a is not type(None))
    if t is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise ValueError(f"config: {key} must be a mapping of names to strings, got "
                             f"{value!r}")
        return dict(value)
    if isinstance(value, str) and t is not str:
        if t is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"config: {key} must be a bool, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        try:
            return t(value)
        except ValueError:
            raise ValueError(f"config: {key} must be {t.__name__}, got {value!r}") from None
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ValueError(f"config: {key} must be {t.__name__}, got {type(value).__name__} "
                         f"{value!r}")
    return value


def build_config(cls, values: dict | None = None, overrides: list[str] | None = None):
    """cls(**values) with `key=value` overrides (`columns.NAME=SOURCE` sets one column of the
    mapping), type-checked and validated."""
    merged = dict(values or {})
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"config: override {ov!r} is not key=value")
        k, v = (x.strip() for x in ov.split("=", 1))
        if k.startswith("columns."):
            merged["columns"] = {**(merged.get("columns") or {}), k[len("columns."):]: v}
        else:
            merged[k] = v
    kwargs = {k: _coerce(cls, k, v) for k, v in merged.items()}
    return cls(**kwargs).validate()


def load_config(cls, path: str | None = None, overrides: list[str] | None = None):
    """From a YAML file (a mapping of keys) plus key=value overrides."""
    values = {}
    if path:
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config: {path} must hold a mapping of keys")
    return build_config(cls, values, overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
