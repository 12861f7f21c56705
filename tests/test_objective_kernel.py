"""The fused policy_value_loss kernel runs every objective setting in objective.FUSED (issue #28: a
new ratio level or KL kind is a change in the objective, the reference and the kernel's
arithmetic header): the CPU kernel and the CUDA kernel (on the CPU emulator) equal the reference
objective_loss, loss, every statistic and the gradients of logp and values, for each fused ratio
level x KL kind x token weights x reduction. The reference itself is checked against plain-torch
formulas in test_objective.py."""

import itertools

import pytest
import torch
from dlmkern import _cuda_emu
from dlmkern.ops import Objective, policy_value_loss, use_backend
from dlmkern.ops import objective as objective_mod
from dlmkern.ops import reference as ref
from dlmkern.ops.objective import FUSED
from dlmkern.ops.policy_value_loss import _ARGS, _op_arguments

LENGTHS = (7, 3, 12, 5, 9)


def _batch(seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    logp = -2 + 0.5 * torch.randn(T, generator=g)
    # per-sequence offsets push some sequence ratios out of the clip range, both sides
    old = logp - torch.tensor([0.4, 0.02, -0.5, 0.1, -0.05])[seq] + spread * 0.3 * torch.randn(
        T, generator=g)
    return {
        "logp": logp, "old_logp": old,
        "advantages": torch.tensor([1.0, -0.6, -1.4, 0.5, 0.9])[seq],
        "mask": torch.rand(T, generator=g) < 0.85,
        "ref_logp": logp + 0.4 * torch.randn(T, generator=g),
        "values": torch.randn(T, generator=g), "old_values": torch.randn(T, generator=g),
        "returns": torch.randn(T, generator=g),
        "weights": 0.3 + torch.rand(T, generator=g),
        "seq_ids": seq, "block_ids": torch.arange(T) // 4,
    }


def _run(b, obj, **kw):
    lp = b["logp"].clone().requires_grad_()
    v = b["values"].clone().requires_grad_()
    loss, stats = policy_value_loss(
        lp, b["old_logp"], b["advantages"], b["mask"], objective=obj, ref_logp=b["ref_logp"],
        values=v, old_values=b["old_values"], returns=b["returns"],
        weights=b["weights"] if obj.weighted else None,
        block_ids=b["block_ids"] if obj.ratio_level == "block" else None,
        seq_ids=b["seq_ids"], num_seqs=len(LENGTHS), vf_coef=0.7, vf_clip=0.3, **kw)
    loss.backward()
    return loss.detach(), {k: s.detach() for k, s in stats.items()}, lp.grad, v.grad


def _same(got, want, tol=1e-5):
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], atol=tol, rtol=tol, msg=k)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=tol)
    torch.testing.assert_close(got[3], want[3], atol=1e-6, rtol=tol)


OBJECTIVES = [
    Objective(ratio_level=level, kl_kind=kl, token_weights=w, reduction=red,
              dual_clip=2.0 if level != "none" else 0.0, eps_high=0.28, kl_coef=0.07,
              loss_normalizer=9.0)
    for level, kl, w, red in itertools.product(FUSED["ratio_level"], FUSED["kl_kind"],
                                               ("none", "elbo"),
                                               ("token_mean", "seq_mean", "sum"))
    # every token_weights kind reaches the op as the same thing: a weights tensor
]


def _name(o):
    return f"{o.ratio_level}-{o.kl_kind}-{o.token_weights}-{o.reduction}"


@pytest.mark.parametrize("obj", OBJECTIVES, ids=_name)
def test_the_cpu_kernel_runs_every_objective_as_the_reference(obj, monkeypatch):
    assert obj.fused() and obj.path_note() is None
    b = _batch()
    with use_backend("reference"):
        want = _run(b, obj)
    calls = []
    real = torch.ops.dlmkern.policy_value_loss
    monkeypatch.setattr(torch.ops.dlmkern, "policy_value_loss",
                        type("Spy", (), {"__call__": lambda s, *a: calls.append(1) or real(*a),
                                         "default": real.default})())
    _same(_run(b, obj), want)
    assert calls, "the fused kernel did not run"


@pytest.mark.skipif(not _cuda_emu.available(), reason="dlmkern built without DLMKERN_CUDA_EMU")
@pytest.mark.parametrize("obj", OBJECTIVES, ids=_name)
def test_the_cuda_kernel_runs_every_objective_as_the_reference(obj):
    b = _batch(1)
    with use_backend("reference"):
        want = _run(b, obj)
    with _cuda_emu.emulated_cuda():
        got = _run(b, obj)
    _same(got, want)


