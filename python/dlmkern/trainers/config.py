"""Typed trainer configuration: dataclasses loadable from YAML with key=value overrides.
Unknown keys and wrongly typed values fail before any work starts, naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from typing import ClassVar

from dlmkern.models.lora import LoRAConfig


def help_field(default, text: str):
    """A dataclass field with its one-line help (printed by `dlmkern config`); mutable defaults
    (dict) become a default_factory."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


opt = help_field

LORA_HELP = ("LoRA adapters instead of full fine-tuning (lora.rank > 0; lora.targets, "
             "lora.alpha, ...): the base weights stay frozen, checkpoints hold the adapters in "
             "PEFT's format (adapter/) and the merged weights (model/)")


@dataclass
class DataConfig:
    """Dataset columns and prompt format, shared by every trainer (dlmkern.data)."""

    columns: dict = opt({}, "{name the trainer reads: source column or dot path}, e.g. "
                        "columns.answer=reward_model.ground_truth")
    system_prompt: str = opt("", "system turn of the chat template")
    instruction: str = opt("", "added to the user turn (after a newline, or at {prompt})")
    chat_template: bool | None = opt(None, "render prompts with the tokenizer's chat template "
                                     "(none: when it has one)")
    prompt_template: str = opt("", "a whole prompt with {prompt} (replaces the chat template)")


@dataclass
class OfflineConfig(DataConfig):
    """The keys every offline trainer (SFT, VRPO: trainers.offline) has; a trainer's config
    re-declares the defaults that are its own."""

    batch_size: int = opt(16, "rows per step (over all ranks)")
    lr: float = opt(1e-4, "learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient-norm clip")
    total_steps: int = opt(200, "optimizer steps of a run")
    gradient_checkpointing: bool = opt(False, "recompute layer activations in backward")
    optimizer_offload: bool = opt(False, "fp32 masters, moments and gradient sums on the host "
                                  "(16 bytes per bf16 parameter off the GPU; slower step)")
    offload_grad_sums: bool = opt(True, "with optimizer_offload: the fp32 gradient sums on the "
                                  "host too (false: on the GPU, 4 bytes per parameter there)")
    micro_batch_tokens: int = opt(0, "packed tokens per forward, gradients accumulated (0: all "
                                  "of this rank's rows in one forward)")
    seed: int = opt(0, "seeds data order and masks")
    output_dir: str = opt("runs/sft", "where logs, plots and checkpoints go")
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(2, "periodic checkpoints kept (the oldest deleted; final always kept; "
                         "0: all)")
    save_optimizer: bool = opt(True, "checkpoints hold the optimizer state (fp32 masters and "
                               "moments: ~6x a bf16 model); false: resume starts it fresh")
    log_every: int = opt(10, "JSONL / TensorBoard / W&B row every N steps (and the last step)")
    eval_every: int = opt(0, "held-out accuracy on the run file's eval_dataset every N steps "
                          "and at the last step (0: never)")
    progress_bar: bool = opt(True, "tqdm progress bar (progress lines when not a terminal)")
    existing_output_dir: str = opt("refuse", "output_dir already holding a run: refuse | "
                                   "overwrite | resume")
    on_nonfinite: str = opt("stop", "NaN / inf loss or grad norm: stop | skip the update")

    def offline_checks(self) -> list:
        """The (ok, message) checks of the shared keys (validate runs them)."""
        check_types(self)
        return [
            (self.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.save_every >= 0 and self.eval_every >= 0,
             "save_every and eval_every must be >= 0"),
            (self.keep_last >= 0, "keep_last must be >= 0 (0: keep every checkpoint)"),
            (self.lr > 0 and self.max_grad_norm > 0, "lr and max_grad_norm must be > 0"),
            *policy_checks(self),
        ]


@dataclass
class SFTConfig(OfflineConfig):
    """SFT: block SFT on [noisy | clean] with t ~ U(eps, 1) masking, loss weighted 1 / t; MDLM
    SFT for full-attention models."""

    algo: ClassVar[str] = "sft"
    total_steps: int = opt(200, "SFT steps of a run")
    min_mask_ratio: float = opt(1e-3, "t ~ U(min_mask_ratio, 1) per row")
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"help": LORA_HELP})

    def validate(self):
        check_all([(0 < self.min_mask_ratio < 1, "min_mask_ratio must lie in (0, 1)"),
                   *self.offline_checks(), *self.lora.checks()])
        return self


def check_all(checks) -> None:
    """Raises the first failed (ok, message) check as `config: message`."""
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"config: {msg}")


OUTPUT_DIR_POLICIES = ("refuse", "overwrite", "resume")
NONFINITE_POLICIES = ("stop", "skip")


def policy_checks(cfg) -> list:
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


def did_you_mean(key: str, known, prefix: str = "", what: str = "") -> str:
    """' (did you mean 'x'?)' naming the known key closest to a mistyped one (difflib), '' when
    none is close. `prefix`: the section both live in (sampling.); `what`: said of the match."""
    import difflib

    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {prefix + close[0]!r}{f' ({what})' if what else ''}?)"


