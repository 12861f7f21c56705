"""Block sampler throughput: generated tokens/s with the KV cache vs recomputing the sequence
every step (same model, same prompts, greedy), one run.

    python bench/bench_sampler.py                  # CPU: small SDAR-shaped model
    python bench/bench_sampler.py --device cuda    # GPU: SDAR-4B shape, random weights, batch 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from dlmkern.models import DiffusionLM, tiny_config  # noqa: E402
from dlmkern.sampling import BlockSampler, SamplingConfig  # noqa: E402

SHAPES = {
    "cpu": dict(model=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=64, block_size=4,
                           mask_token_id=1023), batch=8, prompt=32, new=64, dtype="float32"),
    "cuda": dict(model=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                            block_size=4, mask_token_id=151669),
                 batch=128, prompt=128, new=64, dtype="bfloat16"),
}


def run(sampler, prompts, device):
    common.sync(device)
    t0 = time.perf_counter()
    trajs = sampler.generate(prompts)
    common.sync(device)
    return sum(len(t.token_ids) for t in trajs), time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    c = SHAPES[args.device]
    torch.manual_seed(0)
    with torch.device(args.device):  # initialise on the device (a 4B model is slow on CPU)
        model = DiffusionLM(tiny_config("sdar", **c["model"]))
    model = model.to(getattr(torch, c["dtype"])).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 1000, (c["batch"], c["prompt"]), generator=g).tolist()
    cfg = SamplingConfig(rule="static", steps=4, temperature=0)
    cached = BlockSampler(model, cfg, max_new_tokens=c["new"])
    uncached = BlockSampler(model, cfg, max_new_tokens=c["new"], use_cache=False)
    run(cached, prompts[:2], args.device)  # warm-up
    n_c, t_c = run(cached, prompts, args.device)
    n_u, t_u = run(uncached, prompts, args.device)
    eager = None
    if args.device == "cuda":  # the cached path without CUDA graphs, for the graphs' share
        n_e, t_e = run(BlockSampler(model, cfg, max_new_tokens=c["new"], cuda_graphs=False),
                       prompts, args.device)
        eager = n_e / t_e
    print(f"block sampler, batch {c['batch']}, prompt {c['prompt']}, {c['new']} new tokens, "
          f"block {c['model']['block_size']}, 4 steps/block, {c['dtype']} on "
          f"{common.device_name(args.device)}")
    print(f"  cached   {n_c / t_c:10.1f} tok/s ({t_c:.2f} s)")
    print(f"  uncached {n_u / t_u:10.1f} tok/s ({t_u:.2f} s)   cached speed-up "
          f"{(n_c / t_c) / (n_u / t_u):.2f}x")
    if eager is not None:
        print(f"  cached, no CUDA graphs {eager:10.1f} tok/s   graphs speed-up "
              f"{(n_c / t_c) / eager:.2f}x")
    if not args.no_save:
        common.append_result({"op": "block_sampler", "device": common.device_name(args.device),
                              "shape": {k: v for k, v in c.items() if k != "model"},
                              "model": c["model"], "tok_per_s": {"cached": round(n_c / t_c, 1),
                                                                 "uncached": round(n_u / t_u, 1),
                                                                 "cached_no_graphs": eager and
                                                                 round(eager, 1)},
                              "speedup": round((n_c / t_c) / (n_u / t_u), 3)})


if __name__ == "__main__":
    main()
