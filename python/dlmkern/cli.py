"""The `dlmkern` command: demo, train, sample, eval, doctor."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

RUN_KEYS = {"algo", "model", "tokenizer", "dataset", "reward", "dtype", "trainer", "resume"}


@dataclass
class RunFile:
    """A training run: `algo` (an RL preset of dlmkern.trainers.PRESETS: tracerl, dipo,
    random_mask, coupled_grpo, diffu_grpo; or sft), `model` (HF directory), `tokenizer`
    (directory, default: the model's), `dataset` (JSONL, JSON, CSV, parquet or a datasets
    save_to_disk directory; columns and prompt format in `trainer`), `reward` (math | code |
    module:function), `trainer` (the algorithm's config keys), `resume` (a checkpoint directory
    written by the trainer: model, optimizer, RNG, step and data position continue from it)."""

    algo: str
    model: str
    dataset: str
    reward: str = "math"
    tokenizer: str | None = None
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU; float32 refused on GPU
    trainer: dict = field(default_factory=dict)
    resume: str | None = None


def parse_run(path: str, overrides: list[str]):
    """Reads and checks a run file before any work starts: unknown keys, wrong types and missing
    paths fail with the key and the reason."""
    run, cfg, _ = read_run(path, overrides)
    for key in ("model", "dataset"):
        p = getattr(run, key)
        if not isinstance(p, str) or not os.path.exists(p):
            raise ValueError(f"{path}: {key} path {p!r} does not exist")
    if run.resume is not None and not os.path.isfile(
            os.path.join(str(run.resume), "trainer_state.pt")):
        raise ValueError(f"{path}: resume {run.resume!r} is not a dlmkern checkpoint directory")
    if run.tokenizer not in (None, "char") and not os.path.isdir(str(run.tokenizer)):
        raise ValueError(f"{path}: tokenizer {run.tokenizer!r} is neither 'char' nor a directory")
    if run.algo != "sft":
        try:
            resolve_reward(run.reward)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return run, cfg


def read_run(path: str, overrides: list[str]):
    """The run file's keys and its algorithm's config (key and type checks, no file system
    checks: `dlmkern plan` needs only the model's config.json). Returns (run, config, the
    trainer keys the file or the overrides set, nested ones as `section.key`)."""
    import yaml

    from dlmkern.trainers import PRESETS, SFTConfig, build_config

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys")
    unknown = set(raw) - RUN_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: {sorted(RUN_KEYS)})")
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
    if run.algo != "sft" and run.algo not in PRESETS:
        raise ValueError(f"{path}: algo must be one of {', '.join([*PRESETS, 'sft'])}, got "
                         f"{run.algo!r}")
    if not isinstance(run.trainer, dict):
        raise ValueError(f"{path}: trainer must be a mapping of config keys")
    # the preset of `algo`, overridden field by field by the `trainer:` section
    cls = SFTConfig if run.algo == "sft" else PRESETS[run.algo]
    cfg = build_config(cls, run.trainer, trainer_over)
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


def resolve_reward(spec: str):
    from dlmkern import rewards

    if spec == "math":
        return rewards.math_reward
    if spec == "code":
        from dlmkern.rewards.sandbox import SandboxUnavailable, require_sandbox

        try:  # found now, not after the first rollout
            require_sandbox()
        except SandboxUnavailable as e:
            raise ValueError(f"reward 'code': {e}") from None
        return rewards.code_reward
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r} cannot be loaded: {e}") from None
        if not callable(f):
            raise ValueError(f"reward {spec!r} is not callable")
        return f
    raise ValueError(f"reward must be math, code or module:function, got {spec!r}")


def make_tokenizer(spec: str):
    """`char` for dlmkern's built-in character tokenizer, else a local tokenizer directory."""
    if spec == "char":
        from dlmkern.data import CharTokenizer

        return CharTokenizer()
    from dlmkern.models import load_tokenizer

    return load_tokenizer(spec)


