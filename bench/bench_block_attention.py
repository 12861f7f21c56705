"""block_attention fwd+bwd vs dense-mask SDPA (and FlexAttention on GPU), one run.

    python bench/bench_block_attention.py                # CPU: B=4, 2 x 1024, D=64, 8 heads fp32
    python bench/bench_block_attention.py --device cuda  # GPU: L=8k, D=128, 32q/8kv heads bf16

Layout: BD3 / DiRL [noisy | clean] per sequence. Also compares packed multi-round rows (SPEC 4.2)
with one row per round for the same trajectories (tokens and time). TFLOP/s count visible pairs
only (4 * D flops per visible pair forward, 10 * D forward + backward... see `flops`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from dlmkern.ops import block_attention, layouts  # noqa: E402

DEFAULTS = {"cpu": dict(batch=4, seq=1024, heads=8, kv_heads=8, dim=64, dtype="float32"),
            "cuda": dict(batch=1, seq=4096, heads=32, kv_heads=8, dim=128, dtype="bfloat16")}


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


def flex_fn(layout, T, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    seq = torch.zeros(T, dtype=torch.int64, device=device)
    cu = layout.cu_seqlens.tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        seq[s:e] = i
    blk, st = layout.block.to(device), layout.stream.to(device)

    def mask_mod(b, h, qi, ki):
        return (seq[qi] == seq[ki]) & layouts.visible(blk[qi], st[qi], blk[ki], st[ki])

    bm = create_block_mask(mask_mod, None, None, T, T, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        rep = q.shape[1] // k.shape[1]
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=bm, enable_gqa=rep > 1)
        return out[0].transpose(0, 1)
    return run


def bench_one(bs, cfg, args):
    dev, dtype = args.device, getattr(torch, cfg["dtype"])
    lay = layouts.bd3([cfg["seq"]] * cfg["batch"], bs)
    T = lay.num_tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, cfg["heads"], cfg["dim"], generator=g).to(dev, dtype).requires_grad_()
    k = torch.randn(T, cfg["kv_heads"], cfg["dim"], generator=g).to(dev, dtype).requires_grad_()
    v = torch.randn(T, cfg["kv_heads"], cfg["dim"], generator=g).to(dev, dtype).requires_grad_()
    lay_d = lay.to(dev)
    one = layouts.bd3([cfg["seq"]], bs)
    mask = layouts.dense_mask(one).to(dev)[None, None].expand(cfg["batch"], 1, -1, -1)
    grad = torch.randn(T, cfg["heads"], cfg["dim"], generator=g).to(dev, dtype)

    def step(fn):
        def run():
            for x in (q, k, v):
                x.grad = None
            fn().backward(grad)
        return run

    paths = {"dlmkern": step(lambda: block_attention(q, k, v, lay_d)[0]),
             "sdpa_dense": step(lambda: dense_sdpa(q, k, v, mask, cfg["batch"]))}
    if dev == "cuda":
        flex = flex_fn(lay, T, dev)
        if flex is not None:
            paths["flex"] = step(lambda: flex(q, k, v))
    times = {name: common.time_fn(fn, dev, repeat=args.repeat) for name, fn in paths.items()}
    pairs = visible_pairs(lay, cfg["heads"])
    flops = 2.0 * 2 * pairs * cfg["dim"] * 3.5  # fwd 2 GEMMs, bwd 5 GEMMs (2.5x fwd)
    frac = pairs / (cfg["heads"] * T * T / cfg["batch"])
    print(f"block_attention fwd+bwd [noisy|clean] B={cfg['batch']} L=2x{cfg['seq']} "
          f"block={bs} Hq={cfg['heads']} Hkv={cfg['kv_heads']} D={cfg['dim']} {cfg['dtype']} "
          f"on {common.device_name(dev)}; visible pairs {frac:.1%} of each sequence's L x L")
    for name, t in times.items():
        print(f"  {name:<11} {t * 1e3:10.2f} ms  {flops / t / 1e12:8.3f} TFLOP/s (visible)  "
              f"dlmkern speed-up {t / times['dlmkern']:.2f}x")
    if not args.no_save:
        common.append_result({
            "op": "block_attention_fwd_bwd", "device": common.device_name(dev),
            "shape": {"layout": "bd3", "B": cfg["batch"], "L": 2 * cfg["seq"],
                      "block": bs, "Hq": cfg["heads"], "Hkv": cfg["kv_heads"],
                      "D": cfg["dim"]},
            "dtype": cfg["dtype"], "time_ms": {n: round(t * 1e3, 3) for n, t in times.items()},
            "speedup_vs": {n: round(t / times["dlmkern"], 3) for n, t in times.items()},
            "tflops_visible": round(flops / times["dlmkern"] / 1e12, 3)})


def bench_rounds(cfg, args, rounds=4, prompt=128, response=512, block=4, n_traj=4):
    """Packed KV-reuse rows (SPEC 4.2) vs one [prompt | clean | noisy_r] row per round (TraceRL),
    same trajectories (every block has `rounds` rounds): tokens and fwd+bwd time."""
    dev, dtype = args.device, getattr(torch, cfg["dtype"])
    n_blocks = (prompt + response + block - 1) // block - prompt // block
    packed = layouts.packed_rounds([prompt] * n_traj, [prompt + response] * n_traj, block,
                                   [[rounds] * n_blocks] * n_traj)
    n_rows = n_traj * rounds
    per_round = layouts.tracerl([prompt] * n_rows, [prompt + response] * n_rows, block)
    times, tokens = {}, {}
    for name, lay in (("packed", packed), ("per_round", per_round)):
        T = lay.num_tokens
        g = torch.Generator().manual_seed(0)
        q = torch.randn(T, cfg["heads"], cfg["dim"], generator=g).to(dev, dtype).requires_grad_()
        k = torch.randn(T, cfg["kv_heads"], cfg["dim"], generator=g).to(dev, dtype).requires_grad_()
        v = torch.randn(T, cfg["kv_heads"], cfg["dim"], generator=g).to(dev, dtype).requires_grad_()
        lay_d = lay.to(dev)

        def run(q=q, k=k, v=v, lay_d=lay_d):
            block_attention(q, k, v, lay_d)[0].sum().backward()
        times[name] = common.time_fn(run, dev, repeat=args.repeat)
        tokens[name] = T
    print(f"packed rounds vs per-round rows: {n_traj} trajectories, prompt {prompt}, response "
          f"{response}, block {block}, {rounds} rounds per block")
    print(f"  tokens  packed {tokens['packed']}  per-round {tokens['per_round']}  "
          f"({tokens['per_round'] / tokens['packed']:.2f}x fewer)")
    speed = times["per_round"] / times["packed"]
    print(f"  fwd+bwd packed {times['packed'] * 1e3:.2f} ms  per-round "
          f"{times['per_round'] * 1e3:.2f} ms  ({speed:.2f}x faster)")
    if not args.no_save:
        common.append_result({
            "op": "block_attention_packed_rounds", "device": common.device_name(dev),
            "shape": {"trajectories": n_traj, "prompt": prompt, "response": response,
                      "block": block, "rounds": rounds, "Hq": cfg["heads"],
                      "Hkv": cfg["kv_heads"], "D": cfg["dim"]},
            "dtype": cfg["dtype"], "tokens": tokens,
            "time_ms": {n: round(t * 1e3, 3) for n, t in times.items()},
            "token_ratio": round(tokens["per_round"] / tokens["packed"], 3),
            "time_ratio": round(times["per_round"] / times["packed"], 3)})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--block-size", type=int, nargs="*", default=[4, 32])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    for k, v in DEFAULTS["cpu"].items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v))
    args = p.parse_args()
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v
           for k, v in DEFAULTS[args.device].items()}
    for bs in args.block_size:
        bench_one(bs, cfg, args)
    bench_rounds(cfg, args)

if __name__ == "__main__":
    main()
