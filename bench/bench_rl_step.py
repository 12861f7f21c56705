"""TraceRL training step on the same trajectories, three ways, in one run:

- dlmkern: packed KV-reuse rows + block_attention + masked_logprobs
- dlmkern_per_round: per-round rows with dlmkern's kernels
- peer_sdpa_dense: the research codebases' path as they write it (bench/peer_rl_step.py): one
  padded row per round, a dense boolean mask through SDPA in the model dtype, full-vocabulary
  logits, the same weights and loss (its loss is checked against dlmkern_per_round's first)

Prints tokens per step and step time (forward + backward + optimizer) with ratios; every
provider gets the same warm-up and repeats.

    python bench/bench_rl_step.py                        # CPU: small SDAR-shaped model
    python bench/bench_rl_step.py --quick --device cuda  # larger SDAR-shaped model, bf16
    python bench/bench_rl_step.py --tiny
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import peer_rl_step  # noqa: E402
from dlmkern.ops import masked_logprobs, policy_value_loss  # noqa: E402
from dlmkern.rl import block_rows, per_round_rows  # noqa: E402
from dlmkern.sampling import Trajectory  # noqa: E402

SIZES = {
    "default": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, trajectories=8,
                    prompt=64, response=256, dtype="float32"),
    # 4 trajectories: the peers' full-vocabulary logits of 16 rows x 1280 tokens are ~12 GiB
    # in bf16 and twice that in fp32 (8 would not fit an 80 GB GPU)
    "quick": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=8,
                  num_heads=16, num_kv_heads=8, head_dim=128, block_size=4, trajectories=4,
                  prompt=256, response=512, dtype="bfloat16"),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=64, block_size=4, trajectories=2,
                 prompt=8, response=16, dtype="float32"),
}
ROUNDS = 4  # denoising steps per block in the synthetic step maps


def make_trajectories(c, gen):
    """Random trajectories whose step maps give every block ROUNDS rounds."""
    out, B, top = [], c["block_size"], c["vocab_size"] - 1
    for _ in range(c["trajectories"]):
        prompt = torch.randint(0, top, (c["prompt"],), generator=gen).tolist()
        tokens = torch.randint(0, top, (c["response"],), generator=gen).tolist()
        steps = []
        for b in range(c["response"] // B):
            steps += [b * ROUNDS + int(s) for s in torch.randperm(ROUNDS, generator=gen)]
        out.append(Trajectory(prompt, tokens, steps))
    return out


def step_fn(model, opt, rows, device, adv):
    ids, lay = rows.input_ids.to(device), rows.layout.to(device)
    sel, tgt = rows.train_rows.to(device), rows.targets.to(device)
    targets = torch.zeros(ids.numel(), dtype=torch.long, device=device)
    targets[sel] = tgt

    def loss_fn():
        logp = masked_logprobs(model(ids, lay), model.lm_head.weight, targets, rows=sel)
        loss, _ = policy_value_loss(logp, logp.detach(), adv, torch.ones_like(adv, dtype=bool))
        return loss

    return common.optimizer_step(opt, loss_fn)


def main():
    args, c = common.parse(__doc__, SIZES)
    dev = args.device
    model = common.sdar_model(c, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    trajs = make_trajectories(c, torch.Generator().manual_seed(0))
    mask = c["vocab_size"] - 1
    packed = block_rows(trajs, c["block_size"], mask)
    per_round = per_round_rows(trajs, c["block_size"], mask)
    repeat = args.repeat or 3
    g = torch.Generator().manual_seed(1)
    adv = {n: torch.randn(r.train_rows.numel(), generator=g).to(dev)
           for n, r in (("packed", packed), ("per_round", per_round))}
    steps = {"dlmkern": step_fn(model, opt, packed, dev, adv["packed"]),
             "dlmkern_per_round": step_fn(model, opt, per_round, dev, adv["per_round"]),
             "peer_sdpa_dense": peer_rl_step.step_fn(model, opt, per_round, dev,
                                                     adv["per_round"])}
    with torch.no_grad():  # the same step: the peers' loss equals dlmkern's on the same rows
        ours, peer = steps["dlmkern_per_round"].loss(), steps["peer_sdpa_dense"].loss()
        tol = 1e-4 if c["dtype"] == "float32" else 3e-2
        torch.testing.assert_close(peer.float(), ours.float(), rtol=tol, atol=tol)
    timings = {name: common.time_fn(fn, dev, warmup=1, repeat=repeat)
               for name, fn in steps.items()}
    print(f"TraceRL step ({ROUNDS} rounds per block): tokens packed {packed.num_tokens}, "
          f"per-round {per_round.num_tokens} ({per_round.num_tokens / packed.num_tokens:.2f}x "
          f"fewer)")
    shape = {**c, "rounds": ROUNDS, "tokens_packed": packed.num_tokens,
             "tokens_per_round": per_round.num_tokens}
    common.report([common.make_row("tracerl_step", shape, name, t, dev)
                   for name, t in timings.items()], args)


if __name__ == "__main__":
    main()
