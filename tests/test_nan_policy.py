"""NaN policy (README "NaN policy"): a NaN, or an inf that makes torch produce NaN, anywhere a row
sees gives NaN for that row, forward and backward, on the CPU kernels and on the CUDA kernels
(emulator), bf16 and fp32, against plain torch (per-row torch.softmax, torch.log_softmax,
F.scaled_dot_product_attention)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from dlmkern import _cuda_emu
from dlmkern.ops import (
    block_attention,
    decode_attention,
    layouts,
    logprobs_from_logits,
    masked_logprobs,
    policy_value_loss,
)
from dlmkern.ops import reference as ref

NAN, INF = float("nan"), float("inf")
EMU = pytest.mark.skipif(not _cuda_emu.available(), reason="built without DLMKERN_CUDA_EMU=ON")
# (backend, dtype): the CPU kernels take fp32 and bf16, the CUDA attention kernels bf16 / fp16.
ATTN_CASES = [("native", torch.float32), ("native", torch.bfloat16),
              pytest.param("emulator", torch.bfloat16, marks=EMU)]
LOGP_CASES = ATTN_CASES + [pytest.param("emulator", torch.float32, marks=EMU)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _backend(name):
    return _cuda_emu.emulated_cuda() if name == "emulator" else contextlib.nullcontext()


def _assert_nan_policy(got, truth, allowed, tol, what):
    """truth's NaNs must be NaN in got (NaN propagates); got may be NaN only where `allowed`
    (a bool mask broadcastable to got); where both are finite they agree."""
    got, truth = got.detach().float(), truth.detach().float()
    g_nan, t_nan = got.isnan(), truth.isnan()
    missing = t_nan & ~g_nan
    assert not missing.any(), f"{what}: NaN lost at {missing.nonzero()[:5].tolist()}"
    extra = g_nan & ~allowed.expand_as(g_nan)
    assert not extra.any(), f"{what}: NaN leaked to {extra.nonzero()[:5].tolist()}"
    both = ~g_nan & ~t_nan
    torch.testing.assert_close(got[both], truth[both], atol=tol, rtol=tol, msg=what)


# ---- block_attention -----------------------------------------------------------------------------

def _sparse_attention(q, k, v, mask, scale):
    """Independent truth: each row is torch.softmax over exactly the keys it sees (fp32), so no
    key outside a row's visible set ever enters its arithmetic (forward or autograd). A row
    whose scores are all -inf sees nothing and gives 0, like SDPA."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    rows = []
    for i in range(q.shape[0]):
        idx = mask[i].nonzero().squeeze(1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), k[idx]) * scale
        empty = (s == -INF).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
        rows.append(torch.einsum("hn,nhd->hd", p, v[idx]))
    return torch.stack(rows)


def _seq_of(lay):
    seq = torch.zeros(lay.num_tokens, dtype=torch.long)
    cu = lay.cu_seqlens.tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        seq[s:e] = i
    return seq


LAY = layouts.bd3([20, 26], 4)  # [noisy | clean] x 2 sequences: masked keys inside every tile
SITES = {"q": (10, 1), "k": (5, 0), "v": (5, 0)}  # (token, head) in sequence 0; 5: seen by some


