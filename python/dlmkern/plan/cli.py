"""`dlmkern plan`'s command line, and the plan `dlmkern train` runs on GPUs before any weight
loads (the logic: dlmkern.plan.command)."""

from __future__ import annotations

import json


def add_args(s) -> None:
    s.add_argument("--gpus", type=int, default=1, help="GPUs per node (torchrun ranks)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU: 80GiB, 141GiB, ...")
    s.add_argument("--prompt-tokens", type=int, default=512,
                   help="prompt length planned for (the longest prompts of the dataset)")
    s.add_argument("--margin", type=float, default=0.08,
                   help="allocator overhead over the tracked peak (fragmentation)")
    s.add_argument("--reserve", default="1.5GiB",
                   help="per GPU, outside tensors: CUDA context, cuBLAS / NCCL workspaces")
    s.add_argument("--host-memory", help="one node's host memory (e.g. 128GiB): an offloaded "
                   "optimizer state must fit it (default: not checked)")
    s.add_argument("--json", help="also write the plan to this JSON file")


def command(args) -> int:
    """Memory per rank and stage of a run file at its real size (no GPU, no weights); exits 1
    when it does not fit."""
    import sys

    from dlmkern.plan.command import PlannerUnavailable, parse_bytes, plan, report

    try:
        p = plan(args.config, args.overrides, gpus=args.gpus, nodes=args.nodes,
                 gpu_memory=parse_bytes(args.gpu_memory), prompt_tokens=args.prompt_tokens,
                 margin=args.margin, reserve=parse_bytes(args.reserve),
                 host_memory=parse_bytes(args.host_memory) if args.host_memory else None)
    except PlannerUnavailable as e:
        print(f"dlmkern plan: error: {e}", file=sys.stderr)
        return 2
    print(report(p))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(p, f, indent=2)
    return 0 if p["fits"] else 1


def check_before_train(args, run, cfg, data, tok):
    """On GPUs, the memory plan before any weight loads (RL algorithms), for the dataset's
    longest prompt: a run that does not fit is refused; the knobs the run file leaves unset
    (sampling.max_seqs, ...) are the plan's (--fit: all of them). Every torchrun rank plans for
    itself (no process group exists yet): a few minutes of one CPU core each."""
    from dlmkern.data import PromptFormat
    from dlmkern.plan import command as plan_command

    gpus = None if args.no_plan or run.offline else plan_command.visible_gpus()
    if gpus is None:
        return cfg
    gpus, nodes, memory = gpus
    fmt = PromptFormat.from_config(cfg)
    longest = max((len(fmt.encode(r, tok)) for r in data), default=1)
    print(f"[dlmkern train] planning memory on {nodes} x {gpus} GPU(s) of "
          f"{memory / 2**30:.0f} GiB for prompts of up to {longest} tokens (dlmkern plan; "
          "--no-plan skips it)", flush=True)
    try:
        cfg, p = plan_command.train_check(args.config, args.overrides, cfg, gpus, nodes, memory,
                                          free=args.fit, prompt_tokens=longest)
    except plan_command.PlannerUnavailable as e:  # never block training on a torch version
        print(f"[dlmkern train] WARNING: no memory plan ({e}); training unchecked", flush=True)
        return cfg
    knobs = ", ".join(f"{k}={v}" for k, v in p["fitted_trainer"].items())
    print(f"[dlmkern train] fits: peak {p['per_rank_peak_bytes'] / 2**30:.1f} GiB per GPU "
          f"with {knobs}", flush=True)
    return cfg
