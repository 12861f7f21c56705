"""dlmkern: RL post-training for diffusion language models. Start with `dlmkern demo`; train
from a run file with `dlmkern train`, then `dlmkern eval` and `dlmkern sample` the model."""

from __future__ import annotations

import argparse
import json
import sys

from dlmkern.runfile import (  # noqa: F401 - the run file's API, long imported from here
    RunFile,
    check_train_inputs,
    keys_help,
    parse_run,
    read_run,
)


def make_tokenizer(spec: str):
    """`char` for dlmkern's built-in character tokenizer, else a local tokenizer directory."""
    if spec == "char":
        from dlmkern.data import CharTokenizer

        return CharTokenizer()
    from dlmkern.models import load_tokenizer

    return load_tokenizer(spec)


def cmd_train(args):
    run, cfg = parse_run(args.config, args.overrides)
    from dlmkern import distributed
    from dlmkern.run_layout import find_model, finished_lines, resume_command
    from dlmkern.trainers import OFFLINE, RLTrainer

    if run.tokenizer is None:  # the model's own: found first
        run.model = find_model(run.model, "model")  # a run or checkpoint directory: its model
    tok = make_tokenizer(run.tokenizer or run.model)  # before the weights: fails fast
    # the dataset's columns and output_dir as well (the trainers check them again, cheaply)
    data, reward = check_train_inputs(run, cfg, tok)
    run.model = find_model(run.model, "model")
    _check_vocabulary(tok, run.tokenizer or run.model, run.model)
    from dlmkern.plan.cli import check_before_train

    cfg = check_before_train(args, run, cfg, data, tok)  # on GPUs: memory plan
    # the trainer loads the path onto this rank's device (its GPU under torchrun) in run.dtype
    if run.offline:  # SFT, VRPO
        trainer = OFFLINE[run.algo](run.model, tok, data, cfg, resume_from=run.resume,
                                    dtype=run.dtype, eval_dataset=run.eval_dataset,
                                    eval_reward=run.reward_spec)
    else:  # the config is the algorithm
        trainer = RLTrainer(run.model, tok, data, reward, cfg, resume_from=run.resume,
                            dtype=run.dtype, eval_dataset=run.eval_dataset)
    from dlmkern.trainers.preemption import Preempted

    flags = ["--fit"] * args.fit + ["--no-plan"] * args.no_plan
    trainer.resume_command = resume_command(args.config, [*args.overrides, *flags],
                                            run.resume is not None, distributed.enabled())
    try:
        trainer.train()
    except Preempted as stop:  # a signal: its checkpoint and the resume command on stderr
        return stop.code
    if distributed.rank() == 0:
        print("\n".join(finished_lines(cfg.output_dir, cfg, run.dataset, data[0]["prompt"],
                                       run.reward_spec, run.tokenizer, run.eval_dataset)))


def _check_vocabulary(tok, tok_name: str, model: str) -> None:
    """The tokenizer's ids fit the model directory's vocabulary (its config.json)."""
    import os

    from dlmkern.data.checks import check_vocabulary
    from dlmkern.models.io import load_config

    check_vocabulary(tok, load_config(model), f"tokenizer {tok_name}",
                     os.path.join(model, "config.json"))


def _load_for_inference(args):
    """The model on --device in --dtype (defaults: this process's GPU in bfloat16 when there is
    one, else the CPU in float32; float32 on CUDA refused before anything loads) and its
    tokenizer (loaded first: a bad path fails before the weights)."""
    from dlmkern.distributed import check_device, local_device, parse_device
    from dlmkern.models import load
    from dlmkern.models.io import run_dtype
    from dlmkern.run_layout import find_model

    device = parse_device(args.device, "--device") if args.device else local_device()
    dtype = run_dtype(device, args.dtype, key="--dtype")
    check_device(device, "--device")  # a GPU this machine has
    path = find_model(args.model)  # a run or checkpoint directory: the model inside it
    tok = make_tokenizer(args.tokenizer or path)
    _check_vocabulary(tok, args.tokenizer or path, path)
    return load(path, dtype=dtype, device=device).eval(), tok


def _generation(args):
    from dlmkern.evaluate import Generation
    from dlmkern.sampling import SamplingConfig

    cfg = SamplingConfig(rule=args.rule, steps=args.steps, threshold=args.threshold,
                         entropy_bound=args.entropy_bound, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, confidence=args.confidence,
                         schedule=args.schedule, cfg_scale=args.cfg_scale,
                         steps_total=args.steps_total)
    return Generation(cfg, args.max_new_tokens, args.block_length)


def _sampler(model, tok, args):
    return _generation(args).sampler(model, getattr(tok, "eos_token_id", None))


