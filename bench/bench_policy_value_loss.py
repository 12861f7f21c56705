"""policy_value_loss fwd+bwd vs the eager torch composition (dlmkern.ops.reference), one run.

    python bench/bench_policy_value_loss.py                 # CPU, 1M tokens
    python bench/bench_policy_value_loss.py --device cuda   # GPU, 1M and 8M tokens, GB/s

Bytes counted are what the op must move at least: every input read once and the gradients for
logp and values written once. On GPU the achieved bandwidth is also shown against a plain
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from dlmkern.ops import policy_value_loss, reference  # noqa: E402


def make_inputs(tokens, device, row_len=4096):
    g = torch.Generator().manual_seed(0)
    shape = (tokens // row_len, row_len)

    def r():
        return torch.randn(shape, generator=g).to(device)

    logp = r() * 0.5 - 2
    return {
        "logp": logp.requires_grad_(), "old_logp": logp.detach() + 0.2 * r(), "advantages": r(),
        "mask": (torch.rand(shape, generator=g) < 0.8).to(device),
        "ref_logp": logp.detach() + 0.1 * r(),
        "values": r().requires_grad_(), "old_values": r(), "returns": r(),
    }


def run(fn, b, reduction):
    def step():
        b["logp"].grad = None
        b["values"].grad = None
        args = dict(b)
        pos = [args.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
        loss, _ = fn(*pos, **args, kl_coef=0.05, eps_high=0.28, reduction=reduction,
                     num_seqs=b["logp"].shape[0])
        loss.backward()
    return step


def copy_bandwidth(nbytes, device):
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = common.time_fn(lambda: dst.copy_(src), device, warmup=2, repeat=10)
    return 2 * nbytes / t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, nargs="*")
    p.add_argument("--reduction", default="token_mean")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    sizes = args.tokens or ([1 << 20] if args.device == "cpu" else [1 << 20, 1 << 23])
    repeat = 5 if args.device == "cpu" else 20
    for tokens in sizes:
        b = make_inputs(tokens, args.device)
        # fp32 logp, old, A, ref, V, V_old, R read + bool mask; grads for logp and V written.
        nbytes = tokens * (7 * 4 + 1 + 2 * 4)
        t_fused = common.time_fn(run(policy_value_loss, b, args.reduction), args.device,
                                 repeat=repeat)
        t_eager = common.time_fn(run(reference.policy_value_loss, b, args.reduction),
                                 args.device, repeat=repeat)
        gbs = nbytes / t_fused / 1e9
        line = (f"policy_value_loss fwd+bwd {tokens} tokens ({args.reduction}) on "
                f"{common.device_name(args.device)}: dlmkern {t_fused * 1e3:.3f} ms, eager "
                f"{t_eager * 1e3:.3f} ms, speed-up {t_eager / t_fused:.2f}x, {gbs:.0f} GB/s")
        row = {"op": "policy_value_loss_fwd_bwd", "device": common.device_name(args.device),
               "shape": {"tokens": tokens}, "reduction": args.reduction,
               "time_ms": {"dlmkern": round(t_fused * 1e3, 4), "eager": round(t_eager * 1e3, 4)},
               "speedup": round(t_eager / t_fused, 3), "gb_per_s": round(gbs, 1)}
        if args.device == "cuda":
            copy = copy_bandwidth(nbytes, args.device) / 1e9
            line += f" = {100 * gbs / copy:.0f} % of a device copy ({copy:.0f} GB/s)"
            row["copy_gb_per_s"] = round(copy, 1)
        print(line)
        if not args.no_save:
            common.append_result(row)


if __name__ == "__main__":
    main()
