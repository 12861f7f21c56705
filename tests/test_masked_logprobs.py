"""masked_logprobs / logprobs_from_logits against the pure-torch reference (SPEC 2.3)."""

import pytest
import torch
from dlmkern.ops import check_device_errors, logprobs_from_logits, masked_logprobs
from dlmkern.ops import reference as ref

from .conftest import devices

# (N, H, V): tiny, a vocabulary that is not a multiple of the 4096-column chunk, several chunks.
SHAPES = [(5, 8, 37), (64, 32, 4097), (300, 48, 9001)]
TOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def _inputs(n, h, v, dtype, device, scale=1.0):
    hidden = (torch.randn(n, h) * scale).to(dtype).to(device)
    weight = (torch.randn(v, h) / h**0.5).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), device=device)
    return hidden, weight, targets


def _rows(kind, n, device):
    if kind == "none":
        return None
    if kind == "empty":
        return torch.empty(0, dtype=torch.long, device=device)
    if kind == "all":
        return torch.arange(n, device=device)
    if kind == "random":
        return torch.randperm(n, device=device)[: max(1, n // 3)]
    if kind == "mask":
        return torch.rand(n, device=device) < 0.5
    raise AssertionError(kind)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows_kind", ["none", "empty", "all", "random", "mask"])
def test_forward_matches_reference(device, dtype, shape, rows_kind):
    hidden, weight, targets = _inputs(*shape, dtype, device, scale=3.0)
    rows = _rows(rows_kind, shape[0], device)
    for temperature in (1.0, 0.6):
        lp, ent = masked_logprobs(hidden, weight, targets, rows=rows, temperature=temperature,
                                  return_entropy=True)
        lp_r, ent_r = ref.masked_logprobs(hidden, weight, targets, rows=rows,
                                          temperature=temperature, return_entropy=True)
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        assert lp.shape == lp_r.shape
        tol = TOL[dtype]
        torch.testing.assert_close(lp, lp_r, atol=tol * 10, rtol=tol)
        torch.testing.assert_close(ent, ent_r, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("device", devices())
def test_targets_on_chunk_boundaries(device):
    v = 2 * 4096 + 3
    hidden, weight, _ = _inputs(6, 16, v, torch.float32, device)
    targets = torch.tensor([0, 4095, 4096, 8191, 8192, v - 1], device=device)
    lp = masked_logprobs(hidden, weight, targets)
    torch.testing.assert_close(lp, ref.masked_logprobs(hidden, weight, targets), atol=2e-4,
                               rtol=2e-4)


def test_hand_computed_case():
    # Two vocabulary entries, H = 1: logits = [h*1, h*(-1)]; logp of class 0 = -log(1 + e^{-2h}).
    hidden = torch.tensor([[0.5], [2.0]])
    weight = torch.tensor([[1.0], [-1.0]])
    targets = torch.tensor([0, 1])
    lp, ent = masked_logprobs(hidden, weight, targets, return_entropy=True)
    import math

    expect_lp = [-math.log1p(math.exp(-1.0)), -math.log1p(math.exp(4.0))]
    p = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-4.0))]
    expect_ent = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) for q in p]
    torch.testing.assert_close(lp, torch.tensor(expect_lp), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, torch.tensor(expect_ent), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_ignore_index_gives_zero_and_no_gradient(device):
    hidden, weight, targets = _inputs(8, 16, 50, torch.float32, device)
    targets[2] = -100
    hidden.requires_grad_(True)
    lp, ent = masked_logprobs(hidden, weight, targets, ignore_index=-100, return_entropy=True)
    assert lp[2] == 0 and ent[2] == 0
    (lp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad[2] == 0)
    assert torch.any(hidden.grad[3] != 0)
    # A negative target other than ignore_index is out of range, not ignored. The CPU raises at
    # once; CUDA checks it on the device (no host sync per call) and reports it at the next check.
    targets[5] = -7
    match = r"targets\[5\] = -7" if device == "cpu" else r"a `targets` entry was outside"
    with pytest.raises(IndexError, match=match):
        masked_logprobs(hidden, weight, targets, ignore_index=-100)
        check_device_errors(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_kind", ["none", "random", "mask", "duplicates"])
def test_gradients_match_reference(device, dtype, rows_kind):
    n, h, v = 40, 24, 4100
    hidden, weight, targets = _inputs(n, h, v, dtype, device, scale=2.0)
    targets[1] = -100
    if rows_kind == "duplicates":
        rows = torch.tensor([3, 1, 3, 7, 0, 3], device=device)
    else:
        rows = _rows(rows_kind, n, device)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = masked_logprobs(h1, w1, targets, rows=rows, temperature=0.8, return_entropy=True)
    lp_r, ent_r = ref.masked_logprobs(h2, w2, targets, rows=rows, temperature=0.8,
                                      return_entropy=True)
    g1, g2 = torch.randn_like(lp), torch.randn_like(lp)
    (lp * g1 + ent * g2).sum().backward()
    (lp_r * g1 + ent_r * g2).sum().backward()
    assert h1.grad.dtype == dtype and w1.grad.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=tol, rtol=tol)


SMALL_UPSTREAM_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def small_upstream_gradient_errors(dtype, device="cpu"):
    """Relative errors of d_hidden and d_weight for a policy-loss-sized upstream gradient.

    A policy loss averaged over many tokens sends ~1e-3 per token; times p_j ~ 1/V the gradient
    tile entries sit far below fp16's normal range. The kernel scales them up by a power of two
    and back down in fp32, so the gradients keep their precision (vs an fp32 reference).
    Similar hidden rows make the weight gradient of non-target tokens (made only of those tiny
    entries) sum coherently into fp16's normal range, so its error measures the tiles'
    precision (on the CUDA emulator: ~5x the fp16 tolerance with the scaling disabled)."""
    n, h, v = 128, 64, 20000
    g = torch.Generator().manual_seed(3)
    base = torch.randn(h, generator=g) * 2
    hidden = (base + 0.1 * torch.randn(n, h, generator=g)).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=g) * 0.02).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (masked_logprobs(h1, w1, targets).sum() * 1e-3).backward()
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    (ref.masked_logprobs(h2, w2, targets).sum() * 1e-3).backward()
    return [((a.grad.float() - b.grad).norm() / b.grad.norm()).item()
            for a, b in ((h1, h2), (w1, w2))]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_small_upstream_gradients_survive_reduced_precision_tiles(device, dtype):
    errs = small_upstream_gradient_errors(dtype, device)
    assert max(errs) < SMALL_UPSTREAM_TOL[dtype], errs


