"""dlmkern plan against a real GPU: one TraceRL step of the smallest recipe's model (TraDo-4B
shape, random bf16 weights, no value model) at a reduced batch, its measured peaks
(torch.cuda.max_memory_allocated) beside the plan's, stage group by stage group: resident state,
rollout, update. The plan is made on the CPU beforehand (--expect, minutes on 2 cores) and read
from bench/results/plan_expected_gpu.json, so the lease spends its time on the real step only.

    .venv/bin/python bench/bench_plan_gpu.py --expect          # here: writes the expectation
    python bench/bench_plan_gpu.py --quick --device cuda        # in the lease (gpu_check.sh)
    .venv/bin/python bench/bench_plan_gpu.py --tiny             # the plumbing on a CPU
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXPECTED = os.path.join(os.path.dirname(__file__), "results", "plan_expected_gpu.json")
# one pass per step (micro_batch_tokens 0: no fp32 gradient sums): the plan puts this step at
# 64 GiB, inside an 80 GB H100 (4096-token micro-batches would need 76 GiB)
TRAINER = dict(prompts_per_step=4, group_size=2, max_new_tokens=64, micro_batch_tokens=0,
               gradient_checkpointing=True, progress_bar=False)
SIZES = {"default": {"model": "TraDo-4B-Instruct", "prompt_tokens": 256},
         "quick": {"model": "TraDo-4B-Instruct", "prompt_tokens": 256},
         # the CPU dry run's plumbing: 16 new tokens keep it inside gpu_check's 40 s box
         "tiny": {"model": "tiny", "prompt_tokens": 16, "max_new_tokens": 16}}


def _config(cfg_sizes):
    from dlmkern.models.config import tiny_config
    from dlmkern.models.io import load_config
    from dlmkern.sampling import SamplingConfig
    from dlmkern.trainers import TraceRLConfig

    mc = tiny_config("sdar", vocab_size=512) if cfg_sizes["model"] == "tiny" else \
        load_config(os.path.join(ROOT, "configs", "models", cfg_sizes["model"]))
    sampling = SamplingConfig(rule="sequential", steps=4, temperature=1.0, max_seqs=8)
    trainer = {**TRAINER, "max_new_tokens": cfg_sizes.get("max_new_tokens",
                                                        TRAINER["max_new_tokens"])}
    return mc, TraceRLConfig(**trainer, sampling=sampling, pass_rate_low=0.0, pass_rate_high=1.0)


def _groups(stages: dict) -> dict:
    """The plan's stages grouped as the GPU measures them (peaks of one rank, bytes)."""
    peak = lambda names: max(stages[n]["total"] for n in names if n in stages)  # noqa: E731
    return {"resident": stages["load"]["total"],
            "rollout": peak(["rollout_prefill", "rollout_blocks"]),
            "update": peak(["rows", "old_logp", "update_forward", "update_backward",
                            "optimizer_step"])}


def expect(cfg_sizes) -> dict:
    from dlmkern.plan import PlannedRun

    mc, cfg = _config(cfg_sizes)
    with PlannedRun(mc, cfg, prompt_tokens=cfg_sizes["prompt_tokens"]) as run:
        stages = {**run.load(), **run.rollout(cfg.sampling.max_seqs),
                  **run.update(cfg.micro_batch_tokens, cfg.gradient_checkpointing)}
    return {"model": cfg_sizes["model"], "torch": torch.__version__, **_groups(stages)}


def measure(cfg_sizes, device: str) -> dict:
    """The real step's peaks: on CUDA from the allocator; on a CPU (the dry run) from the same
    tracker the plan uses, on real tensors."""
    import tempfile

    from dlmkern.models import DiffusionLM
    from dlmkern.plan.step import run_tracked, tracked, trainer_inputs
    from dlmkern.trainers.rl import RLTrainer
    from dlmkern.trainers.rollout import collect

    mc, cfg = _config(cfg_sizes)
    with tempfile.TemporaryDirectory() as out:
        cfg.output_dir = out
        with torch.device(device):
            model = DiffusionLM(mc).to(torch.bfloat16)
        t = RLTrainer(model, *trainer_inputs(cfg, cfg_sizes["prompt_tokens"]), cfg)
        t.train_step()  # the optimizer state exists from here on (the plan's steady state)
        if device != "cuda":
            load = {"load": tracked(t).current()}
            return _groups({**load, **run_tracked(t, t.train_step).stages})
        torch.cuda.synchronize()
        out = {"resident": torch.cuda.memory_allocated(),
               "resident_reserved": torch.cuda.memory_reserved()}
        torch.cuda.reset_peak_memory_stats()
        kept = collect(t)[0]
        torch.cuda.synchronize()  # a graph pool's freed blocks count as reserved only
        out.update(rollout=torch.cuda.max_memory_allocated(),
                   rollout_reserved=torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()
        positions, n_global = kept.positions()
        t.update(kept.trajs, kept.advantages, kept.rewards, positions=positions,
                 n_global=n_global)
        torch.cuda.synchronize()
        out.update(update=torch.cuda.max_memory_allocated(),
                   update_reserved=torch.cuda.max_memory_reserved())
        return out


def main():
    args, cfg_sizes = common.parse(__doc__, SIZES, lambda p: p.add_argument(
        "--expect", action="store_true", help="make the plan's expectation (CPU) and save it"))
    if args.expect:
        e = expect(cfg_sizes)
        with open(EXPECTED, "w") as f:
            json.dump(e, f, indent=2)
        print(json.dumps(e))
        return
    t0 = time.perf_counter()
    want = expect(cfg_sizes) if cfg_sizes["model"] == "tiny" else json.load(open(EXPECTED))
    got = measure(cfg_sizes, args.device)
    secs = time.perf_counter() - t0
    rows, shape = [], {"model": cfg_sizes["model"], **TRAINER, "dtype": "bfloat16",
                       "max_new_tokens": cfg_sizes.get("max_new_tokens", TRAINER["max_new_tokens"])}
    shape = {k: v for k, v in shape.items() if k != "progress_bar"}
    timing = common.Timing(secs, secs, secs)
    for group in ("resident", "rollout", "update"):
        ratio = got[group] / max(want[group], 1)
        reserved = got.get(f"{group}_reserved")
        print(f"{group:<9} plan {want[group] / 2**30:8.2f} GiB   {args.device} allocated "
              f"{got[group] / 2**30:8.2f} GiB (measured / plan {ratio:.3f})" +
              ("" if reserved is None else f", reserved {reserved / 2**30:.2f} GiB"))
        measured = [("plan", want[group]), (args.device, got[group])]
        if reserved is not None:
            measured.append((f"{args.device}_reserved", reserved))
        rows += [common.make_row("plan_vs_device", {**shape, "group": group}, prov, timing,
                                 args.device, peak_bytes=int(v)) for prov, v in measured]
    if not args.no_save:
        common.write_rows(rows)


if __name__ == "__main__":
    main()