def cmd_sample(args):
    model, tok = _load_for_inference(args)
    fmt = _prompt_format(args)
    rows = [{"prompt": p} for p in args.prompt]
    trajs = _sampler(model, tok, args).generate([fmt.encode(r, tok) for r in rows],
                                                seed=args.seed)
    for t in trajs:
        print(t.text(tok))


def cmd_eval(args):
    """Accuracy (the mean score of --reward) on a local dataset (prompt or messages, answer; the
    formats and column mapping of training), tokens/s and mean tokens per step: JSON on stdout;
    the reward used and the first completions beside their answers on stderr."""
    from dlmkern.data import load_dataset
    from dlmkern.evaluate import evaluate, report
    from dlmkern.rewards import get_reward
    from dlmkern.trainers.checks import RewardSpec, check_reward_columns

    fmt = _prompt_format(args)
    rows = load_dataset(args.data, _columns(args.column), split=args.split)
    check_reward_columns(rows, [RewardSpec(get_reward(args.reward))])  # before the weights
    model, tok = _load_for_inference(args)
    fmt.check(rows, tok)
    result = evaluate(model, tok, rows, args.reward, _generation(args), fmt, seed=args.seed)
    for line in report(result, rows):
        print(f"[eval] {line}", file=sys.stderr)
    print(json.dumps(result.summary()))


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
    if args.algo == "vrpo":  # offline: pairs from the SFT model, then VRPO from it
        from dlmkern.demo_vrpo import run_vrpo_demo

        run_vrpo_demo(args.out, args.seed, args.rl_steps, progress_bar=not args.quiet)
        return
    from dlmkern.demo import run_demo

    run_demo(algo=args.algo, seed=args.seed, sft_steps=args.sft_steps, rl_steps=args.rl_steps,
             out_dir=args.out, progress_bar=not args.quiet, compare=args.compare)


def cmd_compare(args):
    """The run file's task under each of --algos with equal rollout budgets (dlmkern.compare)."""
    from dlmkern.compare import compare, default_algos, parse_algos

    algos = parse_algos(args.algos or ",".join(default_algos()))  # refused before any work
    overrides = list(args.overrides)
    if args.demo:  # no run file: the demo's, written (and its SFT trained) when needed
        from dlmkern.demo import compare_task

        if args.config and "=" not in args.config:
            raise ValueError(f"--demo writes its own run file: drop {args.config!r} or --demo")
        overrides = [args.config, *overrides] if args.config else overrides
        args.config = compare_task(args.demo_out, progress_bar=not args.quiet)
    elif not args.config:
        raise ValueError("give a run file (RUN_FILE) or --demo")
    out = args.out or (f"{args.demo_out}/compare" if args.demo else
                       f"runs/compare/{_stem(args.config)}")
    compare(args.config, overrides, algos, args.seeds, out, progress_bar=not args.quiet)


def _stem(path: str) -> str:
    import os

    return os.path.splitext(os.path.basename(path))[0]


def cmd_config(args):
    """Every key of an algorithm's config with its default (the preset's) and help."""
    from dlmkern.trainers import OFFLINE, PRESETS
    from dlmkern.trainers.config import describe

    cls = OFFLINE[args.algo].config_class if args.algo in OFFLINE else PRESETS[args.algo]
    print(f"# {args.algo}: {' '.join((cls.__doc__ or '').split())}")
    for key, default, text in describe(cls):
        print(f"{key:<26} {default!r:<14} {text}")


