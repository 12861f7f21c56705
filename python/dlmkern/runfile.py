"""The run file of `dlmkern train` (YAML): its top-level keys, each with its help (what
`dlmkern train --help` lists), read and checked before any work starts."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field


def _key(default, text: str, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class RunFile:
    """A training run. `trainer:` holds the algorithm's settings (`dlmkern config ALGO`)."""

    algo: str = field(metadata={"help": "tracerl, dipo, random_mask, coupled_grpo, diffu_grpo "
                                        "(RL), sft or vrpo (offline) (required)"})
    model: str = field(metadata={"help": "the model to train: a Hugging Face model directory "
                                         "(required)"})
    dataset: str = field(metadata={"help": "training rows: JSONL, JSON, CSV, parquet or a "
                                           "datasets save_to_disk directory; columns are mapped "
                                           "with trainer.columns (required)"})
    reward: str | None = _key(None, "math | exact | code | path/to/file.py:function | "
                                    "module:function (default: math for RL; for SFT / VRPO "
                                    "the held-out score, default exact)")
    eval_dataset: str | None = _key(None, "held-out rows (same formats and columns as "
                                          "dataset) scored every trainer.eval_every steps with "
                                          "the reward, logged as eval_accuracy and drawn in "
                                          "curves.png")
    tokenizer: str | None = _key(None, "a tokenizer directory, or char (built in); default: "
                                       "the model's")
    dtype: str | None = _key(None, "bfloat16 | float16 | float32 (default: bfloat16 on GPU, "
                                   "float32 on CPU; float32 is refused on GPU)")
    trainer: dict = field(default_factory=dict, metadata={
        "help": "the algorithm's settings over its defaults, e.g. lr, total_steps, output_dir, "
                "sampling.steps (all of them: dlmkern config ALGO)"})
    resume: str | None = _key(None, "a checkpoint directory to continue from (model, "
                                    "optimizer, random state, step and data position)")

    @property
    def reward_spec(self) -> str:
        """The reward the run scores with: RL trains on it, SFT / VRPO evaluate with it."""
        return self.reward or ("exact" if self.offline else "math")

    @property
    def offline(self) -> bool:
        """An offline trainer's run (SFT, VRPO: trainers.OFFLINE), not RL."""
        from dlmkern.trainers import OFFLINE

        return self.algo in OFFLINE


RUN_KEYS = {f.name for f in dataclasses.fields(RunFile)}


def keys_help() -> str:
    """The run file's keys with their help, for `dlmkern train --help`."""
    import textwrap

    lines = ["run file keys (YAML):"]
    for f in dataclasses.fields(RunFile):
        lines.append(textwrap.fill(f"  {f.name}: {f.metadata['help']}", width=79,
                                   subsequent_indent="      "))
    lines += ["", textwrap.fill("The algorithm's settings and their defaults: dlmkern config "
                                "ALGO. On the command line, key=value overrides a run file key "
                                "(model=DIR) or a trainer key (lr=1e-6, sampling.steps=4).",
                                width=79)]
    return "\n".join(lines)


def parse_run(path: str, overrides: list[str]):
    """Reads and checks a run file before any work starts: unknown keys, wrong types and missing
    paths fail with the key and the reason."""
    from dlmkern.rewards import get_reward

    run, cfg, _ = read_run(path, overrides)
    for key in ("model", "dataset", "eval_dataset"):
        p = getattr(run, key)
        if (key != "eval_dataset" or p is not None) and \
                (not isinstance(p, str) or not os.path.exists(p)):
            raise ValueError(f"{path}: {key} path {p!r} does not exist")
    if run.resume is not None and not os.path.isfile(
            os.path.join(str(run.resume), "trainer_state.pt")):
        raise ValueError(f"{path}: resume {run.resume!r} is not a dlmkern checkpoint directory")
    if run.tokenizer not in (None, "char") and not os.path.isdir(str(run.tokenizer)):
        raise ValueError(f"{path}: tokenizer {run.tokenizer!r} is neither 'char' nor a directory")
    if not run.offline or run.eval_dataset is not None:
        try:
            get_reward(run.reward_spec)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return run, cfg


