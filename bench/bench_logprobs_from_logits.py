"""logprobs_from_logits (with entropy) fwd+bwd vs the eager torch path, in one run.

    python bench/bench_logprobs_from_logits.py                        # CPU: N=4096 V=32000 fp32
    python bench/bench_logprobs_from_logits.py --quick --device cuda  # N=8192 V=151936 bf16
    python bench/bench_logprobs_from_logits.py --tiny

The logits already exist here (the caller has them), so the op saves the [N, V] fp32
log-softmax and its gradient temporaries of the eager path rather than the logits themselves.
GB/s counts what the op must move: the logits read twice and their gradient written once.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import dlmkern  # noqa: E402,F401

SIZES = {
    "default": dict(n=4096, v=32000, dtype="float32"),
    "quick": dict(n=8192, v=151936, dtype="bfloat16"),
    "tiny": dict(n=256, v=1000, dtype="float32"),
}


def make_inputs(c, device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(c["n"], c["v"], generator=g) * 3).to(getattr(torch, c["dtype"]))
    targets = torch.randint(0, c["v"], (c["n"],), generator=g).to(device)
    return logits.to(device).requires_grad_(), targets


def naive(logits, targets):
    lsm = torch.log_softmax(logits.float(), dim=-1)
    logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(lsm.exp() * lsm).sum(-1)
    (logp.sum() + 0.01 * entropy.sum()).backward()


def fused(logits, targets):
    logp, entropy = dlmkern.ops.logprobs_from_logits(logits, targets, return_entropy=True)
    (logp.sum() + 0.01 * entropy.sum()).backward()


PATHS = {"dlmkern": fused, "naive": naive}


def main():
    args, c = common.parse(__doc__, SIZES, lambda p: common.add_child_args(p, PATHS))
    if common.run_child(args, PATHS, make_inputs):
        return
    inputs, peaks, timings = common.compare_paths(__file__, c, PATHS, make_inputs, args.device,
                                                  args.repeat)
    nbytes = 3 * c["n"] * c["v"] * inputs[0].element_size()
    common.report([common.make_row("logprobs_from_logits_fwd_bwd", c, k, timings[k],
                                   args.device, nbytes=nbytes, peak_bytes=peaks[k])
                   for k in PATHS], args)


if __name__ == "__main__":
    main()
