"""policy_value_loss vs the eager reference, hand-computed branches, bad input (SPEC 2.4)."""

import math

import pytest
import torch
from dlmkern.ops import policy_value_loss
from dlmkern.ops import reference as ref
from dlmkern.ops.policy_value_loss import _ARGS

from .conftest import devices


def _batch(shape, device, dtype=torch.float32, spread=0.4):
    logp = (torch.randn(shape) * 0.5 - 2).to(device)
    old = logp + torch.randn(shape, device=device) * spread
    return {
        "logp": logp.to(dtype),
        "old_logp": old.to(dtype),
        "advantages": torch.randn(shape, device=device).to(dtype),
        "mask": torch.rand(shape, device=device) < 0.7,
        "ref_logp": (logp + torch.randn(shape, device=device) * 0.3).to(dtype),
        "values": torch.randn(shape, device=device).to(dtype),
        "old_values": torch.randn(shape, device=device).to(dtype),
        "returns": torch.randn(shape, device=device).to(dtype),
    }


def _run_both(b, **kw):
    """Loss, stats and gradients (logp, values) from the op and from the reference."""
    out = []
    for fn in (policy_value_loss, ref.policy_value_loss):
        lp = b["logp"].clone().requires_grad_()
        args = dict(b, logp=lp)
        v = None
        if args.get("values") is not None:
            v = args["values"].clone().requires_grad_()
            args["values"] = v
        pos = [args.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
        loss, stats = fn(*pos, **args, **kw)
        loss.backward()
        out.append((loss, stats, lp.grad, None if v is None else v.grad))
    return out


def _assert_same(a, b, tol):
    (l1, s1, g1, v1), (l2, s2, g2, v2) = a, b
    torch.testing.assert_close(l1, l2, atol=tol, rtol=tol)
    assert set(s1) == set(s2)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], atol=tol, rtol=tol, msg=k)
    torch.testing.assert_close(g1, g2, atol=tol, rtol=tol)
    if v1 is not None:
        torch.testing.assert_close(v1, v2, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(1,), (37,), (6, 129), (3000,)])
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "sum"])
@pytest.mark.parametrize("terms", ["pg", "pg+kl", "pg+vf", "all"])
def test_matches_reference(device, shape, reduction, terms):
    b = _batch(shape, device, spread=0.6)
    if "kl" not in terms and terms != "all":
        b["ref_logp"] = None
    if "vf" not in terms and terms != "all":
        b["values"] = b["old_values"] = b["returns"] = None
    kw = {"kl_coef": 0.05, "vf_coef": 0.7, "vf_clip": 0.3, "eps_low": 0.2, "eps_high": 0.28,
          "reduction": reduction, "normalizer": 512.0 if reduction == "sum" else None}
    if reduction == "seq_mean" and len(shape) == 1:
        kw["seq_ids"] = torch.randint(0, 5, shape, device=device)
    if terms == "all":
        kw["dual_clip"] = 1.5
    _assert_same(*_run_both(b, **kw), tol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_half_precision_inputs(device):
    b = _batch((4, 64), device, dtype=torch.bfloat16)
    (l1, s1, g1, v1), (l2, s2, g2, v2) = _run_both(b, kl_coef=0.1)
    assert g1.dtype == torch.bfloat16 and v1.dtype == torch.bfloat16
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1.float(), g2.float(), atol=1e-2, rtol=1e-2)


