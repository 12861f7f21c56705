"""masked_logprobs fwd+bwd vs the naive path (full logits -> log_softmax -> gather), in one run.

    python bench/bench_masked_logprobs.py                        # CPU: N=4096 H=512 V=32000 fp32
    python bench/bench_masked_logprobs.py --quick --device cuda  # N=8192 H=4096 V=151936 bf16
    python bench/bench_masked_logprobs.py --tiny --set rows_frac=0.25

Prints p20/p50/p80, TFLOP/s (6 * rows * H * V: the forward GEMM and two backward GEMMs), peak
memory (CPU: in a fresh process per path; CUDA: the allocator's peak) and the ratios.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import dlmkern  # noqa: E402,F401

SIZES = {
    "default": dict(n=4096, h=512, v=32000, dtype="float32", rows_frac=1.0),
    "quick": dict(n=8192, h=4096, v=151936, dtype="bfloat16", rows_frac=1.0),
    "tiny": dict(n=256, h=64, v=1000, dtype="float32", rows_frac=1.0),
}


def make_inputs(c, device):
    g = torch.Generator().manual_seed(0)
    dtype, n, h = getattr(torch, c["dtype"]), c["n"], c["h"]
    hidden = torch.randn(n, h, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(c["v"], h, generator=g) / h**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, c["v"], (n,), generator=g).to(device)
    rows = None
    if c["rows_frac"] < 1.0:
        rows = torch.randperm(n, generator=g)[: int(n * c["rows_frac"])].to(device)
    return hidden, weight, targets, rows


def naive(hidden, weight, targets, rows):
    h = hidden if rows is None else hidden[rows]
    t = targets if rows is None else targets[rows]
    logits = torch.nn.functional.linear(h, weight)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    logp.sum().backward()


def fused(hidden, weight, targets, rows):
    dlmkern.ops.masked_logprobs(hidden, weight, targets, rows=rows).sum().backward()


PATHS = {"dlmkern": fused, "naive": naive}


def main():
    args, c = common.parse(__doc__, SIZES, lambda p: common.add_child_args(p, PATHS))
    if common.run_child(args, PATHS, make_inputs):
        return
    inputs, peaks, timings = common.compare_paths(__file__, c, PATHS, make_inputs, args.device,
                                                  args.repeat)
    rows = c["n"] if inputs[3] is None else inputs[3].numel()
    flops = 6.0 * rows * c["h"] * c["v"]
    shape = {"N": c["n"], "rows": rows, "H": c["h"], "V": c["v"], "dtype": c["dtype"]}
    common.report([common.make_row("masked_logprobs_fwd_bwd", shape, k, timings[k], args.device,
                                   flops=flops, peak_bytes=peaks[k]) for k in PATHS], args)


if __name__ == "__main__":
    main()