def check_train_inputs(run, cfg, tok=None):
    """The dataset (loaded once, with the config's column mapping: its rows go to the trainer),
    the columns the trainer or the reward needs, that the prompt format can render every row,
    and the existing_output_dir policy, all before the weights load."""
    from dlmkern.data import PromptFormat, load_dataset
    from dlmkern.trainers.checks import (
        RewardSpec,
        check_output_dir,
        check_reward_columns,
        require_column,
    )

    data = load_dataset(run.dataset, cfg.columns)
    reward = None
    if run.algo == "sft":
        require_column(data, "answer", "SFT")
    else:
        reward = resolve_reward(run.reward)
        check_reward_columns(data, [RewardSpec(reward)])
    if tok is not None:
        PromptFormat.from_config(cfg).check(data, tok)
    check_output_dir(cfg.output_dir, cfg.existing_output_dir, run.resume)
    return data, reward


def cmd_train(args):
    run, cfg = parse_run(args.config, args.overrides)
    from dlmkern.trainers import SFT, RLTrainer

    tok = make_tokenizer(run.tokenizer or run.model)  # before the weights: fails fast
    # the dataset's columns and output_dir as well (the trainers check them again, cheaply)
    data, reward = check_train_inputs(run, cfg, tok)
    from dlmkern.plan.cli import check_before_train

    cfg = check_before_train(args, run, cfg, data, tok)  # on GPUs: memory plan
    # the trainer loads the path onto this rank's device (its GPU under torchrun) in run.dtype
    if run.algo == "sft":
        trainer = SFT(run.model, tok, data, cfg, resume_from=run.resume, dtype=run.dtype)
    else:  # the config is the algorithm
        trainer = RLTrainer(run.model, tok, data, reward, cfg, resume_from=run.resume,
                            dtype=run.dtype)
    from dlmkern.trainers.preemption import Preempted

    try:
        trainer.train()
    except Preempted:  # SIGTERM / SIGUSR1: its checkpoint is written and named on stderr
        return 0


def _load_for_inference(args):
    """The model on --device in --dtype (defaults: this process's GPU in bfloat16 when there is
    one, else the CPU in float32; float32 on CUDA refused before anything loads) and its
    tokenizer (loaded first: a bad path fails before the weights)."""
    import torch

    from dlmkern.distributed import local_device
    from dlmkern.models import load
    from dlmkern.models.io import run_dtype

    device = torch.device(args.device) if args.device else local_device()
    dtype = run_dtype(device, args.dtype, key="--dtype")
    tok = make_tokenizer(args.tokenizer or args.model)
    return load(args.model, dtype=dtype, device=device).eval(), tok