def test_values_without_old_values_are_unclipped():
    b = _batch((50,), "cpu")
    b["old_values"] = None
    _assert_same(*_run_both(b, vf_coef=1.0), tol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_seq_mean_interleaved_ids_and_empty_sequences(device):
    b = _batch((40,), device)
    seq_ids = torch.arange(40, device=device) % 4  # interleaved: no warp is uniform
    b["mask"] = b["mask"] & (seq_ids != 2)  # sequence 2 has no trained tokens: excluded
    b["mask"][0] = True
    _assert_same(*_run_both(b, reduction="seq_mean", seq_ids=seq_ids, num_seqs=6), tol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_seq_mean_masked_tokens_may_carry_any_id(device):
    # Padding often carries id -1 (or one past the last sequence): masked tokens are never read.
    b = _batch((6, 20), device)
    seq_ids = torch.arange(6, device=device).repeat_interleave(20).view(6, 20)
    b["mask"][:, 15:] = False
    padded = seq_ids.clone()
    padded[:, 15:] = -1
    padded[0, 17] = 99
    got, want = _run_both(dict(b), reduction="seq_mean", seq_ids=padded, num_seqs=6)
    _assert_same(got, want, tol=1e-5)
    _assert_same(got, _run_both(dict(b), reduction="seq_mean", seq_ids=seq_ids, num_seqs=6)[1],
                 tol=1e-5)
    assert torch.all(got[2][:, 15:] == 0)
    # num_seqs inferred when not given (from the unmasked tokens only)
    _assert_same(_run_both(dict(b), reduction="seq_mean", seq_ids=padded)[0], got, tol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_nan_ratio_shows_in_ratio_max(device):
    b = _batch((300,), device)
    b["mask"][:] = True
    b["logp"][200] = float("nan")
    loss, stats = policy_value_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"])
    assert torch.isnan(loss) and torch.isnan(stats["ratio_max"])
    b["mask"][200] = False
    loss, stats = policy_value_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"])
    assert torch.isfinite(loss) and torch.isfinite(stats["ratio_max"])


# ---- hand-computed branches -------------------------------------------------------------------


def _one(logp, old, adv, **kw):
    lp = torch.tensor([logp], requires_grad=True)
    loss, stats = policy_value_loss(lp, torch.tensor([old]), torch.tensor([adv]),
                                    torch.tensor([True]), **kw)
    loss.backward()
    return loss.item(), stats, lp.grad.item()


@pytest.mark.parametrize(
    "ratio, adv, expect_pg, expect_grad, branch",
    [
        (1.1, 2.0, -2.2, -2.2, None),            # inside the clip range
        (1.5, 2.0, -2.4, 0.0, "clip_frac_high"),  # A > 0, ratio above 1 + eps: clipped
        (0.5, 2.0, -1.0, -1.0, None),            # A > 0, ratio below 1 - eps: not clipped
        (0.5, -2.0, 1.6, 0.0, "clip_frac_low"),   # A < 0, ratio below 1 - eps: clipped
        (1.5, -2.0, 3.0, 3.0, None),             # A < 0, ratio above 1 + eps: not clipped
    ],
)
def test_clip_branches(ratio, adv, expect_pg, expect_grad, branch):
    loss, stats, grad = _one(math.log(ratio), 0.0, adv)
    assert loss == pytest.approx(expect_pg, rel=1e-6)
    assert grad == pytest.approx(expect_grad, rel=1e-6, abs=1e-7)
    for key in ("clip_frac_low", "clip_frac_high"):
        assert stats[key].item() == (1.0 if key == branch else 0.0)
    assert stats["clip_frac"].item() == (1.0 if branch else 0.0)
    assert stats["ratio_mean"].item() == pytest.approx(ratio, rel=1e-6)


def test_dual_clip_bounds_negative_advantage():
    # A = -2, ratio = 5 > c = 3: pg = -ratio*A = 10 is bounded by -c*A = 6, gradient 0.
    loss, stats, grad = _one(math.log(5.0), 0.0, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(6.0, rel=1e-6) and grad == 0.0
    assert stats["dual_clip_frac"].item() == 1.0
    # Below the bound the ordinary branch applies.
    loss, stats, grad = _one(math.log(2.0), 0.0, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(4.0, rel=1e-6) and grad == pytest.approx(4.0, rel=1e-6)
    assert stats["dual_clip_frac"].item() == 0.0


def test_log_ratio_clamp_stops_gradient():
    loss, stats, grad = _one(30.0, 0.0, 1.0, eps_high=1e9)
    assert loss == pytest.approx(-math.exp(20.0), rel=1e-5)
    assert grad == 0.0
    assert stats["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_k3_kl_value_and_gradient():
    lp = torch.tensor([-1.0], requires_grad=True)
    x = 0.3  # ref - logp
    loss, stats = policy_value_loss(lp, lp.detach(), torch.zeros(1), torch.tensor([True]),
                                    ref_logp=torch.tensor([-0.7]), kl_coef=0.5)
    loss.backward()
    kl = math.exp(x) - x - 1
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * kl, rel=1e-5)
    assert lp.grad.item() == pytest.approx(0.5 * (1 - math.exp(x)), rel=1e-5)


@pytest.mark.parametrize("gap", [30.0, -25.0, 5.0])
def test_kl_clamp_value_and_gradient(gap):
    # x = ref - logp is clamped to [-20, 20]: beyond it the KL is constant and has no gradient
    lp = torch.tensor([-1.0], requires_grad=True)
    ref = lp.detach() + gap
    loss, stats = policy_value_loss(lp, lp.detach(), torch.zeros(1), torch.tensor([True]),
                                    ref_logp=ref, kl_coef=1.0)
    loss.backward()
    x = max(-20.0, min(20.0, gap))
    assert stats["kl"].item() == pytest.approx(math.exp(x) - x - 1, rel=1e-5)
    want = 0.0 if abs(gap) > 20 else -(math.exp(x) - 1)  # d/dlogp of exp(ref-lp)-(ref-lp)-1
    assert lp.grad.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_seq_mean_without_num_seqs_under_compile_is_a_clear_error():
    b = _batch((12,), "cpu")
    seq_ids = torch.arange(12) // 4

    def f(lp):
        return policy_value_loss(lp, b["old_logp"], b["advantages"], b["mask"],
                                 reduction="seq_mean", seq_ids=seq_ids)[0]

    with pytest.raises(Exception, match=r"pass `num_seqs`"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(b["logp"])


def test_value_clip_branches():
    def run(v, v_old, r):
        vv = torch.tensor([v], requires_grad=True)
        z = torch.zeros(1)
        loss, stats = policy_value_loss(z, z, z, torch.tensor([True]), values=vv,
                                        old_values=torch.tensor([v_old]),
                                        returns=torch.tensor([r]), vf_coef=2.0, vf_clip=0.2)
        loss.backward()
        return loss.item(), stats, vv.grad.item()

    # Unclipped error is larger: vf = 0.5 * 1^2, d/dV = (V - R).
    loss, stats, g = run(1.0, 0.0, 0.0)
    assert stats["vf_loss"].item() == pytest.approx(0.5) and g == pytest.approx(2.0)
    assert stats["vf_clip_frac"].item() == 0.0 and loss == pytest.approx(1.0)
    # Clipped error is larger: V_clip = 1 - 0.2 = 0.8 -> vf = 0.32, gradient 0 (clip active).
    loss, stats, g = run(0.0, 1.0, 0.0)
    assert stats["vf_loss"].item() == pytest.approx(0.32) and g == 0.0
    assert stats["vf_clip_frac"].item() == 1.0


# ---- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "sum"])
def test_empty_mask_gives_zero_loss_and_gradients(device, reduction):
    b = _batch((3, 20), device)
    b["mask"][:] = False
    b["advantages"][0, 0] = float("nan")  # masked out: must not leak
    (loss, stats, g, gv), _ = _run_both(b, kl_coef=0.1, reduction=reduction)
    assert loss.item() == 0.0
    assert all(torch.isfinite(s) and s.item() == 0.0 for s in stats.values())
    assert torch.all(g == 0) and torch.all(gv == 0)


def test_zero_advantage_gives_zero_policy_gradient():
    b = _batch((64,), "cpu", spread=1.0)
    b["advantages"].zero_()
    b["ref_logp"] = b["values"] = b["old_values"] = b["returns"] = None
    (loss, _, g, _), _ = _run_both(b)
    assert loss.item() == 0.0 and torch.all(g == 0)


def test_nan_propagation_is_as_documented():
    b = _batch((16,), "cpu")
    b["mask"][:] = True
    b["mask"][3] = False
    b["advantages"][3] = float("nan")
    loss, _ = policy_value_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"])
    assert torch.isfinite(loss)  # masked-out NaN is ignored
    b["advantages"][5] = float("nan")
    loss, _ = policy_value_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"])
    assert torch.isnan(loss)  # masked-in NaN propagates


def test_gradients_match_finite_differences():
    b = _batch((12,), "cpu", spread=0.1)
    kw = {"ref_logp": b["ref_logp"], "old_values": b["old_values"], "returns": b["returns"],
          "kl_coef": 0.3, "vf_coef": 0.5, "vf_clip": 0.5}

    def f(lp, v):
        return policy_value_loss(lp, b["old_logp"], b["advantages"], b["mask"], values=v, **kw)[0]

    lp, v = b["logp"].clone().requires_grad_(), b["values"].clone().requires_grad_()
    f(lp, v).backward()
    eps = 1e-3
    for x, grad, is_lp in ((b["logp"], lp.grad, True), (b["values"], v.grad, False)):
        for i in range(x.numel()):
            p, m = x.clone(), x.clone()
            p[i] += eps
            m[i] -= eps
            fp = f(p, b["values"]) if is_lp else f(b["logp"], p)
            fm = f(m, b["values"]) if is_lp else f(b["logp"], m)
            assert grad[i].item() == pytest.approx(((fp - fm) / (2 * eps)).item(), abs=2e-3)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    b = _batch((5, 16), device)
    lp = b["logp"].clone().requires_grad_()
    v = b["values"].clone().requires_grad_()
    op = torch.ops.dlmkern.policy_value_loss.default
    base = dict(logp=lp, old_logp=b["old_logp"], advantages=b["advantages"], mask=b["mask"],
                ref_logp=b["ref_logp"], values=v, old_values=b["old_values"],
                returns=b["returns"], seq_ids=None, weights=None, log_ratio=None, eps_low=0.2,
                eps_high=0.28, dual_clip=3.0, kl_coef=0.1, vf_coef=0.5, vf_clip=0.2,
                reduction=0, num_seqs=1, normalizer=64.0, kl_kind=1, has_ratio=True)
    for red, ns in ((0, 1), (1, 5), (2, 1)):
        torch.library.opcheck(op, _ARGS.in_order(dict(base, reduction=red, num_seqs=ns)))
    torch.library.opcheck(op, _ARGS.in_order(dict(
        base, ref_logp=None, values=None, old_values=None, returns=None, eps_high=0.2,
        dual_clip=None, kl_coef=0.0, normalizer=1.0)))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    b = _batch((4, 32), device)

    def f(lp, v):
        loss, stats = policy_value_loss(lp, b["old_logp"], b["advantages"], b["mask"],
                                        ref_logp=b["ref_logp"], values=v,
                                        old_values=b["old_values"], returns=b["returns"],
                                        kl_coef=0.1, reduction="seq_mean", num_seqs=4)
        return loss + stats["clip_frac"].detach() * 0

    lp1, v1 = b["logp"].clone().requires_grad_(), b["values"].clone().requires_grad_()
    lp2, v2 = b["logp"].clone().requires_grad_(), b["values"].clone().requires_grad_()
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(lp1, v1)
    out_e = f(lp2, v2)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)
    torch.testing.assert_close(v1.grad, v2.grad)


# ---- bad input --------------------------------------------------------------------------------


def _call(**over):
    b = _batch((8,), "cpu")
    b["values"] = b["old_values"] = b["returns"] = b["ref_logp"] = None
    b.update(over)
    pos = [b.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    return policy_value_loss(*pos, **b)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        ({"old_logp": torch.zeros(7)}, ValueError, r"`old_logp` must have the shape of `logp`"),
        ({"advantages": torch.zeros(8, dtype=torch.long)}, TypeError,
         r"`advantages` must be float32"),
        ({"mask": torch.ones(8)}, TypeError, r"`mask` must be bool"),
        ({"values": torch.zeros(8)}, ValueError, r"`values` and `returns` must be given together"),
        ({"old_values": torch.zeros(8)}, ValueError, r"`old_values` needs `values`"),
        ({"reduction": "mean"}, ValueError, r"`reduction` must be one of"),
        ({"reduction": "seq_mean"}, ValueError, r"needs `seq_ids`"),
        ({"reduction": "seq_mean", "seq_ids": torch.full((8,), 3), "num_seqs": 2}, IndexError,
         r"`seq_ids` of unmasked tokens must lie in \[0, 2\)"),
        ({"seq_ids": torch.zeros(8), "reduction": "seq_mean", "num_seqs": 1}, TypeError,
         r"`seq_ids` must be int64"),
        ({"dual_clip": 0.5}, ValueError, r"`dual_clip` must be > 1"),
        ({"reduction": "sum", "normalizer": 0.0}, ValueError, r"`normalizer` must be"),
        ({"eps_low": -0.1}, ValueError, r"`eps_low` and `eps_high` must be finite and >= 0"),
        ({"ref_logp": torch.zeros(8, 1)}, ValueError, r"`ref_logp` must have the shape"),
        ({"logp": torch.zeros(2, 2, 2), "old_logp": torch.zeros(2, 2, 2)}, ValueError,
         r"token tensors must be \[T\] or \[B, L\]"),
        ({"ref_logp": [0.0] * 8}, TypeError, r"`ref_logp` must be a torch.Tensor"),
        ({"returns": torch.zeros(8, device="meta"), "values": torch.zeros(8)}, ValueError,
         r"`returns` must be on cpu like `logp`"),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)
