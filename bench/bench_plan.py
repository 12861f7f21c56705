"""dlmkern plan on the recipes at their real size (no GPU needed): per recipe and GPU setup, the
planned peak of every stage (one row each, peak_mib = that stage's peak per rank, p50_ms = the
plan's wall time here), and the rollout's KV cache with every sequence of a rank at once
("unchunked") against the fitted chunk ("chunked"). Rows of the one bench schema.

    .venv/bin/python bench/bench_plan.py            # the 3 recipes x 1x80, 1x141, 8x80 GiB
    .venv/bin/python bench/bench_plan.py --tiny     # a small recipe (seconds; the dry run)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

GiB = 2**30
RECIPES = "trado4b_tracerl_value:TraDo-4B-Instruct,sdar8b_dipo:SDAR-8B-Chat," \
          "llada_tracerl:LLaDA-8B-Instruct"
SIZES = {
    "default": {"recipes": RECIPES, "setups": "1x80,1x141,8x80", "prompt_tokens": 512},
    "quick": {"recipes": RECIPES, "setups": "8x80", "prompt_tokens": 512},
    "tiny": {"recipes": "tiny", "setups": "1x80,2x80", "prompt_tokens": 16},
}
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _tiny_recipe(tmp: str) -> tuple[str, str]:
    from dlmkern.models import DiffusionLM
    from dlmkern.models.config import tiny_config
    from dlmkern.models.io import save_pretrained

    model = os.path.join(tmp, "model")
    save_pretrained(DiffusionLM(tiny_config("sdar", vocab_size=512, num_layers=2)), model)
    run = os.path.join(tmp, "tiny.yaml")
    with open(run, "w") as f:
        f.write("algo: tracerl\nmodel: m\ndataset: d\ntrainer:\n  prompts_per_step: 4\n"
                "  group_size: 2\n  max_new_tokens: 16\n  use_value_model: true\n"
                "  micro_batch_tokens: 128\n")
    return run, model


def _rows(p: dict, name: str, setup: str, seconds: float, kv_all: int) -> list[dict]:
    shape = {"recipe": name, "gpus": p["gpus"], "gpu_gib": round(p["gpu_memory_bytes"] / GiB),
             "prompt_tokens": p["prompt_tokens"], "max_seqs": p["knobs"]["max_seqs"],
             "micro_batch_tokens": p["knobs"]["micro_batch_tokens"],
             "offload": p["knobs"]["optimizer_offload"], "fits": p["fits"], "dtype": "bfloat16"}
    t = common.Timing(seconds, seconds, seconds)
    rows = [common.make_row("plan_stage", {**shape, "stage": s}, "dlmkern_plan", t, "cpu",
                            peak_bytes=v["total"]) for s, v in p["stages"].items()]
    kv = p["stages"].get("rollout_blocks", {}).get("kv_cache", 0)
    seqs = p["local_sequences"]
    rows += [common.make_row("plan_rollout_kv", {**shape, "sequences": n}, prov, t, "cpu",
                             peak_bytes=b)
             for prov, n, b in (("unchunked", seqs, kv_all), ("chunked", shape["max_seqs"], kv))]
    return rows


def main():
    args, cfg = common.parse(__doc__, SIZES)
    from dlmkern.plan.command import plan, report
    from dlmkern.plan.step import PlannedRun

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipes = []
        for item in cfg["recipes"].split(","):
            if item == "tiny":
                run, model = _tiny_recipe(tmp)
                recipes.append(("tiny", run, model))
            else:
                name, model = item.split(":")
                recipes.append((name, os.path.join(ROOT, "configs", f"{name}.yaml"),
                                os.path.join(ROOT, "configs", "models", model)))
        for name, run, model in recipes:
            for setup in cfg["setups"].split(","):
                gpus, mem = (int(x) for x in setup.split("x"))
                t0 = time.perf_counter()
                p = plan(run, [f"model={model}"], gpus=gpus, gpu_memory=mem * GiB,
                         prompt_tokens=cfg["prompt_tokens"])
                seconds = time.perf_counter() - t0
                print(report(p), f"\n({seconds:.0f} s)\n", flush=True)
                kv_all = _unchunked_kv(PlannedRun, run, model, gpus, cfg["prompt_tokens"])
                new = _rows(p, name, setup, seconds, kv_all)
                if not args.no_save:  # as it goes: a later plan that fails loses nothing
                    common.write_rows(new)
                rows += new
    print(json.dumps({"rows": len(rows)}))


def _unchunked_kv(PlannedRun, run_path: str, model: str, gpus: int, prompt_tokens: int) -> int:
    """The rollout's KV cache with all of a rank's sequences at once (measured, fake tensors)."""
    from dlmkern.cli import read_run
    from dlmkern.plan.command import model_config_of

    run, cfg, _ = read_run(run_path, [f"model={model}"])
    seqs = -(-cfg.prompts_per_step // gpus) * cfg.group_size
    with PlannedRun(model_config_of(run, run_path), cfg, gpus, prompt_tokens) as prun:
        return prun.rollout(seqs).get("rollout_prefill", {}).get("kv_cache", 0)  # 0: no cache


if __name__ == "__main__":
    main()