@pytest.mark.parametrize("backend, dtype", ATTN_CASES)
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_block_attention_nan_policy(backend, dtype, name, value):
    T, hq, hkv, D = LAY.num_tokens, 2, 1, 64
    g = torch.Generator().manual_seed(0)
    qkv = {n: torch.randn(T, h, D, generator=g).to(dtype) for n, h in (("q", hq), ("k", hkv),
                                                                     ("v", hkv))}
    tok, head = SITES[name]
    qkv[name][tok, head, 3] = value
    grad = torch.randn(T, hq, D, generator=g).to(dtype)
    mask, seq = layouts.dense_mask(LAY), _seq_of(LAY)
    scale = D ** -0.5

    def run(fn):
        x = {n: t.clone().requires_grad_() for n, t in qkv.items()}
        out = fn(x["q"], x["k"], x["v"])
        (out.float() * grad.float()).sum().backward()
        return out, x["q"].grad, x["k"].grad, x["v"].grad

    with _backend(backend):
        got = run(lambda q, k, v: block_attention(q, k, v, LAY)[0])
    truth = run(lambda q, k, v: _sparse_attention(q, k, v, mask, scale))
    assert any(t.isnan().any() for t in truth), "the injection must produce NaN somewhere"
    same_seq = (seq == seq[tok]).view(T, 1, 1)
    # q / k enter the scores, which masking overwrites: the NaN rows are exactly the truth's.
    # v enters the P @ V product, where a masked key of the same tile may add 0 * NaN.
    exact = name != "v"
    tol = TOL[dtype]
    _assert_nan_policy(got[0], truth[0], truth[0].isnan() if exact else same_seq, tol, "out")
    for what, a, b in zip(("dq", "dk", "dv"), got[1:], truth[1:], strict=True):
        if what == "dv" and name == "v":
            assert torch.isfinite(a).all(), "dv: P and dO are finite"
            continue
        _assert_nan_policy(a, b, same_seq, 5 * tol, what)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_block_attention_reference_against_torch(name):
    """The reference's NaN rows equal the per-row truth's (masked-out k never leaks), and agree
    with F.scaled_dot_product_attention wherever SDPA is well defined; SDPA with a bool mask
    adds -inf to a masked NaN score (NaN) and so leaks it to every row of the sequence."""
    T, hq, D = LAY.num_tokens, 2, 64
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, hq, D, generator=g) for _ in range(3))
    tok, head = SITES[name]
    {"q": q, "k": k, "v": v}[name][tok, head, 3] = NAN
    mask, seq = layouts.dense_mask(LAY), _seq_of(LAY)
    out, lse = ref.block_attention(q, k, v, LAY.cu_seqlens, LAY.block, LAY.stream)
    truth = _sparse_attention(q, k, v, mask, D ** -0.5)
    exact = truth.isnan() if name != "v" else (seq == seq[tok]).view(T, 1, 1)
    _assert_nan_policy(out, truth, exact, 1e-5, "reference")
    assert torch.equal(lse.isnan().t(), truth.isnan().all(-1))  # NaN q / k: NaN lse, not -inf
    same = mask & (seq[:, None] == seq[None, :])
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), attn_mask=same).transpose(0, 1)
    _assert_nan_policy(sdpa, out, sdpa.isnan(), 1e-5, "SDPA")  # SDPA's NaN rows include ours


# ---- decode_attention ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend, dtype", ATTN_CASES)
@pytest.mark.parametrize("name", ["q", "k_new", "v_new", "k_cache", "v_cache", "k_cache_beyond"])
def test_decode_attention_nan_policy(backend, dtype, name):
    g = torch.Generator().manual_seed(2)
    cu, lens = torch.tensor([0, 4, 7], dtype=torch.int32), torch.tensor([3, 9], dtype=torch.int32)
    x = {"q": torch.randn(7, 2, 64, generator=g), "k_new": torch.randn(7, 1, 64, generator=g),
         "v_new": torch.randn(7, 1, 64, generator=g),
         "k_cache": torch.randn(2, 16, 1, 64, generator=g),
         "v_cache": torch.randn(2, 16, 1, 64, generator=g)}
    x = {n: t.to(dtype) for n, t in x.items()}
    site = {"q": ("q", (5, 1, 3)), "k_new": ("k_new", (1, 0, 3)), "v_new": ("v_new", (1, 0, 3)),
            "k_cache": ("k_cache", (1, 8, 0, 3)), "v_cache": ("v_cache", (1, 2, 0, 3)),
            "k_cache_beyond": ("k_cache", (0, 5, 0, 3))}[name]  # seq 0 caches 3: never seen
    x[site[0]][site[1]] = NAN
    args = (x["q"], x["k_new"], x["v_new"], x["k_cache"], x["v_cache"], lens.clone(), cu)
    with _backend(backend):
        out = decode_attention(*args)
    truth = ref.decode_attention(*(a.float() if a.is_floating_point() else a for a in args))
    # Every query sees its whole sequence, so the NaN rows are exactly torch's.
    if name == "k_cache_beyond":
        assert torch.isfinite(out).all()
    else:
        _assert_nan_policy(out, truth, truth.isnan(), TOL[dtype], name)


# ---- masked_logprobs / logprobs_from_logits ------------------------------------------------------

def _torch_logprobs(logits, targets, temperature=1.0):
    """Plain torch: log_softmax + gather, entropy with p log p = 0 where p = 0."""
    lsm = torch.log_softmax(logits.float() / temperature, -1)
    valid = targets != -100
    logp = lsm.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm.masked_fill(lsm == -INF, 0.0)).sum(-1)
    zero = torch.zeros(())
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)


# Row 1: NaN logit; row 2: +inf (torch: NaN row); row 3: -inf (p = 0, finite); row 4: NaN with
# zero upstream gradient (torch: NaN gradient, 0 * NaN); row 5: NaN but ignored (target -100:
# logp / entropy 0 and no gradient: masked-out never contributes, unlike torch's 0 * NaN).
def _poison(logits):
    logits[1, 3], logits[2, 5], logits[3, 7], logits[4, 2], logits[5, 1] = NAN, INF, -INF, NAN, NAN
    return logits


