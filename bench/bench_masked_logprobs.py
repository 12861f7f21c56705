"""masked_logprobs fwd+bwd vs the naive path (full logits -> log_softmax -> gather), one run.

    python bench/bench_masked_logprobs.py                    # CPU: N=4096 H=512 V=32000 fp32
    python bench/bench_masked_logprobs.py --device cuda      # GPU: N=8192 H=4096 V=151936 bf16

Prints time and peak-memory ratios (and TFLOP/s on GPU) and appends a row to
bench/results/results.jsonl. Peak memory is measured in a fresh process per path on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import dlmkern  # noqa: E402,F401

DEFAULTS = {"cpu": (4096, 512, 32000, "float32"), "cuda": (8192, 4096, 151936, "bfloat16")}


def make_inputs(n, h, v, dtype, device, frac):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    rows = None
    if frac < 1.0:
        rows = torch.randperm(n, generator=g)[: int(n * frac)].to(device)
    return hidden, weight, targets, rows


def naive(hidden, weight, targets, rows):
    h = hidden if rows is None else hidden[rows]
    t = targets if rows is None else targets[rows]
    logits = torch.nn.functional.linear(h, weight)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    logp.sum().backward()


def fused(hidden, weight, targets, rows):
    dlmkern.ops.masked_logprobs(hidden, weight, targets, rows=rows).sum().backward()


PATHS = {"naive": naive, "dlmkern": fused}


def child(args):
    """Measures one path's peak memory in this fresh process."""
    n, h, v = args.n, args.h, args.v
    inputs = make_inputs(n, h, v, getattr(torch, args.dtype), args.device, args.rows_frac)
    common.print_child_peak(lambda: PATHS[args.child](*inputs), args.device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int)
    p.add_argument("--h", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--dtype")
    p.add_argument("--rows-frac", type=float, default=1.0, help="fraction of rows selected")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    dn, dh, dv, ddt = DEFAULTS[args.device]
    args.n, args.h, args.v = args.n or dn, args.h or dh, args.v or dv
    args.dtype = args.dtype or ddt
    if args.child:
        return child(args)

    common_args = ["--device", args.device, "--n", str(args.n), "--h", str(args.h), "--v",
                   str(args.v), "--dtype", args.dtype, "--rows-frac", str(args.rows_frac)]
    inputs, peaks, times = common.compare_paths(
        __file__, common_args, PATHS,
        lambda: make_inputs(args.n, args.h, args.v, getattr(torch, args.dtype), args.device,
                            args.rows_frac),
        args.device, args.repeat)
    rows = args.n if inputs[3] is None else inputs[3].numel()
    model_flops = 6.0 * rows * args.h * args.v  # fwd GEMM + two backward GEMMs
    print(f"masked_logprobs fwd+bwd  N={args.n} rows={rows} H={args.h} V={args.v} "
          f"{args.dtype} on {common.device_name(args.device)}")
    print(f"{'path':<10}{'time ms':>12}{'peak MiB':>12}{'TFLOP/s':>10}")
    for k in PATHS:
        tf = model_flops / times[k] / 1e12
        print(f"{k:<10}{times[k] * 1e3:>12.2f}{peaks[k] / 2**20:>12.1f}{tf:>10.2f}")
    common.report_ratios(times, peaks, None if args.no_save else {
        "op": "masked_logprobs_fwd_bwd", "device": common.device_name(args.device),
        "shape": {"N": args.n, "rows": rows, "H": args.h, "V": args.v}, "dtype": args.dtype,
        "tflops_model": round(model_flops / times["dlmkern"] / 1e12, 2)})


if __name__ == "__main__":
    main()