def test_only_logp_gradient_and_single_input_gradient():
    hidden, weight, targets = _inputs(10, 8, 30, torch.float32, "cpu")
    w = weight.clone().requires_grad_()
    masked_logprobs(hidden, w, targets).sum().backward()
    w_r = weight.clone().requires_grad_()
    ref.masked_logprobs(hidden, w_r, targets).sum().backward()
    torch.testing.assert_close(w.grad, w_r.grad, atol=1e-5, rtol=1e-5)


def test_reference_gradients_pass_gradcheck_in_float64():
    hidden, weight, targets = _inputs(4, 3, 7, torch.float64, "cpu")
    rows = torch.tensor([0, 2, 3])

    def f(hh, ww):
        lp, ent = ref.masked_logprobs(hh, ww, targets, rows=rows, temperature=0.7,
                                      return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_()))


def test_kernel_gradients_match_finite_differences():
    # The kernels compute in fp32: central differences in fp64 arithmetic on the fp32 op.
    hidden, weight, targets = _inputs(4, 3, 7, torch.float32, "cpu")
    rows = torch.tensor([0, 2, 3])
    gl, ge = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def loss(hh, ww):
        lp, ent = masked_logprobs(hh, ww, targets, rows=rows, temperature=0.7,
                                  return_entropy=True)
        return (lp.double() * gl + ent.double() * ge).sum()

    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss(hh, ww).backward()
    eps = 1e-2
    for param, grad in ((hidden, hh.grad), (weight, ww.grad)):
        numeric = torch.zeros_like(param, dtype=torch.float64)
        for i in range(param.numel()):
            plus, minus = param.clone(), param.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            args_p = (plus, weight) if param is hidden else (hidden, plus)
            args_m = (minus, weight) if param is hidden else (hidden, minus)
            numeric.view(-1)[i] = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        torch.testing.assert_close(grad.double(), numeric, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    hidden, weight, targets = _inputs(12, 8, 33, torch.float32, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    op = torch.ops.dlmkern.masked_logprobs.default
    mask = torch.zeros(12, dtype=torch.bool, device=device)
    mask[[0, 4, 7]] = True  # a bool mask: data-dependent output size in the fake
    for rows in (None, torch.tensor([1, 5, 5, 0], device=device), mask):
        torch.library.opcheck(op, (hidden, weight, targets, rows, 0.9, -100))
    lp, ent, lse = op(hidden, weight, targets, None, 1.0, -100)
    bwd = torch.ops.dlmkern.masked_logprobs_backward.default
    torch.library.opcheck(
        bwd,
        (torch.randn(12, device=device), None, hidden.detach(), weight.detach(), targets, None,
         lse.detach(), ent.detach(), 1.0, -100, [True, True]),
    )


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(device, backend):
    hidden, weight, targets = _inputs(16, 8, 40, torch.float32, device)
    rows = torch.tensor([0, 3, 9, 15], device=device)

    def f(hh, ww):
        lp, ent = masked_logprobs(hh, ww, targets, rows=rows, temperature=0.9,
                                  return_entropy=True)
        return (lp * 2 + ent).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out_c, out_e = compiled(h1, w1), f(h2, w2)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


# ---- bad input --------------------------------------------------------------------------------


def _bad_call(match, exc, **overrides):
    hidden, weight, targets = _inputs(6, 8, 20, torch.float32, "cpu")
    args = {"hidden": hidden, "weight": weight, "targets": targets}
    args.update(overrides)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    kw = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "targets")}
    with pytest.raises(exc, match=match):
        masked_logprobs(args["hidden"], args["weight"], args["targets"], **kw)
    for k, v in before.items():  # nothing was written into the inputs
        assert torch.equal(args.get(k, kw.get(k)), v)