def read_run(path: str, overrides: list[str]):
    """The run file's keys and its algorithm's config (key and type checks, no file system
    checks: `dlmkern plan` needs only the model's config.json). Returns (run, config, the
    trainer keys the file or the overrides set, nested ones as `section.key`)."""
    import yaml

    from dlmkern.trainers import OFFLINE, PRESETS, build_config
    from dlmkern.trainers.config import did_you_mean

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys")
    unknown = sorted(set(raw) - RUN_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}"
                         f"{did_you_mean(unknown[0], RUN_KEYS)} (known: {sorted(RUN_KEYS)})")
    for key in ("algo", "model", "dataset"):
        if key not in raw:
            raise ValueError(f"{path}: missing required key {key!r}")
    trainer_over = []
    for ov in overrides:  # top-level keys override the run file, the rest the trainer section
        k, _, v = ov.partition("=")
        if k in RUN_KEYS - {"trainer"}:
            raw[k] = v
        else:
            trainer_over.append(ov)
    run = RunFile(**raw)
    _check_dtype(path, run.dtype)
    if run.algo not in OFFLINE and run.algo not in PRESETS:
        raise ValueError(f"{path}: algo must be one of {', '.join([*PRESETS, *OFFLINE])}, got "
                         f"{run.algo!r}")
    if not isinstance(run.trainer, dict):
        raise ValueError(f"{path}: trainer must be a mapping of config keys")
    # the preset of `algo`, overridden field by field by the `trainer:` section
    cls = OFFLINE[run.algo].config_class if run.offline else PRESETS[run.algo]
    for k in (ov.partition("=")[0].strip().partition(".")[0] for ov in trainer_over):
        if k not in {f.name for f in dataclasses.fields(cls)} and \
                (close := did_you_mean(k, RUN_KEYS - {"trainer"}, what="a run file key")):
            raise ValueError(f"{path}: unknown key {k!r}{close}")  # a run key, mistyped
    cfg = build_config(cls, run.trainer, trainer_over)
    if cfg.eval_every and run.eval_dataset is None:
        raise ValueError(f"{path}: eval_every: {cfg.eval_every} scores held-out rows, but "
                         "eval_dataset is not set: add eval_dataset: FILE (same formats and "
                         "columns as dataset) or drop eval_every")
    given = {f"{k}.{sub}" if isinstance(v, dict) else k
             for k, v in run.trainer.items() for sub in (v if isinstance(v, dict) else [None])}
    given |= {ov.partition("=")[0].strip() for ov in trainer_over}
    return run, cfg, given


def _check_dtype(path: str, dtype) -> None:
    """The run's dtype on the device the run will use (this rank's GPU when there is CUDA):
    float32 with the CUDA kernels is refused here, naming the key, not at the first forward."""
    import torch

    from dlmkern.models.io import run_dtype

    if dtype is None:
        return
    try:  # only is_available(): no CUDA call before the refusal
        run_dtype("cuda" if torch.cuda.is_available() else "cpu", dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def check_train_inputs(run, cfg, tok=None):
    """The dataset (loaded once, with the config's column mapping: its rows go to the trainer),
    the columns the trainer or the reward needs, that the prompt format can render every row,
    and the existing_output_dir policy, all before the weights load. Returns (rows, the reward
    function: None for SFT and VRPO)."""
    from dlmkern.data import PromptFormat, load_dataset
    from dlmkern.data.preferences import load_preferences
    from dlmkern.rewards import get_reward
    from dlmkern.trainers.checks import (
        RewardSpec,
        check_output_dir,
        check_reward_columns,
        require_column,
    )

    reward = None
    if run.algo == "vrpo":  # prompt / chosen / rejected, a bad row named with its file
        data = load_preferences(run.dataset, cfg.columns)
    else:
        data = load_dataset(run.dataset, cfg.columns)
    if run.algo == "sft":
        require_column(data, "answer", "SFT")
    elif not run.offline:
        reward = get_reward(run.reward_spec)
        check_reward_columns(data, [RewardSpec(reward)])
    if tok is not None:
        PromptFormat.from_config(cfg).check(data, tok)
    check_output_dir(cfg.output_dir, cfg.existing_output_dir, run.resume)
    return data, reward
