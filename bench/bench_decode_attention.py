"""decode_attention (one denoising step of every sequence's current block against its KV cache)
vs SDPA (enable_gqa) over a preallocated padded cache with a length mask, in one run; GB/s counts
the bytes the op must move (the live cache prefix and the block's q/k/v/out once).

    python bench/bench_decode_attention.py                         # CPU: 16 sequences, prefix 1024
    python bench/bench_decode_attention.py --quick --device cuda   # 128 sequences, prefix 4096
    python bench/bench_decode_attention.py --tiny
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
from dlmkern.ops import decode_attention  # noqa: E402

SIZES = {
    "default": dict(seqs=16, prefix=1024, block=4, heads=8, kv_heads=2, dim=64,
                    dtype="float32"),
    "quick": dict(seqs=128, prefix=4096, block=4, heads=32, kv_heads=8, dim=128,
                  dtype="bfloat16"),
    "tiny": dict(seqs=4, prefix=64, block=4, heads=4, kv_heads=2, dim=64, dtype="float32"),
}


def main():
    args, c = common.parse(__doc__, SIZES)
    dev, dtype = args.device, getattr(torch, c["dtype"])
    S, B, L, hq, hkv, d = c["seqs"], c["block"], c["prefix"], c["heads"], c["kv_heads"], c["dim"]
    g = torch.Generator().manual_seed(0)
    max_len = L + 4 * B
    lens = torch.randint(L // 2, L + 1, (S,), generator=g).to(torch.int32)
    k_cache = torch.randn(S, max_len, hkv, d, generator=g).to(dev, dtype)
    v_cache = torch.randn(S, max_len, hkv, d, generator=g).to(dev, dtype)
    q = torch.randn(S * B, hq, d, generator=g).to(dev, dtype)
    k_new = torch.randn(S * B, hkv, d, generator=g).to(dev, dtype)
    v_new = torch.randn(S * B, hkv, d, generator=g).to(dev, dtype)
    cu = torch.arange(0, S * B + 1, B, dtype=torch.int32, device=dev)
    lens_d = lens.to(dev)

    def ours():
        return decode_attention(q, k_new, v_new, k_cache, v_cache, lens_d, cu)

    # Baseline, as a user would write it with PyTorch: a cache preallocated with room for the
    # block (filled once, outside the timer), the block's k / v written into it in place, then
    # SDPA over max_len + B keys with a [S, 1, B, max_len + B] length mask and enable_gqa (no
    # repeated KV heads).
    pos = torch.arange(max_len + B, device=dev)
    mask = (pos[None, :] < lens_d[:, None].long()) | (pos[None, :] >= max_len)
    mask = mask[:, None, None, :].expand(S, 1, B, max_len + B)
    kk = torch.cat([k_cache, torch.zeros_like(k_cache[:, :B])], 1).transpose(1, 2)
    vv = torch.cat([v_cache, torch.zeros_like(v_cache[:, :B])], 1).transpose(1, 2)

    def padded():
        kk[:, :, max_len:].copy_(k_new.view(S, B, hkv, d).transpose(1, 2))
        vv[:, :, max_len:].copy_(v_new.view(S, B, hkv, d).transpose(1, 2))
        out = F.scaled_dot_product_attention(q.view(S, B, hq, d).transpose(1, 2), kk, vv,
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(S * B, hq, d)

    torch.testing.assert_close(ours().float(), padded().float(), atol=3e-2, rtol=3e-2)
    repeat = args.repeat or (None if dev == "cuda" else 5)
    timings = {"dlmkern": common.time_fn(ours, dev, repeat=repeat),
               "sdpa_padded": common.time_fn(padded, dev, repeat=repeat)}
    elt = torch.finfo(dtype).bits // 8
    nbytes = int((lens.long().sum() + S * B) * 2 * hkv * d * elt + 2 * S * B * hq * d * elt)
    common.report([common.make_row("decode_attention", c, name, t, dev, nbytes=nbytes)
                   for name, t in timings.items()], args)


if __name__ == "__main__":
    main()