def test_bad_input_shapes():
    _bad_call(r"`weight` must be \[V, 8\]", ValueError, weight=torch.randn(20, 7))
    _bad_call(r"`hidden` must be 2-D", ValueError, hidden=torch.randn(6, 8, 1))
    _bad_call(r"`weight` must be 2-D", ValueError, weight=torch.randn(20))
    _bad_call(r"`targets` must have shape \[6\]", ValueError,
              targets=torch.zeros(5, dtype=torch.long))


def test_bad_input_target_range():
    _bad_call(r"`targets` must lie in \[0, 20\).*targets\[2\] = 20", IndexError,
              targets=torch.tensor([0, 1, 20, 3, 4, 5]))
    _bad_call(r"targets\[0\] = -1", IndexError, targets=torch.tensor([-1, 1, 2, 3, 4, 5]))


def test_bad_input_dtypes():
    _bad_call(r"`targets` must be int64", TypeError, targets=torch.zeros(6))
    _bad_call(r"`hidden` must be float32, float16 or bfloat16", TypeError,
              hidden=torch.zeros(6, 8, dtype=torch.int32),
              weight=torch.zeros(20, 8, dtype=torch.int32))
    _bad_call(r"`weight` must have the dtype of `hidden`", TypeError,
              weight=torch.randn(20, 8, dtype=torch.float64))
    _bad_call(r"`rows` must be int64 indices or a bool mask", TypeError,
              rows=torch.tensor([0.0, 1.0]))
    _bad_call(r"`hidden` must be a torch.Tensor", TypeError, hidden=[[1.0] * 8] * 6)


def test_bad_input_rows_and_temperature():
    _bad_call(r"`rows` indices must lie in \[0, 6\)", IndexError, rows=torch.tensor([0, 6]))
    _bad_call(r"bool `rows` must have shape \[6\]", ValueError,
              rows=torch.ones(5, dtype=torch.bool))
    _bad_call(r"`temperature` must be a finite number > 0", ValueError, temperature=0.0)
    _bad_call(r"`temperature` must be a finite number > 0", ValueError, temperature=float("nan"))


def test_bad_input_device():
    hidden, weight, targets = _inputs(6, 8, 20, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"`weight` must be on cpu like `hidden`, got meta"):
        masked_logprobs(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match=r"`targets` must be on cpu like `hidden`"):
        masked_logprobs(hidden, weight, targets.to("meta"))