def _sampler(model, tok, args):
    from dlmkern.sampling import BlockSampler, FullSampler, SamplingConfig

    cfg = SamplingConfig(rule=args.rule, steps=args.steps, threshold=args.threshold,
                         entropy_bound=args.entropy_bound, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, confidence=args.confidence,
                         schedule=args.schedule, cfg_scale=args.cfg_scale,
                         steps_total=args.steps_total)
    eos = getattr(tok, "eos_token_id", None)
    if model.config.block_causal:
        return BlockSampler(model, cfg, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    return FullSampler(model, cfg, gen_length=args.max_new_tokens,
                       block_length=min(args.block_length, args.max_new_tokens), eos_token_id=eos)


def cmd_sample(args):
    model, tok = _load_for_inference(args)
    fmt = _prompt_format(args)
    rows = [{"prompt": p} for p in args.prompt]
    trajs = _sampler(model, tok, args).generate([fmt.encode(r, tok) for r in rows],
                                                seed=args.seed)
    for t in trajs:
        print(t.text(tok))


def cmd_eval(args):
    """Math accuracy on a local dataset (prompt or messages, answer; the formats and column
    mapping of training), tokens/s and mean tokens per step."""
    from dlmkern.data import load_dataset
    from dlmkern.rewards import math_reward
    from dlmkern.trainers.checks import require_column

    fmt = _prompt_format(args)
    rows = load_dataset(args.data, _columns(args.column), split=args.split)
    require_column(rows, "answer", "dlmkern eval")
    model, tok = _load_for_inference(args)
    fmt.check(rows, tok)
    t0 = time.perf_counter()
    trajs = _sampler(model, tok, args).generate([fmt.encode(r, tok) for r in rows],
                                                seed=args.seed)
    dt = time.perf_counter() - t0
    comps = [t.text(tok) for t in trajs]
    if args.reward == "exact":
        scores = [float(c.strip() == str(r["answer"])) for c, r in zip(comps, rows, strict=True)]
    else:
        scores = math_reward(None, comps, [str(r["answer"]) for r in rows])
    acc = sum(scores) / len(rows)
    n_tok = sum(len(t.token_ids) for t in trajs)
    n_steps = sum(len(set(t.step_map)) for t in trajs)
    print(json.dumps({"accuracy": acc, "tokens_per_s": n_tok / dt,
                      "tokens_per_step": n_tok / max(n_steps, 1), "samples": len(rows)}))


def _columns(specs) -> dict:
    """--column NAME=SOURCE flags as a column mapping."""
    out = {}
    for spec in specs or []:
        name, sep, src = spec.partition("=")
        if not sep or not name.strip() or not src.strip():
            raise ValueError(f"--column {spec!r} is not NAME=SOURCE (e.g. "
                             "answer=reward_model.ground_truth)")
        out[name.strip()] = src.strip()
    return out


def _prompt_format(args):
    from dlmkern.data import PromptFormat

    chat = {"auto": None, "true": True, "false": False}[args.chat_template]
    return PromptFormat(system_prompt=args.system_prompt, instruction=args.instruction,
                        chat_template=chat, template=args.prompt_template)


def _add_prompt_args(s, with_data: bool):
    g = s.add_argument_group("prompt format and data (as the trainer's config keys)")
    g.add_argument("--system-prompt", default="", help="a system turn before the user turn")
    g.add_argument("--instruction", default="",
                   help="added to the user turn after a newline (or put {prompt} in it)")
    g.add_argument("--chat-template", choices=["auto", "true", "false"], default="auto",
                   help="render prompts with the tokenizer's chat template (auto: when it has "
                   "one)")
    g.add_argument("--prompt-template", default="",
                   help="a whole prompt with {prompt}, instead of the chat template")
    if with_data:
        g.add_argument("--column", action="append", default=[], metavar="NAME=SOURCE",
                       help="column mapping: prompt=question, answer=reward_model.ground_truth "
                       "(dot paths reach nested values); repeatable")
        g.add_argument("--split", default="train",
                       help="split of a save_to_disk DatasetDict directory")


def cmd_demo(args):
    from dlmkern.demo import run_demo

    run_demo(algo=args.algo, seed=args.seed, sft_steps=args.sft_steps, rl_steps=args.rl_steps,
             out_dir=args.out, progress_bar=not args.quiet, compare=args.compare)


def cmd_config(args):
    """Every key of an algorithm's config with its default (the preset's) and help."""
    from dlmkern.trainers import PRESETS, SFTConfig
    from dlmkern.trainers.config import describe

    cls = SFTConfig if args.algo == "sft" else PRESETS[args.algo]
    print(f"# {args.algo}: {' '.join((cls.__doc__ or '').split())}")
    for key, default, text in describe(cls):
        print(f"{key:<26} {default!r:<14} {text}")


def cmd_doctor(args):
    from dlmkern.doctor import run

    return run(args.device, args.only, args.json, args.verbose)


def main(argv=None):
    p = argparse.ArgumentParser(prog="dlmkern", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    doc = sub.add_parser("doctor", help="check this install: ops vs references, sampler, "
                         "trainers (PASS / FAIL table, non-zero exit on failure)")
    doc.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    doc.add_argument("--only", choices=["all", "ops", "e2e"], default="all")
    doc.add_argument("--json", help="also write the results to this JSON file")
    doc.add_argument("--verbose", action="store_true", help="tracebacks of failed checks")
    doc.set_defaults(fn=cmd_doctor)
    d = sub.add_parser("demo", help="SFT on noisy data, then RL with a verifier, on a tiny model; "
                       "nothing downloaded")
    d.add_argument("--algo", choices=["tracerl", "dipo"], default="tracerl")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--sft-steps", type=int, help="default: 800")
    d.add_argument("--rl-steps", type=int, help="default: 80")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--compare", action="store_true",
                   help="also continue SFT from the same checkpoint for the wall time RL took "
                   "(the equal-time control) and print the three accuracies")
    d.set_defaults(fn=cmd_demo)
    from dlmkern.trainers.rl_config import PRESETS

    c = sub.add_parser("config", help="the config keys of an algorithm, its defaults and help "
                       "(a run file's trainer: section overrides them)")
    c.add_argument("algo", nargs="?", default="tracerl", choices=[*PRESETS, "sft"])
    c.set_defaults(fn=cmd_config)
    pl = sub.add_parser("plan", help="memory per GPU and stage of a run file at its real size, "
                        "measured on fake tensors (no GPU, no weights), and the knobs that fit")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key=value (model=DIR: a directory holding "
                    "config.json, e.g. configs/models/TraDo-4B-Instruct)")
    from dlmkern.plan import cli as plan_cli

    plan_cli.add_args(pl)
    pl.set_defaults(fn=plan_cli.command)
    t = sub.add_parser("train", help="train from a YAML run file")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value")
    t.add_argument("--fit", action="store_true", help="on GPUs: let the memory plan set every "
                   "memory knob (micro_batch_tokens, gradient_checkpointing, optimizer_offload, "
                   "sampling.max_seqs), the run file's too")
    t.add_argument("--no-plan", action="store_true", help="skip the memory plan that runs on "
                   "GPUs before the weights load")
    t.set_defaults(fn=cmd_train)
    for name, fn in (("sample", cmd_sample), ("eval", cmd_eval)):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--tokenizer", help="a tokenizer directory, or 'char' (built in)")
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--steps", type=int, default=4, help="denoising steps per block")
        s.add_argument("--rule", default="static",
                       choices=["static", "dynamic", "entropy_bounded", "sequential"])
        s.add_argument("--threshold", type=float, default=0.9, help="dynamic: confidence")
        s.add_argument("--entropy-bound", type=float, default=1.0, help="entropy_bounded")
        s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        s.add_argument("--top-k", type=int, default=0, help="0 = off")
        s.add_argument("--top-p", type=float, default=1.0, help="1 = off")
        s.add_argument("--confidence", default="prob", choices=["prob", "margin", "neg_entropy"],
                       help="what ranks positions: LLaDA low_confidence / Dream maskgit_plus = "
                       "prob, Dream topk_margin = margin, Dream entropy = neg_entropy")
        s.add_argument("--schedule", default="even", choices=["even", "dream"],
                       help="static counts per step: LLaDA's even split or Dream's timesteps")
        s.add_argument("--cfg-scale", type=float, default=0.0,
                       help="LLaDA classifier-free guidance (full-attention models; 0 = off)")
        s.add_argument("--steps-total", type=int, default=0,
                       help="LLaDA's convention: steps over ALL blocks (replaces --steps)")
        s.add_argument("--block-length", type=int, default=32,
                       help="full-attention models: semi-autoregressive block length")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--device", help="default: cuda when available, else cpu")
        s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                       help="default: bfloat16 on cuda, float32 on cpu")
        if name == "sample":
            s.add_argument("--prompt", action="append", required=True)
        else:
            s.add_argument("--data", required=True,
                           help="JSONL, JSON, CSV, parquet or a datasets save_to_disk directory")
            s.add_argument("--reward", choices=["math", "exact"], default="math",
                           help="math: \\boxed{} + math-verify; exact: the whole completion")
        _add_prompt_args(s, with_data=name == "eval")
        s.set_defaults(fn=fn)
    args = p.parse_args(argv)
    try:
        rc = args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dlmkern {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