def cmd_export(args):
    """A LoRA adapter merged into its base model, written as a Hugging Face directory."""
    from dlmkern.models.lora_io import merge_export

    if not args.merge:
        raise ValueError("export writes merged weights only: add --merge (the adapter "
                         "directory itself is already the PEFT export)")
    base = merge_export(args.adapter, args.out, args.base)
    print(f"wrote {args.out}: {base} with the adapters of {args.adapter} merged")


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
    d.add_argument("--algo", choices=["tracerl", "dipo", "vrpo"], default="tracerl",
                   help="vrpo: preference pairs from the SFT model's own wrong samples, then "
                   "VRPO from the SFT checkpoint in --out/sft (reused when there)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--sft-steps", type=int, help="default: 800")
    d.add_argument("--rl-steps", type=int, help="default: 80 (vrpo: 60 VRPO steps)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--compare", action="store_true",
                   help="also continue SFT from the same checkpoint for the wall time RL took "
                   "(the equal-time control) and print the three accuracies")
    d.set_defaults(fn=cmd_demo)
    from dlmkern.compare import default_algos
    from dlmkern.trainers.presets import PRESETS

    cmp_ = sub.add_parser(
        "compare", help="train one task under several algorithms with equal rollout budgets: "
        "a table (held-out accuracy, reward, wall time, tokens) and a plot",
        description="Runs the run file's task under each algorithm (preset) from the same "
        "model, with the same steps, prompts per step, completions per prompt, completion "
        "length and sampling; each algorithm keeps its preset's own keys. Writes table.md, "
        "table.json and compare.png (held-out accuracy against wall time) in --out.")
    cmp_.add_argument("config", nargs="?", help="the run file (as dlmkern train's; its "
                      "eval_dataset is required, its algo is replaced by each of --algos)")
    cmp_.add_argument("overrides", nargs="*", help="key=value, as for dlmkern train, applied "
                      "to every algorithm")
    cmp_.add_argument("--algos", help=f"comma-separated presets (default: every preset "
                      f"whose sampling is the run's: {','.join(default_algos())})")
    cmp_.add_argument("--seeds", type=int, default=1, help="runs per algorithm: the run "
                      "file's seed, seed + 1, ... (default 1)")
    cmp_.add_argument("--out", help="default: runs/compare/<run file name>; --demo: "
                      "<--demo-out>/compare")
    cmp_.add_argument("--demo", action="store_true", help="the embedded demo's task from its "
                      "SFT checkpoint (runs/demo/sft, trained first when missing)")
    cmp_.add_argument("--demo-out", default="runs/demo", help="--demo: the demo's directory")
    cmp_.add_argument("--quiet", action="store_true")
    cmp_.set_defaults(fn=cmd_compare)
    c = sub.add_parser("config", help="the config keys of an algorithm, its defaults and help "
                       "(a run file's trainer: section overrides them)")
    c.add_argument("algo", nargs="?", default="tracerl",
                   choices=[*PRESETS, "sft", "vrpo"])
    c.set_defaults(fn=cmd_config)
    pl = sub.add_parser("plan", help="memory per GPU and stage of a run file at its real size, "
                        "measured on fake tensors (no GPU, no weights), and the knobs that fit")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key=value (model=DIR: a directory holding "
                    "config.json, e.g. configs/models/TraDo-4B-Instruct)")
    from dlmkern.plan import cli as plan_cli

    plan_cli.add_args(pl)
    pl.set_defaults(fn=plan_cli.command)
    ex = sub.add_parser("export", help="merge a LoRA adapter (PEFT format: a run's "
                        "checkpoint or its adapter/) into its base model: full weights in the "
                        "base's dtype, a Hugging Face directory")
    ex.add_argument("adapter", help="a PEFT adapter directory (adapter_config.json), or a "
                    "checkpoint holding adapter/")
    ex.add_argument("--out", required=True, help="the merged model's directory")
    ex.add_argument("--base", help="the base model directory (default: the adapter's "
                    "base_model_name_or_path)")
    ex.add_argument("--merge", action="store_true", help="write W + s B A for every adapted "
                    "layer (required: the only export there is)")
    ex.set_defaults(fn=cmd_export)
    t = sub.add_parser("train", help="train from a YAML run file (RL, SFT or VRPO)",
                       description="Train from a YAML run file (RL, SFT or VRPO).",
                       epilog=keys_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="the run file (YAML; its keys are listed below)")
    t.add_argument("overrides", nargs="*", help="key=value: a run file key (model=DIR) or a "
                   "trainer key (lr=1e-6, sampling.steps=4)")
    t.add_argument("--fit", action="store_true", help="on GPUs: let the memory plan set every "
                   "memory knob (micro_batch_tokens, gradient_checkpointing, optimizer_offload, "
                   "sampling.max_seqs), the run file's too")
    t.add_argument("--no-plan", action="store_true", help="skip the memory plan that runs on "
                   "GPUs before the weights load")
    t.set_defaults(fn=cmd_train)
    summaries = {"sample": "complete prompts with a trained model",
                 "eval": "score a model on a dataset (accuracy by a reward, tokens/s); shows "
                 "the first completions beside their answers"}
    for name, fn in (("sample", cmd_sample), ("eval", cmd_eval)):
        s = sub.add_parser(name, help=summaries[name], description=summaries[name])
        s.add_argument("--model", required=True, help="a Hugging Face model directory")
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
            s.add_argument("--prompt", action="append", required=True,
                           help="a prompt to complete; repeatable")
        else:
            s.add_argument("--data", required=True,
                           help="JSONL, JSON, CSV, parquet or a datasets save_to_disk directory")
            s.add_argument("--reward", default="math",
                           help="math (the last \\boxed{} checked with math-verify), exact (the "
                           "whole completion equals the answer), code, path/to/file.py:function "
                           "or module:function (default: math)")
        _add_prompt_args(s, with_data=name == "eval")
        s.set_defaults(fn=fn)
    args = p.parse_args(argv)
    try:
        rc = args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dlmkern {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train: a second Ctrl-C (the first one saves a checkpoint)
        saved = ": nothing saved since the last checkpoint" if args.cmd == "train" else ""
        print(f"dlmkern {args.cmd}: stopped at once by Ctrl-C{saved}", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
