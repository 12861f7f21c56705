"""Every op against its pure-torch reference on one device: forward and backward, each dtype the
device's kernels take, grouped-query attention, head dims 64 and 128, decode with commit."""

from __future__ import annotations

import torch

from dlmkern.ops import (
    block_attention,
    decode_attention,
    layouts,
    logprobs_from_logits,
    masked_logprobs,
    policy_value_loss,
)
from dlmkern.ops import reference as ref

# atol = rtol per input dtype (outputs); gradients get GRAD_SLACK times that
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}
GRAD_SLACK = 5.0
# and the relative L2 error ||got - want|| / ||want|| of every tensor: elementwise, a low-precision
# tolerance (and its slack) lets a whole tensor 10 % off pass (measured on the CPU: bf16 attention
# gradients, bf16 log-probs); its rounding noise is ~1e-3 (CPU, bf16 gradients), 10 % off is 0.1
REL_L2_TOL = {torch.float32: 1e-2, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def dtypes(device: str, op: str) -> list[torch.dtype]:
    """The dtypes the device's kernels take (CUDA attention runs on tensor cores: bf16 / fp16)."""
    if device == "cuda":
        return [torch.bfloat16, torch.float16] if op == "attention" else [
            torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16]


def violation(got: dict, want: dict, tol: float, grad_keys=(), rel_l2: float | None = None
              ) -> tuple[float, float]:
    """(max abs error, the worst ratio) over the named tensors: the max of |got - want| /
    (atol + rtol |want|) (torch.testing.assert_close's rule) and, with `rel_l2`, of each
    tensor's ||got - want|| / ||want|| / rel_l2. The check passes when the ratio is <= 1."""
    err, worst = 0.0, 0.0
    for k, w in want.items():
        g, w = got[k].detach().double(), w.detach().double()
        t = tol * (GRAD_SLACK if k in grad_keys else 1.0)
        if g.shape != w.shape:
            return float("inf"), float("inf")
        d = (g - w).abs()
        same_inf = (g == w)  # equal infinities count as exact
        d = torch.where(same_inf, torch.zeros_like(d), d).nan_to_num(nan=float("inf"))
        err = max(err, float(d.max()) if d.numel() else 0.0)
        r = d / (t + t * w.abs().nan_to_num(posinf=0.0, neginf=0.0))
        worst = max(worst, float(r.max()) if r.numel() else 0.0)
        norm = float(w.nan_to_num(posinf=0.0, neginf=0.0).norm())
        if rel_l2 is not None and d.numel() > 1 and norm > 0:
            d = torch.where(torch.isfinite(w), d, torch.zeros_like(d))  # inf == inf counted above
            worst = max(worst, float(d.norm()) / norm / rel_l2)
    return err, worst


def _randn(g, *shape, device, dtype, grad=False):
    return torch.randn(*shape, generator=g, device="cpu").to(device, dtype).requires_grad_(grad)


def attention(device: str, dtype: torch.dtype, d: int, layout_name: str):
    """block_attention fwd + bwd on a packed KV-reuse layout (or full) with GQA 4:2."""
    lay = {"packed_rounds": lambda: layouts.packed_rounds([7, 16], [75, 50], 4,
                                                          [[1 + (j % 3) for j in range(18)],
                                                           [2 - (j % 2) for j in range(9)]]),
           "full": lambda: layouts.full([33, 90])}[layout_name]().to(device)
    g = torch.Generator().manual_seed(d)
    T = lay.num_tokens
    q, k, v = (_randn(g, T, h, d, device=device, dtype=dtype, grad=True) for h in (4, 2, 2))
    out, lse = block_attention(q, k, v, lay)
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out_r, lse_r = ref.block_attention(q2, k2, v2, lay.cu_seqlens, lay.block, lay.stream,
                                       full=lay.full)
    go = _randn(g, *out.shape, device=device, dtype=dtype)
    out.backward(go)
    out_r.backward(go)
    got = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    want = {"out": out_r, "lse": lse_r, "dq": q2.grad, "dk": k2.grad, "dv": v2.grad}
    return violation(got, want, TOL[dtype], grad_keys=("dq", "dk", "dv"),
                     rel_l2=REL_L2_TOL[dtype])


def decode(device: str, dtype: torch.dtype, d: int):
    """decode_attention with commit: output and the cache / lengths after the commit."""
    g = torch.Generator().manual_seed(7)
    lens_q, lens_c, max_len = [4, 0, 3], [9, 5, 30], 40
    S, T = len(lens_q), sum(lens_q)
    q = _randn(g, T, 4, d, device=device, dtype=dtype)
    kn, vn = (_randn(g, T, 2, d, device=device, dtype=dtype) for _ in range(2))
    kc, vc = (_randn(g, S, max_len, 2, d, device=device, dtype=dtype) for _ in range(2))
    cu = torch.tensor(layouts.offsets(lens_q), dtype=torch.int32, device=device)
    cl = torch.tensor(lens_c, dtype=torch.int32, device=device)
    kc2, vc2, cl2 = kc.clone(), vc.clone(), cl.clone()
    out = decode_attention(q, kn, vn, kc, vc, cl, cu, commit=True)
    out_r = ref.decode_attention(q, kn, vn, kc2, vc2, cl2, cu, commit=True)
    got = {"out": out, "k_cache": kc, "v_cache": vc, "cache_seqlens": cl}
    want = {"out": out_r, "k_cache": kc2, "v_cache": vc2, "cache_seqlens": cl2}
    return violation(got, want, TOL[dtype], rel_l2=REL_L2_TOL[dtype])


def logprobs(device: str, dtype: torch.dtype, from_logits: bool):
    """masked_logprobs (selected rows, entropy) or logprobs_from_logits: fwd + bwd."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 96, 64, 1000
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    gl, ge = torch.randn(2, 40 if not from_logits else N, generator=g).to(device)
    if from_logits:
        x = _randn(g, N, V, device=device, dtype=dtype, grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        lp, ent = logprobs_from_logits(x, targets, temperature=0.7, return_entropy=True)
        lp_r, ent_r = ref.logprobs_from_logits(x2, targets, temperature=0.7, return_entropy=True)
        leaves = {"d_logits": (x, x2)}
    else:
        h = _randn(g, N, H, device=device, dtype=dtype, grad=True)
        w = (_randn(g, V, H, device=device, dtype=dtype) * 0.1).detach().requires_grad_(True)
        h2, w2 = (t.detach().clone().requires_grad_(True) for t in (h, w))
        rows = torch.randperm(N, generator=g)[:40].to(device)
        lp, ent = masked_logprobs(h, w, targets, rows=rows, temperature=0.7, return_entropy=True)
        lp_r, ent_r = ref.masked_logprobs(h2, w2, targets, rows=rows, temperature=0.7,
                                          return_entropy=True)
        leaves = {"d_hidden": (h, h2), "d_weight": (w, w2)}
    ((lp * gl).sum() + (ent * ge).sum()).backward()
    ((lp_r * gl).sum() + (ent_r * ge).sum()).backward()
    got = {"logp": lp, "entropy": ent, **{k: a.grad for k, (a, _) in leaves.items()}}
    want = {"logp": lp_r, "entropy": ent_r, **{k: b.grad for k, (_, b) in leaves.items()}}
    return violation(got, want, TOL[dtype] * 10, grad_keys=tuple(leaves),
                     rel_l2=REL_L2_TOL[dtype])


def loss(device: str, dtype: torch.dtype, reduction: str):
    """policy_value_loss with ref KL, clipped value loss and dual clip: loss, stats, gradients."""
    g = torch.Generator().manual_seed(5)
    n = 3000
    t = {k: (torch.randn(n, generator=g) * 0.3).to(device, dtype)
         for k in ("logp", "old", "adv", "ref", "v", "v_old", "ret")}
    mask = (torch.rand(n, generator=g) > 0.2).to(device)
    seq = torch.randint(0, 7, (n,), generator=g).to(device, torch.int64)
    # backward from the masked-token count: a token's gradient is then of its own terms' size,
    # not 1/n of it, where the absolute tolerance would hide a gradient 10 % off
    n_masked = mask.sum().to(torch.float32)
    kw = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.05, vf_coef=0.5,
              reduction=reduction, seq_ids=seq, num_seqs=7, normalizer=100.0)
    out = {}
    for name, fn in (("native", policy_value_loss), ("ref", ref.policy_value_loss)):
        lp, v = (t[k].detach().clone().requires_grad_(True) for k in ("logp", "v"))
        value, stats = fn(lp, t["old"], t["adv"], mask, ref_logp=t["ref"], values=v,
                          old_values=t["v_old"], returns=t["ret"], **kw)
        value.backward(n_masked)
        out[name] = {"loss": value, "d_logp": lp.grad, "d_values": v.grad,
                     **{k: stats[k] for k in ("pg_loss", "kl", "vf_loss", "clip_frac")}}
    return violation(out["native"], out["ref"], TOL[dtype], grad_keys=("d_logp", "d_values"),
                     rel_l2=REL_L2_TOL[dtype])


def cases(device: str):
    """(name, dtype name, thunk) for every op check on `device`."""
    out = []
    for dt in dtypes(device, "attention"):
        for d in (64, 128):
            out.append((f"block_attention packed_rounds D={d} GQA 4:2 fwd+bwd", dt,
                        lambda dt=dt, d=d: attention(device, dt, d, "packed_rounds")))
        out.append(("block_attention full D=128 fwd+bwd", dt,
                    lambda dt=dt: attention(device, dt, 128, "full")))
        out.append(("decode_attention D=128 commit", dt, lambda dt=dt: decode(device, dt, 128)))
    for dt in dtypes(device, "logprobs"):
        out.append(("masked_logprobs rows+entropy fwd+bwd", dt,
                    lambda dt=dt: logprobs(device, dt, False)))
        out.append(("logprobs_from_logits entropy fwd+bwd", dt,
                    lambda dt=dt: logprobs(device, dt, True)))
    for red in ("token_mean", "seq_mean", "sum"):
        out.append((f"policy_value_loss {red} fwd+bwd", torch.float32,
                    lambda red=red: loss(device, torch.float32, red)))
    return out