@pytest.mark.parametrize("backend, dtype", LOGP_CASES)
def test_logprobs_from_logits_nan_policy(backend, dtype):
    g = torch.Generator().manual_seed(3)
    logits = _poison(torch.randn(8, 50, generator=g)).to(dtype)
    targets = torch.randint(0, 50, (8,), generator=g)
    targets[5] = -100
    g_lp, g_ent = torch.randn(8, generator=g), torch.randn(8, generator=g)
    g_lp[4] = g_ent[4] = 0.0

    def run(fn, x):
        x = x.clone().requires_grad_()
        logp, ent = fn(x)
        ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return logp, ent, x.grad

    with _backend(backend):
        got = run(lambda x: logprobs_from_logits(x, targets, temperature=0.7,
                                                 return_entropy=True), logits)
    truth = run(lambda x: _torch_logprobs(x, targets, 0.7), logits)
    rows = torch.tensor([False, True, True, False, True, False, False, False])
    for what, a, b in zip(("logp", "entropy"), got[:2], truth[:2], strict=True):
        _assert_nan_policy(a, b, rows, TOL[dtype], what)
    assert torch.equal(got[2][5].float(), torch.zeros(50))  # ignored row: no gradient
    truth_grad = truth[2].clone()
    truth_grad[5] = 0.0  # torch: NaN (0 * NaN through log_softmax's backward)
    _assert_nan_policy(got[2], truth_grad, rows[:, None], 5 * TOL[dtype], "grad")


@pytest.mark.parametrize("backend, dtype", LOGP_CASES)
@pytest.mark.parametrize("site", ["hidden", "weight"])
def test_masked_logprobs_nan_policy(backend, dtype, site):
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(6, 32, generator=g), torch.randn(40, 32, generator=g) * 0.2
    if site == "hidden":
        h[2, 4] = NAN  # row 2's logits are NaN
    else:
        w[7, 4] = INF  # column 7 is +inf (NaN rows) or -inf (finite rows) by the sign of h[:, 4]
    h, w = h.to(dtype), w.to(dtype)
    targets = torch.randint(0, 40, (6,), generator=g)
    rows = torch.tensor([True, True, True, False, True, True])
    g_lp = torch.randn(5, generator=g)

    def run(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp = fn(hh, ww)
        (logp * g_lp).sum().backward()
        return logp.detach(), hh.grad, ww.grad

    with _backend(backend):
        got = run(lambda hh, ww: masked_logprobs(hh, ww, targets, rows=rows))
    truth = run(lambda hh, ww: _torch_logprobs(hh[rows].float() @ ww.float().T, targets[rows])[0])
    assert truth[0].isnan().any()
    # The GEMMs spread a NaN row (or an inf weight times a zero gradient) exactly as torch's do.
    for what, a, b in zip(("logp", "d_hidden", "d_weight"), got, truth, strict=True):
        _assert_nan_policy(a, b, b.isnan(), TOL[dtype] * (1 if what == "logp" else 5), what)


# ---- policy_value_loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", pytest.param("emulator", marks=EMU)])
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_policy_value_loss_masked_in_nan_propagates(backend, reduction):
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(4, 16, generator=g) * 0.5 - 2
    old = logp + torch.randn(4, 16, generator=g) * 0.3
    adv, mask = torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g) < 0.8
    mask[1, 3], mask[2, 5] = True, False
    logp[1, 3], adv[2, 5] = NAN, NAN  # masked in: propagates; masked out: ignored
    kw = dict(ref_logp=logp.detach() + 0.1, kl_coef=0.1, reduction=reduction)

    def run(fn):
        lp = logp.clone().requires_grad_()
        loss, stats = fn(lp, old, adv, mask, **kw)
        loss.backward()
        return loss, stats["ratio_max"], lp.grad

    with _backend(backend):
        loss, ratio_max, grad = run(policy_value_loss)
    assert torch.isnan(loss) and torch.isnan(ratio_max)
    t_loss, _, t_grad = run(ref.policy_value_loss)
    assert torch.isnan(t_loss)
    t_grad[2, 5] = 0.0  # torch: 0 * NaN through the masked-out branch; ours: no contribution
    nan_at = torch.zeros(4, 16, dtype=torch.bool)
    nan_at[1, 3] = True
    _assert_nan_policy(grad, t_grad, nan_at, 1e-5, "d_logp")