def _unknown(cls, key: str, prefix: str = "") -> ValueError:
    known = [f.name for f in fields(cls)]
    hint = did_you_mean(key, known, prefix)
    for name, t in typing.get_type_hints(cls).items():  # a key of a nested section
        if dataclasses.is_dataclass(t) and key in {g.name for g in fields(t)}:
            hint = f" (it lives under {name}: write {name}.{key})"
    return ValueError(f"config: unknown key {prefix + key!r} for {cls.__name__}{hint} "
                      f"(known: {', '.join(known)})")


def _nested(t, key: str, value):
    """A nested config section (e.g. sampling): an instance, or a mapping of its keys."""
    if isinstance(value, t):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"config: {key} must be a mapping of {t.__name__} keys, got {value!r}")
    kwargs = {}
    for k, v in value.items():
        if k not in {f.name for f in fields(t)}:
            raise _unknown(t, k, prefix=f"{key}.")
        kwargs[k] = _coerce(t, k, v, prefix=f"{key}.")
    try:
        return t(**kwargs)
    except ValueError as e:  # the section's own checks (e.g. an unknown rule)
        raise ValueError(f"config: {key}: {e}") from None


def _coerce(cls, key: str, value, prefix: str = ""):
    types_ = typing.get_type_hints(cls)
    if key not in types_ or key not in {f.name for f in fields(cls)}:
        raise _unknown(cls, key, prefix)
    t = types_[key]
    name = prefix + key
    if dataclasses.is_dataclass(t):
        return _nested(t, name, value)
    if isinstance(t, types.UnionType):  # X | None: None, "none" / "null" / "auto", or an X
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto")):
            return None
        t = next(a for a in t.__args__ if a is not type(None))
    if t is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise ValueError(f"config: {name} must be a mapping of names to strings, got "
                             f"{value!r}")
        return dict(value)
    if isinstance(value, str) and t is not str:
        if t is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"config: {name} must be a bool, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        try:
            return t(value)
        except ValueError:
            raise ValueError(f"config: {name} must be {t.__name__}, got {value!r}") from None
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ValueError(f"config: {name} must be {t.__name__}, got {type(value).__name__} "
                         f"{value!r}")
    return value


def build_config(cls, values: dict | None = None, overrides: list[str] | None = None,
                 validate: bool = True):
    """cls(**values) with `key=value` overrides (`section.key=value` sets one key of a nested
    section or mapping: sampling.rule=dynamic, columns.answer=solution), type-checked and
    validated."""
    merged = dict(values or {})
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"config: override {ov!r} is not key=value")
        k, v = (x.strip() for x in ov.split("=", 1))
        section, dot, sub = k.partition(".")
        if dot:
            old = merged.get(section)
            if old is None:  # the section's default (a preset's own, when it sets one)
                field_ = {f.name: f for f in fields(cls)}.get(section)
                old = _default(field_) if field_ is not None else {}
            if dataclasses.is_dataclass(old):  # an instance: its values, then the override
                old = {f.name: getattr(old, f.name) for f in fields(old)}
            merged[section] = {**old, sub: v}
        else:
            merged[k] = v
    kwargs = {k: _coerce(cls, k, v) for k, v in merged.items()}
    cfg = cls(**kwargs)
    return cfg.validate() if validate else cfg


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


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def describe(cls) -> list[tuple[str, object, str]]:
    """(key, default, help) of every field of config class `cls`, nested sections as
    `section.key` (what `dlmkern config ALGO` prints)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            section = _default(f)
            out += [(f"{f.name}.{g.name}", getattr(section, g.name), g.metadata.get("help", ""))
                    for g in fields(section)]
        else:
            out.append((f.name, _default(f), f.metadata.get("help", "")))
    return out


def to_dict(cfg) -> dict:
    """The config as logged and checkpointed, with its algorithm (a class attribute)."""
    return {"algo": cfg.algo, **dataclasses.asdict(cfg)}


def check_types(cfg, prefix: str = "") -> None:
    """Every field holds a value of its annotated type (a config built in Python skips the
    coercion that YAML and key=value go through), floats finite; nested sections too."""
    import math

    for name, t in typing.get_type_hints(type(cfg)).items():
        if name not in {f.name for f in fields(cfg)}:
            continue  # a ClassVar
        v, key = getattr(cfg, name), prefix + name
        if dataclasses.is_dataclass(t):
            if not isinstance(v, t):
                raise ValueError(f"config: {key} must be a {t.__name__}, got {type(v).__name__}")
            check_types(v, f"{key}.")
            continue
        if isinstance(t, types.UnionType):
            if v is None:
                continue
            t = next(a for a in t.__args__ if a is not type(None))
        ok = isinstance(v, (int, float)) if t is float else isinstance(v, t)
        if not ok or (t in (int, float) and isinstance(v, bool)):
            raise ValueError(f"config: {key} must be {t.__name__}, got {type(v).__name__} {v!r}")
        if t is float and not math.isfinite(v):
            raise ValueError(f"config: {key} must be finite, got {v!r}")
