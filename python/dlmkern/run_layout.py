"""Where a run's files are: one layout for `dlmkern train`, the SFT and RL trainers and the demo.

    output_dir/log.jsonl          one row per logged step
    output_dir/curves.png         the logged curves
    output_dir/checkpoint-N/      periodic checkpoints (and the one a signal asks for)
    output_dir/final/             the last checkpoint
    output_dir/final/model/       the trained model: a Hugging Face directory with its tokenizer

A checkpoint directory holds its model in model/. `find_model` takes any of the three (model,
checkpoint or run directory) where a command wants a model, or names the models below it."""

from __future__ import annotations

import os
import shlex

FINAL, MODEL = "final", "model"


def final_model(out_dir: str) -> str:
    """The trained model of the run in out_dir."""
    return os.path.join(out_dir, FINAL, MODEL)


def _is_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def find_model(path: str, key: str = "--model") -> str:
    """The model directory `path` means: itself (it holds config.json), a checkpoint's model/ or
    a run's final/model. Otherwise a ValueError naming `key` and the models below `path` (a run
    stopped before its end: its checkpoints' models, newest first)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key} {path!r} does not exist")
    for inner in (path, os.path.join(path, MODEL), final_model(path)):
        if _is_model(inner):
            return inner
    from dlmkern.trainers.checkpoint import periodic_checkpoints

    found = [os.path.join(path, f"checkpoint-{n}", MODEL)
             for n in reversed(periodic_checkpoints(path))
             if _is_model(os.path.join(path, f"checkpoint-{n}", MODEL))]
    if found:
        raise ValueError(f"{key} {path!r} holds no final model (the run did not finish); its "
                         f"checkpoints' models: {', '.join(found)}")
    below = _models_below(path)
    hint = f"; models in it: {', '.join(below)}" if below else ""
    raise ValueError(f"{key} {path!r} is not a model directory (no config.json), a checkpoint "
                     f"({MODEL}/) or a run directory ({FINAL}/{MODEL}){hint}")


def _models_below(path: str, depth: int = 4, limit: int = 8) -> list[str]:
    """Model directories under `path` (at most `depth` levels down, `limit` of them)."""
    found = []
    for root, dirs, _ in os.walk(path):
        if root[len(path):].count(os.sep) >= depth:
            dirs.clear()
            continue
        dirs.sort()
        for d in list(dirs):
            if _is_model(os.path.join(root, d)):
                found.append(os.path.join(root, d))
                dirs.remove(d)  # nothing below a model is another one
        if len(found) >= limit:
            break
    return found[:limit]


def format_flags(cfg) -> list[str]:
    """The `dlmkern sample` / `eval` flags that render prompts as the trainer config did."""
    flags = []
    for key, flag in (("system_prompt", "--system-prompt"), ("instruction", "--instruction"),
                      ("prompt_template", "--prompt-template")):
        if getattr(cfg, key):
            flags += [flag, getattr(cfg, key)]
    if cfg.chat_template is not None:
        flags += ["--chat-template", str(cfg.chat_template).lower()]
    return flags


# the sampling keys `dlmkern sample` / `eval` take as flags (temperature is not one of them: the
# run's held-out evaluation decodes greedily, as those commands do by default)
_SAMPLING_FLAGS = {"rule": "--rule", "steps": "--steps", "threshold": "--threshold",
                   "entropy_bound": "--entropy-bound", "confidence": "--confidence",
                   "schedule": "--schedule", "cfg_scale": "--cfg-scale",
                   "steps_total": "--steps-total"}


def sampling_flags(cfg) -> list[str]:
    """The `dlmkern sample` / `eval` flags that decode as the run's held-out evaluation did: an
    RL config's sampling keys (and gen_block_length) that differ from the commands' defaults,
    which are SamplingConfig's; SFT's evaluation uses the defaults (no flags)."""
    from dlmkern.sampling import SamplingConfig

    sampling = getattr(cfg, "sampling", None)
    if sampling is None:
        return []
    default = SamplingConfig()
    flags = [f for key, flag in _SAMPLING_FLAGS.items()
             if getattr(sampling, key) != getattr(default, key)
             for f in (flag, str(getattr(sampling, key)))]
    if cfg.gen_block_length != 32:  # the commands' --block-length default
        flags += ["--block-length", str(cfg.gen_block_length)]
    return flags


def finished_lines(out_dir: str, cfg, dataset: str, prompt: str, reward: str,
                   tokenizer: str | None = None, eval_dataset: str | None = None) -> list[str]:
    """What `dlmkern train` prints at the end: where the model, log and curves are, and the
    commands that sample from and evaluate the model with the run's prompt format and decoding
    (`prompt`: an example from the dataset; `reward`: eval's; `tokenizer`: given when the model
    directory holds none). The eval command scores the held-out `eval_dataset` when the run had
    one (an RL run's command then reproduces its last eval_accuracy), else `dataset` (VRPO's
preference rows: against their chosen completions)."""
    from dlmkern.models.io import TOKENIZER_FILES

    model = final_model(out_dir)
    has_tok = any(os.path.exists(os.path.join(model, n)) for n in TOKENIZER_FILES)
    common = ["--model", model, *([] if has_tok or not tokenizer else ["--tokenizer", tokenizer]),
              *format_flags(cfg), *sampling_flags(cfg)]
    new_tokens = getattr(cfg, "max_new_tokens", None)  # RL's; SFT: the commands' default
    if new_tokens:
        common += ["--max-new-tokens", str(new_tokens)]
    columns = [f for k, v in cfg.columns.items() for f in ("--column", f"{k}={v}")]
    if getattr(cfg, "algo", None) == "vrpo" and not eval_dataset and "answer" not in cfg.columns:
        columns += ["--column", "answer=chosen"]  # preference rows: scored against the chosen
    lines = [f"model:  {model}", f"log:    {os.path.join(out_dir, 'log.jsonl')}"]
    curves = os.path.join(out_dir, "curves.png")
    if os.path.exists(curves):
        lines.append(f"curves: {curves}")
    sample = ["dlmkern", "sample", *common, "--prompt", prompt]
    evaluate = ["dlmkern", "eval", *common, "--data", eval_dataset or dataset, *columns,
                "--reward", reward]
    return [*lines, f"sample: {shlex.join(sample)}", f"eval:   {shlex.join(evaluate)}"]


def resume_command(run_file: str, args: list[str], from_checkpoint: bool, launcher: bool):
    """How to continue a run that a signal stopped: f(checkpoint) -> the `dlmkern train` command
    line with the same run file and arguments, existing_output_dir=resume (or, for a run that
    was itself started from a checkpoint, resume=that checkpoint: its own resume key would
    start over from the old one). `launcher`: under torchrun, the same launch."""
    kept = [a for a in args if not a.startswith(("existing_output_dir=", "resume="))]

    def command(checkpoint: str) -> str:
        last = f"resume={checkpoint}" if from_checkpoint else "existing_output_dir=resume"
        tail = shlex.join(["train", run_file, *kept, last])
        if launcher:
            return f"the same torchrun launch of: -m dlmkern.cli {tail}"
        return f"dlmkern {tail}"

    return command
