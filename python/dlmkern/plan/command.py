"""`dlmkern plan RUN_FILE`: a recipe's memory per rank and stage at its real size, the knobs that
make it fit the GPUs, the disk of a checkpoint; and the check `dlmkern train` runs before any
weight loads."""

from __future__ import annotations

import dataclasses
import json
import os
import re

from dlmkern.plan.fit import MARGIN, RESERVE, Budget, GiB, fit

KNOB_KEYS = {"max_seqs": "sampling.max_seqs", "micro_batch_tokens": "micro_batch_tokens",
             "gradient_checkpointing": "gradient_checkpointing",
             "optimizer_offload": "optimizer_offload", "offload_grad_sums": "offload_grad_sums"}
# one math-reward worker's resident memory: 58 MiB RSS measured after 40 math-verify calls
# (2026-12-07, this machine), rounded up
REWARD_WORKER_BYTES = 64 * 2**20


class PlannerUnavailable(RuntimeError):
    """This torch lacks the memory-tracker internals the plan relies on (dlmkern.plan.tracker)."""


def _planner():
    """PlannedRun, once this torch is known to have what the plan needs."""
    try:
        from dlmkern.plan.step import PlannedRun
        from dlmkern.plan.tracker import StageTracker

        StageTracker()  # checks the internals it uses
    except (ImportError, RuntimeError) as e:
        import torch

        raise PlannerUnavailable(f"dlmkern plan cannot run on torch {torch.__version__}: "
                                 f"{e}") from e
    return PlannedRun


def parse_bytes(text: str) -> int:
    """'80GiB' or '80G' (binary), '141GB' (decimal), '1.5TiB', or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?)(B?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"a memory size like 80GiB or 141GB, got {text!r}")
    value, unit, binary, b = float(m.group(1)), m.group(2), m.group(3), m.group(4)
    if not unit:
        return int(value)
    return int(value * (1000 if b and not binary else 1024) ** " KMGT".index(unit))


def model_config_of(run, run_path: str):
    """The run's model config from `model`/config.json alone (no weights read)."""
    from dlmkern.models.io import load_config

    cfg_json = os.path.join(str(run.model), "config.json")
    if not os.path.isfile(cfg_json):
        raise ValueError(f"{run_path}: model {run.model!r} has no config.json (dlmkern plan "
                         "reads only that file: point model= at a directory holding it, e.g. "
                         "configs/models/TraDo-4B-Instruct)")
    return load_config(str(run.model))


