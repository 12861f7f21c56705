"""logprobs_from_logits (with entropy) fwd+bwd vs the eager torch path, one run.

    python bench/bench_logprobs_from_logits.py                 # CPU: N=4096 V=32000 fp32
    python bench/bench_logprobs_from_logits.py --device cuda   # GPU: N=8192 V=151936 bf16

The logits already exist here (the caller has them), so the op saves the [N, V] fp32
log-softmax and its gradient temporaries of the eager path rather than the logits themselves.
Prints time and peak-memory ratios and the achieved bandwidth (the op must read the logits
twice and write their gradient once), and appends a row to bench/results/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import dlmkern  # noqa: E402,F401

DEFAULTS = {"cpu": (4096, 32000, "float32"), "cuda": (8192, 151936, "bfloat16")}


def make_inputs(n, v, dtype, device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return logits, targets


def naive(logits, targets):
    lsm = torch.log_softmax(logits.float(), dim=-1)
    logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(lsm.exp() * lsm).sum(-1)
    (logp.sum() + 0.01 * entropy.sum()).backward()


def fused(logits, targets):
    logp, entropy = dlmkern.ops.logprobs_from_logits(logits, targets, return_entropy=True)
    (logp.sum() + 0.01 * entropy.sum()).backward()


PATHS = {"naive": naive, "dlmkern": fused}


def child(args):
    inputs = make_inputs(args.n, args.v, getattr(torch, args.dtype), args.device)
    common.print_child_peak(lambda: PATHS[args.child](*inputs), args.device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--dtype")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    dn, dv, ddt = DEFAULTS[args.device]
    args.n, args.v, args.dtype = args.n or dn, args.v or dv, args.dtype or ddt
    if args.child:
        return child(args)
    common_args = ["--device", args.device, "--n", str(args.n), "--v", str(args.v), "--dtype",
                   args.dtype]
    inputs, peaks, times = common.compare_paths(
        __file__, common_args, PATHS,
        lambda: make_inputs(args.n, args.v, getattr(torch, args.dtype), args.device),
        args.device, args.repeat)
    bytes_moved = 3 * args.n * args.v * inputs[0].element_size()  # read x2, write grad
    print(f"logprobs_from_logits fwd+bwd (+entropy)  N={args.n} V={args.v} {args.dtype} on "
          f"{common.device_name(args.device)}")
    print(f"{'path':<10}{'time ms':>12}{'peak MiB':>12}{'GB/s':>10}")
    for k in PATHS:
        print(f"{k:<10}{times[k] * 1e3:>12.2f}{peaks[k] / 2**20:>12.1f}"
              f"{bytes_moved / times[k] / 1e9:>10.1f}")
    common.report_ratios(times, peaks, None if args.no_save else {
        "op": "logprobs_from_logits_fwd_bwd", "device": common.device_name(args.device),
        "shape": {"N": args.n, "V": args.v}, "dtype": args.dtype,
        "gbps": round(bytes_moved / times["dlmkern"] / 1e9, 1)})


if __name__ == "__main__":
    main()
