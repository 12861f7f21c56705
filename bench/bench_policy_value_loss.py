"""policy_value_loss fwd+bwd vs the eager torch composition (dlmkern.ops.reference) and a device
copy of the same bytes, in one run.

    python bench/bench_policy_value_loss.py                        # CPU, 1M tokens
    python bench/bench_policy_value_loss.py --quick --device cuda  # 1M and 8M tokens
    python bench/bench_policy_value_loss.py --tiny --set reduction=seq_mean

Bytes counted are what the op must move at least: every input read once and the gradients for
logp and values written once. The `device_copy` row is the time a plain copy (measured on at
least 256 MiB, so not out of cache) takes to move those same bytes: its GB/s is the ceiling.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from dlmkern.ops import policy_value_loss, reference  # noqa: E402

SIZES = {
    "default": dict(tokens=[1 << 20], reduction="token_mean"),
    "quick": dict(tokens=[1 << 20, 1 << 23], reduction="token_mean"),
    "tiny": dict(tokens=[1 << 14], reduction="token_mean"),
}
ROW_LEN = 4096
MIN_COPY_BYTES = 256 << 20


def make_inputs(tokens, device):
    g = torch.Generator().manual_seed(0)
    shape = (max(tokens // ROW_LEN, 1), min(tokens, ROW_LEN))

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


def copy_timing(nbytes, device, repeat):
    """A device copy's time scaled to `nbytes` moved (read + write), measured on >= 256 MiB."""
    moved = max(nbytes, MIN_COPY_BYTES)
    src = torch.empty(moved // 8, device=device)
    dst = torch.empty_like(src)
    t = common.time_fn(lambda: dst.copy_(src), device, repeat=repeat)
    scale = nbytes / (2 * src.numel() * 4)
    return common.Timing(t.p20 * scale, t.p50 * scale, t.p80 * scale)


def main():
    args, c = common.parse(__doc__, SIZES)
    repeat = args.repeat or (None if args.device == "cuda" else 5)
    for tokens in c["tokens"]:
        b = make_inputs(tokens, args.device)
        tokens = b["logp"].numel()
        # fp32 logp, old, A, ref, V, V_old, R read + bool mask; grads for logp and V written.
        nbytes = tokens * (7 * 4 + 1 + 2 * 4)
        timings = {"dlmkern": common.time_fn(run(policy_value_loss, b, c["reduction"]),
                                             args.device, repeat=repeat),
                   "eager": common.time_fn(run(reference.policy_value_loss, b, c["reduction"]),
                                           args.device, repeat=repeat),
                   "device_copy": copy_timing(nbytes, args.device, repeat)}
        shape = {"tokens": tokens, "reduction": c["reduction"], "dtype": "float32"}
        common.report([common.make_row("policy_value_loss_fwd_bwd", shape, k, t, args.device,
                                       nbytes=nbytes) for k, t in timings.items()], args)


if __name__ == "__main__":
    main()
