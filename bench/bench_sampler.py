"""Block sampler throughput: generated tokens/s with the KV cache vs recomputing the sequence
every step (same model, same prompts, greedy, 4 steps per block), in one run; on CUDA also the
cached path without CUDA graphs.

    python bench/bench_sampler.py                        # CPU: small SDAR-shaped model, batch 8
    python bench/bench_sampler.py --quick --device cuda  # SDAR-4B shape, random weights, batch 128
    python bench/bench_sampler.py --tiny
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from dlmkern.sampling import BlockSampler, SamplingConfig  # noqa: E402

SIZES = {
    "default": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, batch=8, prompt=32,
                    new=64, steps=4, dtype="float32"),
    "quick": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                  num_heads=32, num_kv_heads=8, head_dim=128, block_size=4, batch=128, prompt=64,
                  new=64, steps=4, dtype="bfloat16"),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, batch=4, prompt=8,
                 new=8, steps=4, dtype="float32"),
}


def main():
    args, c = common.parse(__doc__, SIZES)
    dev = args.device
    model = common.sdar_model(c, dev).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, c["vocab_size"] - 1, (c["batch"], c["prompt"]),
                            generator=g).tolist()
    cfg = SamplingConfig(rule="static", steps=c["steps"], temperature=0)
    samplers = {"dlmkern": BlockSampler(model, cfg, max_new_tokens=c["new"]),
                "uncached": BlockSampler(model, cfg, max_new_tokens=c["new"], use_cache=False)}
    if dev == "cuda":  # the cached path without CUDA graphs, for the graphs' share
        samplers["dlmkern_no_graphs"] = BlockSampler(model, cfg, max_new_tokens=c["new"],
                                                     cuda_graphs=False)
    generated = {}

    def gen(name):
        def run():
            trajs = samplers[name].generate(prompts)
            generated[name] = sum(len(t.token_ids) for t in trajs)
        return run

    # every path the same warm-up and repeats (one repeat on CUDA: the recomputing path of the
    # SDAR-4B shape takes ~10 s a run, and the lease's box is 45 s)
    repeat = args.repeat or (1 if dev == "cuda" else 2)
    timings = {name: common.time_fn(gen(name), dev, warmup=1, repeat=repeat)
               for name in samplers}
    tokens = generated["dlmkern"]
    print(f"block sampler: {tokens} tokens generated per run (tok/s = tokens / p50)")
    common.report([common.make_row("block_sampler", c, name, t, dev)
                   for name, t in timings.items()], args, unit=("tok/s", tokens))


if __name__ == "__main__":
    main()