def plan(run_path: str, overrides: list[str] | None = None, gpus: int = 1, nodes: int = 1,
         gpu_memory: int = 80 * GiB, prompt_tokens: int = 512, margin: float = MARGIN,
         reserve: int = RESERVE, free: bool = False, host_memory: int | None = None) -> dict:
    """The plan of a run file on `nodes` x `gpus` GPUs of `gpu_memory` bytes (the JSON object
    `dlmkern plan --json` writes). `free`: every memory knob may change, the run file's too."""
    import torch

    from dlmkern.cli import read_run
    from dlmkern.trainers.checkpoint import checkpoint_bytes

    PlannedRun = _planner()

    run, cfg, given = read_run(run_path, list(overrides or []))
    if run.offline:
        raise ValueError(f"{run_path}: dlmkern plan covers the RL algorithms; {run.algo} is "
                         "not planned yet")
    mc = model_config_of(run, run_path)
    ranks = gpus * nodes
    fixed = {} if free else {k: _knob(cfg, key) for k, key in KNOB_KEYS.items() if key in given}
    if fixed.get("max_seqs") == 0:
        fixed.pop("max_seqs")  # 0: the plan's choice
    local_seqs = -(-cfg.prompts_per_step // ranks) * cfg.group_size
    budget = Budget(gpu_memory, reserve, margin, host_memory, gpus)
    dtype = getattr(torch, run.dtype or "bfloat16")
    with PlannedRun(mc, cfg, ranks, prompt_tokens, dtype) as prun:
        result = fit(prun, budget, fixed, local_seqs)
        ckpt = checkpoint_bytes(prun.trainer.model, prun.trainer.value_model,
                                prun.trainer.ref_model, save_optimizer=cfg.save_optimizer)
        params, host_opt = prun.params, prun.host_bytes
    result.stages["checkpoint"] = _checkpoint_stage(result.stages["load"], mc, dtype)
    if result.fits and result.stages["checkpoint"]["total"] > budget.usable:
        result.fits, result.failing = False, "checkpoint"
    peak = max(v["total"] for v in result.stages.values())
    knobs = dataclasses.asdict(result.knobs)
    return {
        "run_file": run_path, "model": str(run.model), "algo": run.algo, "fits": result.fits,
        "gpus": ranks, "nodes": nodes, "gpu_memory_bytes": gpu_memory,
        "usable_bytes": budget.usable, "margin": margin, "reserve_bytes": reserve,
        "per_rank_peak_bytes": peak,
        "per_rank_with_overhead_bytes": int(peak * (1 + margin)) + reserve,
        "failing_stage": result.failing, "stages": result.stages, "knobs": knobs,
        "knobs_from_run_file": sorted(fixed), "checkpoint_bytes": ckpt,
        "checkpoints_at_once": _at_once(cfg), "params": params,
        "prompt_tokens": prompt_tokens, "local_sequences": local_seqs,
        "host_memory_bytes": host_memory,
        "host": {"optimizer_state_bytes": host_opt,
                 "reward_workers_per_rank": _workers(gpus),
                 "reward_workers_bytes": _workers(gpus) * REWARD_WORKER_BYTES},
        "fitted_trainer": {KNOB_KEYS[k]: v for k, v in knobs.items()},
    }


def _checkpoint_stage(load: dict, mc, dtype) -> dict:
    """dlmkern's own accounting (a save cannot run on fake tensors): what is resident, plus one
    parameter gathered whole at a time (the Hugging Face export gathers the full state to the
    host parameter by parameter; the sharded dcp state is written from the shards)."""
    import torch

    largest = mc.vocab_size * mc.hidden_size * torch.finfo(dtype).bits // 8
    return {**load, "temporaries": load.get("temporaries", 0) + largest,
            "total": load["total"] + largest}


def _knob(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _at_once(cfg) -> int:
    from dlmkern.trainers.checkpoint import checkpoints_at_once

    saves = cfg.total_steps // cfg.save_every if cfg.save_every else 0
    return checkpoints_at_once(cfg.keep_last, saves)


def _workers(gpus: int) -> int:
    """Reward workers of one rank when this machine's CPUs serve `gpus` ranks (the pool's own
    sizing with LOCAL_WORLD_SIZE = gpus)."""
    from dlmkern.rewards.pool import reward_workers

    old = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(max(gpus, 1))
    try:
        return reward_workers()
    finally:
        if old is None:
            os.environ.pop("LOCAL_WORLD_SIZE")
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old


def report(p: dict) -> str:
    """The plan as text: stages by category (GiB, one rank), knobs, disk."""
    cats = ["params", "grads", "optimizer", "activations", "temporaries", "kv_cache",
            "graph_pool"]
    lines = [f"{p['run_file']}: {p['algo']} on {p['model']} ({_params(p['params'])}), "
             f"{p['nodes']} x {p['gpus'] // p['nodes']} GPU(s) of {p['gpu_memory_bytes'] / GiB:.0f}"
             f" GiB, prompts of {p['prompt_tokens']} tokens, {p['local_sequences']} sequences "
             "per rank",
             f"{'stage (GiB per rank)':<18}" + "".join(f"{c:>12}" for c in cats) + f"{'total':>9}"]
    for stage, v in p["stages"].items():
        lines.append(f"{stage:<18}" + "".join(f"{v.get(c, 0) / GiB:>12.2f}" for c in cats) +
                     f"{v['total'] / GiB:>9.2f}")
    lines.append(f"peak {p['per_rank_peak_bytes'] / GiB:.2f} GiB per rank; with the allocator "
                 f"margin ({p['margin']:.0%}) and {p['reserve_bytes'] / GiB:.1f} GiB reserved "
                 f"(CUDA context, workspaces): {p['per_rank_with_overhead_bytes'] / GiB:.2f} of "
                 f"{p['gpu_memory_bytes'] / GiB:.0f} GiB")
    lines.append("knobs: " + ", ".join(f"{KNOB_KEYS[k]}={v}" for k, v in p["knobs"].items()) +
                 (f" (from the run file: {', '.join(p['knobs_from_run_file'])})"
                  if p["knobs_from_run_file"] else ""))
    lines.append(f"checkpoint: {p['checkpoint_bytes'] / GiB:.1f} GiB on disk each, "
                 f"{p['checkpoints_at_once']} at once; host memory per rank: optimizer "
                 f"state {p['host']['optimizer_state_bytes'] / GiB:.1f} GiB, "
                 f"{p['host']['reward_workers_per_rank']} reward worker(s) "
                 f"{p['host']['reward_workers_bytes'] / GiB:.1f} GiB")
    if p["fits"]:
        lines.append("FITS. The fitted trainer keys (a run file's trainer: section):")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in p["fitted_trainer"].items()]
    else:
        lines.append(_refusal(p))
    return "\n".join(lines)


def _refusal(p: dict) -> str:
    failing = p["failing_stage"]
    if failing not in p["stages"]:  # the host: an offloaded optimizer state
        host = p["host"]["optimizer_state_bytes"] * p["gpus"] // p["nodes"]
        return (f"DOES NOT FIT: {failing} needs {host / GiB:.1f} GiB of host memory per node "
                f"(state and fp32 gradient sums) of {p['host_memory_bytes'] / GiB:.0f} GiB "
                "(more nodes, or more GPUs per node without optimizer_offload)")
    st = p["stages"][failing]["total"]
    return (f"DOES NOT FIT: stage {failing} needs {st / GiB:.2f} GiB per rank with the "
            f"smallest knobs tried; the budget is {p['usable_bytes'] / GiB:.2f} GiB (more GPUs, "
            "optimizer_offload, or a shorter max_new_tokens)")


def _params(params: dict) -> str:
    return ", ".join(f"{k} {v / 1e9:.2f}B" for k, v in params.items())


def train_check(run_path: str, overrides: list[str], cfg, gpus: int, nodes: int,
                gpu_memory: int, free: bool = False, prompt_tokens: int = 512):
    """`dlmkern train`'s check before any weight loads: the plan on the GPUs it runs on. Returns
    `cfg` with the plan's knobs (those the run file leaves unset, or all of them with `free`);
    a run that does not fit is refused with the plan's report."""
    p = plan(run_path, overrides, gpus=gpus, nodes=nodes, gpu_memory=gpu_memory, free=free,
             prompt_tokens=prompt_tokens, host_memory=host_memory())
    if not p["fits"]:
        raise ValueError(f"the run does not fit these GPUs (dlmkern plan, before any weight "
                         f"loads; --fit lets it change the run file's memory knobs too, "
                         f"--no-plan skips the check):\n{report(p)}")
    k = p["knobs"]
    cfg.sampling = dataclasses.replace(cfg.sampling, max_seqs=k["max_seqs"])
    cfg.micro_batch_tokens = k["micro_batch_tokens"]
    cfg.gradient_checkpointing = k["gradient_checkpointing"]
    cfg.optimizer_offload = k["optimizer_offload"]
    cfg.offload_grad_sums = k["offload_grad_sums"]
    return cfg, p


def visible_gpus():
    """(GPUs per node, nodes, memory of one GPU) of this torchrun job, from its variables and
    this rank's GPU; None without CUDA (the CPU has no fixed budget: no plan)."""
    import torch

    from dlmkern.distributed import local_device

    if not torch.cuda.is_available():
        return None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    memory = torch.cuda.get_device_properties(local_device()).total_memory
    return local, max(1, world // max(local, 1)), memory


def host_memory() -> int:
    """This machine's memory (bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
