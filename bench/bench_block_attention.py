"""block_attention fwd+bwd vs dense-mask SDPA and (on CUDA) FlexAttention, in one run.

    python bench/bench_block_attention.py                        # CPU: B=4, 2 x 1024, D=64, fp32
    python bench/bench_block_attention.py --quick --device cuda  # L=8k, D=128, 32q/8kv, bf16
    python bench/bench_block_attention.py --tiny                 # seconds on a 2-core CPU

Layout: BD3 / DiRL [noisy | clean] per sequence. Also compares packed multi-round rows (SPEC 4.2)
with one row per round for the same trajectories (tokens and time). TFLOP/s count visible pairs
only: 4 * D flops per visible pair forward, 3.5x that forward + backward.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from dlmkern.ops import block_attention, layouts  # noqa: E402

SIZES = {
    "default": dict(batch=4, seq=1024, heads=8, kv_heads=8, dim=64, dtype="float32",
                    blocks=[4, 32], traj=4, prompt=128, response=512),
    "quick": dict(batch=1, seq=4096, heads=32, kv_heads=8, dim=128, dtype="bfloat16",
                  blocks=[4], traj=8, prompt=256, response=1024),
    "tiny": dict(batch=1, seq=128, heads=2, kv_heads=1, dim=64, dtype="float32",
                 blocks=[4], traj=2, prompt=16, response=32),
}
ROUNDS = 4  # rounds (denoising steps) per block in the packed-rounds comparison


def visible_pairs(layout, heads):
    pairs = 0
    cu = layout.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        b, r = layout.block[s:e].long(), layout.stream[s:e].long()
        pairs += int(layouts.visible(b[:, None], r[:, None], b[None, :], r[None, :]).sum())
    return pairs * heads


def dense_sdpa(q, k, v, mask, batch):
    """What the research codebases do: a padded batch [B, H, L, D] and a dense [B, 1, L, L]
    boolean mask per sequence (all sequences have one length here, so no padding is wasted)."""
    rep = q.shape[1] // k.shape[1]

    def bhld(x):
        return x.reshape(batch, -1, *x.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(bhld(q), bhld(k.repeat_interleave(rep, 1)),
                                         bhld(v.repeat_interleave(rep, 1)), attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape)


def flex_fn(layout, device):
    """FlexAttention (compiled) with a block mask built by create_block_mask from the same
    visibility rule (layouts.visible) plus same-sequence; returns (run, None) or (None, why)."""
    if device != "cuda":
        return None, "FlexAttention skipped on CPU (its compiled kernels target GPUs)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return None, f"FlexAttention unavailable: {e}"
    T = layout.num_tokens
    cu = layout.cu_seqlens.long()
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1]).to(device)
    blk, st = layout.block.to(device), layout.stream.to(device)

    def mask_mod(b, h, qi, ki):
        return (seq[qi] == seq[ki]) & layouts.visible(blk[qi], st[qi], blk[ki], st[ki])

    bm = create_block_mask(mask_mod, None, None, T, T, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)
    return run, None


def qkv(T, cfg, dev, grad=True):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, cfg["dtype"])
    shapes = ((T, cfg["heads"]), (T, cfg["kv_heads"]), (T, cfg["kv_heads"]))
    return [torch.randn(*s, cfg["dim"], generator=g).to(dev, dtype).requires_grad_(grad)
            for s in shapes]


def fwd_bwd(fn, inputs, grad):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(grad)
    return run


def time_providers(paths: dict, dev: str, repeat):
    """Times each provider; a provider that fails (e.g. a compile error) is reported and
    dropped so that the others' rows still land."""
    timings = {}
    for name, fn in paths.items():
        try:
            timings[name] = common.time_fn(fn, dev, repeat=repeat)
        except Exception as e:  # noqa: BLE001 - a baseline's failure must not lose our rows
            print(f"  {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return timings


def bench_one(bs, cfg, args):
    """dlmkern and dense-mask SDPA on one block size; their rows are written before FlexAttention
    (whose compile is the slow, risky part) runs. Returns what bench_flex needs."""
    dev = args.device
    lay = layouts.bd3([cfg["seq"]] * cfg["batch"], bs)
    q, k, v = qkv(lay.num_tokens, cfg, dev)
    grad = torch.randn_like(q)
    lay_d = lay.to(dev)
    mask = layouts.dense_mask(layouts.bd3([cfg["seq"]], bs)).to(dev)
    mask = mask[None, None].expand(cfg["batch"], 1, -1, -1)
    paths = {"dlmkern": fwd_bwd(lambda: block_attention(q, k, v, lay_d)[0], (q, k, v), grad),
             "sdpa_dense": fwd_bwd(lambda: dense_sdpa(q, k, v, mask, cfg["batch"]), (q, k, v),
                                   grad)}
    timings = time_providers(paths, dev, args.repeat)
    pairs = visible_pairs(lay, cfg["heads"])
    flops = 2.0 * 2 * pairs * cfg["dim"] * 3.5  # fwd 2 GEMMs, bwd 5 GEMMs (2.5x fwd)
    frac = pairs / (cfg["heads"] * lay.num_tokens ** 2 / cfg["batch"])
    print(f"block_attention fwd+bwd [noisy|clean]: visible pairs {frac:.1%} of each sequence's "
          f"L x L")
    shape = {"layout": "bd3", "B": cfg["batch"], "L": 2 * cfg["seq"], "block": bs,
             "Hq": cfg["heads"], "Hkv": cfg["kv_heads"], "D": cfg["dim"], "dtype": cfg["dtype"]}
    rows = common.report([common.make_row("block_attention_fwd_bwd", shape, name, t, dev,
                                          flops=flops) for name, t in timings.items()], args)
    return dict(lay=lay, qkv=(q, k, v), grad=grad, flops=flops, shape=shape, rows=rows)


def bench_flex(run, args):
    """FlexAttention on bench_one's inputs; its row is printed beside the others and written."""
    flex, why = flex_fn(run["lay"], args.device)
    if flex is None:
        print(f"({why})")
        return
    q, k, v = run["qkv"]
    timings = time_providers({"flex": fwd_bwd(lambda: flex(q, k, v), (q, k, v), run["grad"])},
                             args.device, args.repeat)
    if "flex" in timings:
        row = common.make_row("block_attention_fwd_bwd", run["shape"], "flex", timings["flex"],
                              args.device, flops=run["flops"])
        common.report(run["rows"] + [row], args, new=[row])


def bench_rounds(cfg, args):
    """Packed KV-reuse rows (SPEC 4.2) vs one [prompt | clean | noisy_r] row per round (TraceRL),
    same trajectories (every block has ROUNDS rounds): tokens and fwd+bwd time."""
    n, prompt, response, block = cfg["traj"], cfg["prompt"], cfg["response"], 4
    n_blocks = (prompt + response + block - 1) // block - prompt // block
    lays = {"dlmkern": layouts.packed_rounds([prompt] * n, [prompt + response] * n, block,
                                             [[ROUNDS] * n_blocks] * n),
            "per_round": layouts.tracerl([prompt] * n * ROUNDS,
                                         [prompt + response] * n * ROUNDS, block)}
    timings = {}
    for name, lay in lays.items():
        q, k, v = qkv(lay.num_tokens, cfg, args.device)
        lay_d = lay.to(args.device)
        timings[name] = common.time_fn(
            fwd_bwd(lambda q=q, k=k, v=v, lay_d=lay_d: block_attention(q, k, v, lay_d)[0].sum(),
                    (q, k, v), None), args.device, repeat=args.repeat)
    tokens = {name: lay.num_tokens for name, lay in lays.items()}
    print(f"packed rounds vs per-round rows: tokens packed {tokens['dlmkern']}, per-round "
          f"{tokens['per_round']} ({tokens['per_round'] / tokens['dlmkern']:.2f}x fewer)")
    shape = {"trajectories": n, "prompt": prompt, "response": response, "block": block,
             "rounds": ROUNDS, "Hq": cfg["heads"], "Hkv": cfg["kv_heads"], "D": cfg["dim"],
             "dtype": cfg["dtype"], "tokens_packed": tokens["dlmkern"],
             "tokens_per_round": tokens["per_round"]}
    common.report([common.make_row("block_attention_packed_rounds", shape, name, t, args.device)
                   for name, t in timings.items()], args)


def main():
    args, cfg = common.parse(__doc__, SIZES)
    runs = [bench_one(bs, cfg, args) for bs in cfg["blocks"]]
    bench_rounds(cfg, args)
    for run in runs:  # last: FlexAttention's compile may use up the time box
        bench_flex(run, args)


if __name__ == "__main__":
    main()
