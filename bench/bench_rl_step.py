"""TraceRL training step on the same trajectories, three ways, one run:

- dlmkern: packed KV-reuse rows + block_attention + masked_logprobs
- per-round rows with dlmkern's kernels
- the research codebases' path: per-round rows, dense-mask attention, full-vocabulary logits

Prints tokens per step and step time (forward + backward + optimizer) with ratios.

    python bench/bench_rl_step.py                 # CPU: small SDAR-shaped model
    python bench/bench_rl_step.py --device cuda   # GPU: larger SDAR-shaped model, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import dlmkern.models.transformer as transformer  # noqa: E402
from dlmkern.models import DiffusionLM, tiny_config  # noqa: E402
from dlmkern.ops import masked_logprobs, policy_value_loss, reference  # noqa: E402
from dlmkern.rl import block_rows, per_round_rows  # noqa: E402
from dlmkern.sampling import Trajectory  # noqa: E402

SHAPES = {
    "cpu": dict(model=dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=64, block_size=4,
                           mask_token_id=8191), trajectories=8, prompt=64, response=256,
                dtype="float32"),
    "cuda": dict(model=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                            num_layers=8, num_heads=16, num_kv_heads=8, head_dim=128,
                            block_size=4, mask_token_id=151669), trajectories=16, prompt=256,
                 response=1024, dtype="bfloat16"),
}


def dense_attention(q, k, v, layout, scale=None):
    return reference.block_attention(q, k, v, layout.cu_seqlens, layout.block, layout.stream,
                                     full=layout.full, scale=scale)


@contextlib.contextmanager
def dense_model_attention():
    """Swaps the model's attention for the dense-mask reference (what the peers run)."""
    saved = transformer.block_attention
    transformer.block_attention = dense_attention
    try:
        yield
    finally:
        transformer.block_attention = saved


def make_trajectories(c, gen):
    """Random trajectories whose step maps give every block 4 rounds (4 steps per block)."""
    out = []
    B = c["model"]["block_size"]
    for _ in range(c["trajectories"]):
        prompt = torch.randint(0, 8000, (c["prompt"],), generator=gen).tolist()
        tokens = torch.randint(0, 8000, (c["response"],), generator=gen).tolist()
        steps = []
        for b in range(c["response"] // B):
            steps += [b * 4 + int(s) for s in torch.randperm(4, generator=gen)]
        out.append(Trajectory(prompt, tokens, steps))
    return out


def step_fn(model, opt, rows, full_logits, device):
    ids, lay = rows.input_ids.to(device), rows.layout.to(device)
    sel, tgt = rows.train_rows.to(device), rows.targets.to(device)
    adv = torch.randn(sel.numel(), device=device)

    def run():
        h = model(ids, lay)
        if full_logits:  # logits for every row, log_softmax, gather
            logp = torch.log_softmax(model.logits(h[sel]).float(), -1).gather(
                -1, tgt[:, None]).squeeze(-1)
        else:
            targets = torch.zeros(ids.numel(), dtype=torch.long, device=device)
            targets[sel] = tgt
            logp = masked_logprobs(h, model.lm_head.weight, targets, rows=sel)
        loss, _ = policy_value_loss(logp, logp.detach(), adv, torch.ones_like(adv, dtype=bool))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    c = SHAPES[args.device]
    torch.manual_seed(0)
    dtype = getattr(torch, c["dtype"])
    with torch.device(args.device):
        model = DiffusionLM(tiny_config("sdar", **c["model"]))
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    trajs = make_trajectories(c, torch.Generator().manual_seed(0))
    mask = c["model"]["mask_token_id"]
    packed = block_rows(trajs, c["model"]["block_size"], mask)
    per_round = per_round_rows(trajs, c["model"]["block_size"], mask)
    repeat = 3
    times = {"dlmkern_packed": common.time_fn(step_fn(model, opt, packed, False, args.device),
                                              args.device, repeat=repeat),
             "per_round_kernels": common.time_fn(step_fn(model, opt, per_round, False,
                                                         args.device), args.device,
                                                 repeat=repeat)}
    with dense_model_attention():
        times["peer_dense_full_logits"] = common.time_fn(
            step_fn(model, opt, per_round, True, args.device), args.device, repeat=1)
    tokens = {"packed": packed.num_tokens, "per_round": per_round.num_tokens}
    print(f"TraceRL step, {c['trajectories']} trajectories (prompt {c['prompt']}, response "
          f"{c['response']}, 4 rounds per block), {c['dtype']} on "
          f"{common.device_name(args.device)}")
    print(f"  tokens: packed {tokens['packed']}, per-round {tokens['per_round']} "
          f"({tokens['per_round'] / tokens['packed']:.2f}x fewer)")
    base = times["dlmkern_packed"]
    for k, t in times.items():
        print(f"  {k:<24} {t * 1e3:10.1f} ms   {t / base:6.2f}x dlmkern's time")
    if not args.no_save:
        common.append_result({"op": "tracerl_step", "device": common.device_name(args.device),
                              "shape": {k: v for k, v in c.items() if k != "model"},
                              "tokens": tokens,
                              "time_ms": {k: round(t * 1e3, 2) for k, t in times.items()},
                              "speedup_vs_peer": round(times["peer_dense_full_logits"] / base, 3)})


if __name__ == "__main__":
    main()