def test_the_kernel_reads_the_group_log_ratio_the_reference_defines():
    # one owner of the grouping: the kernel's log_ratio input is reference.ratio_inputs
    b = _batch(2)
    obj = Objective(ratio_level="block")
    args = _op_arguments(obj, vf_coef=0.5, vf_clip=0.2, num_seqs=len(LENGTHS),
                         block_ids=b["block_ids"], **{k: b[k] for k in (
                             "logp", "old_logp", "advantages", "mask", "ref_logp", "values",
                             "old_values", "returns", "seq_ids")}, weights=None)
    m, d = b["mask"], b["logp"] - b["old_logp"]
    for s, blk in {(int(s), int(k)) for s, k in zip(b["seq_ids"], b["block_ids"], strict=True)}:
        sel = (b["seq_ids"] == s) & (b["block_ids"] == blk) & m
        if sel.any():
            torch.testing.assert_close(args["log_ratio"][sel], d[sel].mean().expand(
                int(sel.sum())))
    assert args["kl_kind"] == 1 and args["has_ratio"] is True
    assert set(args) == set(_ARGS.names)


def test_opcheck_with_the_objective_inputs():
    b = _batch(3)
    op = torch.ops.dlmkern.policy_value_loss.default
    lp = b["logp"].clone().requires_grad_()
    v = b["values"].clone().requires_grad_()
    lr, _ = ref.ratio_inputs(Objective(ratio_level="sequence"), b["logp"] - b["old_logp"],
                             b["mask"], None, b["seq_ids"], None)
    for kl_kind, ratio, log_ratio, red in ((0, True, lr, 1), (2, False, None, 0),
                                           (1, True, None, 2)):
        named = dict(logp=lp, old_logp=b["old_logp"], advantages=b["advantages"],
                     mask=b["mask"], ref_logp=b["ref_logp"], values=v,
                     old_values=b["old_values"], returns=b["returns"], seq_ids=b["seq_ids"],
                     weights=b["weights"], log_ratio=log_ratio, eps_low=0.2, eps_high=0.28,
                     dual_clip=None, kl_coef=0.1, vf_coef=0.5, vf_clip=0.2, reduction=red,
                     num_seqs=len(LENGTHS), normalizer=16.0, kl_kind=kl_kind, has_ratio=ratio)
        torch.library.opcheck(op, _ARGS.in_order(named))


@pytest.mark.parametrize("change, message", [
    ({"kl_kind": 7}, "unknown `kl_kind` code 7"),
    ({"has_ratio": False, "dual_clip": 2.0}, "`dual_clip` bounds a ratio's loss"),
    ({"has_ratio": False, "log_ratio": "lr"}, "`log_ratio` given but `has_ratio` is false"),
    ({"weights": "short"}, "`weights` must have the shape of `logp`"),
    ({"log_ratio": "int"}, "`log_ratio` must be float32, float16 or bfloat16"),
])
def test_the_kernel_refuses_bad_objective_arguments(change, message):
    b = _batch(4)
    T = b["logp"].numel()
    named = dict(logp=b["logp"], old_logp=b["old_logp"], advantages=b["advantages"],
                 mask=b["mask"], ref_logp=b["ref_logp"], values=None, old_values=None,
                 returns=None, seq_ids=None, weights=None, log_ratio=None, eps_low=0.2,
                 eps_high=0.2, dual_clip=None, kl_coef=0.1, vf_coef=0.5, vf_clip=0.2,
                 reduction=0, num_seqs=1, normalizer=1.0, kl_kind=1, has_ratio=True)
    sub = {"lr": torch.zeros(T), "short": torch.ones(T - 1),
           "int": torch.zeros(T, dtype=torch.long)}
    named.update({k: sub.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    before = {k: t.clone() for k, t in b.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.dlmkern.policy_value_loss(*_ARGS.in_order(named))
    assert all(torch.equal(before[k], b[k]) for k in b)  # nothing written


def test_a_setting_outside_fused_runs_on_the_reference(monkeypatch):
    # what a setting added to the Objective before the kernel has it does: the reference path
    monkeypatch.setitem(objective_mod.FUSED, "kl_kind", ("k3",))
    obj = Objective(kl_kind="quadratic", kl_coef=0.1)
    assert not obj.fused() and "kl_kind=quadratic" in obj.path_note()
    b = _batch(5)
    with use_backend("reference"):
        want = _run(b, obj)

    def no_kernel(*a, **k):
        raise AssertionError("the fused kernel ran an objective outside FUSED")

    monkeypatch.setattr(torch.ops.dlmkern, "policy_value_loss", no_kernel)
    _same(_run(b, obj), want)
