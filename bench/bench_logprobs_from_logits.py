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
import json
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
    peak = common.peak_memory(lambda: PATHS[args.child](*inputs), args.device)
    print(json.dumps({"peak_bytes": peak}))


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
    peaks = {k: common.run_child(__file__, [*common_args, "--child", k])["peak_bytes"]
             for k in PATHS}
    inputs = make_inputs(args.n, args.v, getattr(torch, args.dtype), args.device)

    def run(path):
        def fn():
            inputs[0].grad = None
            PATHS[path](*inputs)
        return fn

    times = {k: common.time_fn(run(k), args.device, repeat=args.repeat) for k in PATHS}
    bytes_moved = 3 * args.n * args.v * inputs[0].element_size()  # read x2, write grad
    print(f"logprobs_from_logits fwd+bwd (+entropy)  N={args.n} V={args.v} {args.dtype} on "
          f"{common.device_name(args.device)}")
    print(f"{'path':<10}{'time ms':>12}{'peak MiB':>12}{'GB/s':>10}")
    for k in PATHS:
        print(f"{k:<10}{times[k] * 1e3:>12.2f}{peaks[k] / 2**20:>12.1f}"
              f"{bytes_moved / times[k] / 1e9:>10.1f}")
    time_ratio = times["dlmkern"] / times["naive"]
    mem_ratio = peaks["dlmkern"] / max(peaks["naive"], 1)
    print(f"dlmkern / naive: time {time_ratio:.3f}x ({1 / time_ratio:.2f}x speed-up), "
          f"peak memory {100 * mem_ratio:.2f} %")
    if not args.no_save:
        common.append_result({
            "op": "logprobs_from_logits_fwd_bwd", "device": common.device_name(args.device),
            "shape": {"N": args.n, "V": args.v}, "dtype": args.dtype,
            "time_ms": {k: round(t * 1e3, 3) for k, t in times.items()},
            "peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
            "time_ratio": round(time_ratio, 4), "mem_ratio": round(mem_ratio, 4),
            "gbps": round(bytes_moved / times["dlmkern"] / 1e9, 1),
        })


if __name__ == "__main__":
    main()