# ---- logprobs_from_logits ----------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprobs_from_logits_matches_reference(device, dtype):
    logits = (torch.randn(3, 5, 1003) * 4).to(dtype).to(device)
    targets = torch.randint(0, 1003, (3, 5), device=device)
    targets[0, 1] = -100
    for temperature in (1.0, 1.7):
        lp, ent = logprobs_from_logits(logits, targets, temperature=temperature,
                                       return_entropy=True)
        lp_r, ent_r = ref.logprobs_from_logits(logits, targets, temperature=temperature,
                                               return_entropy=True)
        assert lp.shape == (3, 5) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, lp_r, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ent, ent_r, atol=1e-4, rtol=1e-4)
    x1 = logits.float().clone().requires_grad_()
    x2 = logits.float().clone().requires_grad_()
    lp, ent = logprobs_from_logits(x1, targets, temperature=0.5, return_entropy=True)
    lp_r, ent_r = ref.logprobs_from_logits(x2, targets, temperature=0.5, return_entropy=True)
    g1, g2 = torch.randn_like(lp), torch.randn_like(lp)
    (lp * g1 + ent * g2).sum().backward()
    (lp_r * g1 + ent_r * g2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=3e-4, rtol=1e-3)
    assert torch.all(x1.grad[0, 1] == 0)


@pytest.mark.parametrize("device", devices())
def test_logprobs_from_logits_with_masked_out_logits(device):
    # -inf logits (tokens masked out, e.g. by top-k) have p = 0: no NaN in logp, entropy or grads.
    logits = torch.randn(4, 6, 300, device=device) * 3
    logits[..., 0] = -float("inf")            # first column: empty running state meets -inf
    logits[..., 7:250:3] = -float("inf")       # scattered, across the tensor
    logits[1, 2, :] = -float("inf")
    logits[1, 2, 5] = 2.0                      # one finite logit left: p = 1, entropy 0
    targets = torch.randint(250, 300, (4, 6), device=device)  # finite logits
    targets[1, 2] = 5
    targets[0, 0] = 0                          # target whose logit is -inf: logp = -inf
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    lp, ent = logprobs_from_logits(x1, targets, temperature=0.8, return_entropy=True)
    lp_r, ent_r = ref.logprobs_from_logits(x2, targets, temperature=0.8, return_entropy=True)
    assert lp[0, 0] == -float("inf") and lp_r[0, 0] == -float("inf")
    assert lp[1, 2] == 0 and ent[1, 2] == 0
    assert torch.isfinite(ent).all() and torch.isfinite(lp.flatten()[1:]).all()
    torch.testing.assert_close(lp, lp_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent, ent_r, atol=1e-4, rtol=1e-4)
    g1 = torch.randn_like(lp)
    g1[0, 0] = 0.0                             # d(-inf)/dx is not a number worth comparing
    g2 = torch.randn_like(lp)
    (lp * g1 + ent * g2).sum().backward()
    (lp_r * g1 + ent_r * g2).sum().backward()
    assert torch.isfinite(x1.grad).all()
    torch.testing.assert_close(x1.grad, x2.grad, atol=3e-4, rtol=1e-3)
    masked = torch.isneginf(logits)
    masked[0, 0, 0] = False                    # the target column keeps its logp gradient
    assert torch.all(x1.grad[masked] == 0)


@pytest.mark.parametrize("device", devices())
def test_large_logits_keep_their_precision(device):
    # fp32 logits near 3000 have an ulp of 2.4e-4: lse and E_p[z] formed in absolute terms would
    # lose that much. The kernels work relative to the row max; compare with a float64 reference.
    logits = (torch.randn(16, 5000) * 3 + 3000).to(device)
    targets = torch.randint(0, 5000, (16,), device=device)
    lp, ent = logprobs_from_logits(logits, targets, return_entropy=True)
    lp_r, ent_r = ref.logprobs_from_logits(logits.double(), targets, return_entropy=True)
    torch.testing.assert_close(lp.double(), lp_r, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(ent.double(), ent_r, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_logprobs_from_logits_opcheck_and_compile(device):
    logits = torch.randn(7, 50, device=device, requires_grad=True)
    targets = torch.randint(0, 50, (7,), device=device)
    torch.library.opcheck(torch.ops.dlmkern.logprobs_from_logits.default,
                          (logits, targets, 1.3, -100))

    def f(x):
        return logprobs_from_logits(x, targets, return_entropy=True)[1].sum()

    x1, x2 = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x1)
    torch.testing.assert_close(out, f(x2))
    out.backward()
    f(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_logprobs_from_logits_bad_input():
    with pytest.raises(ValueError, match=r"`targets` must have shape \(4,\)"):
        logprobs_from_logits(torch.randn(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError, match=r"targets\[1\] = 10"):
        logprobs_from_logits(torch.randn(4, 10), torch.tensor([0, 10, 1, 2]))
    with pytest.raises(TypeError, match=r"`logits` must be float32"):
        logprobs_from_logits(torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, dtype=torch.long))
