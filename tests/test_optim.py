"""MixedPrecisionAdamW: fp32 master weights for bf16 / fp16 parameters (what the trainers use)."""

import pytest
import torch
from dlmkern import TraceRL
from dlmkern.trainers.optim import MixedPrecisionAdamW

from .test_trainers import DATA, TOK, _cfg, _model, exact


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _run(opt_cls, p, grads, **kw):
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.to(p.dtype)
        opt.step()
    return opt


def test_fp32_parameters_get_torch_adamw_exactly():
    w0 = torch.randn(7, 5)
    kw = dict(lr=3e-2, weight_decay=0.1, betas=(0.8, 0.99))
    a, b = w0.clone(), w0.clone()
    _run(MixedPrecisionAdamW, a, _grads((7, 5), 4), **kw)
    _run(torch.optim.AdamW, b, _grads((7, 5), 4), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_follow_the_fp32_trajectory(dtype):
    """The master copy is exactly what fp32 AdamW computes from the same gradients; the parameter
    is the master rounded to its dtype."""
    w0 = torch.randn(64).to(dtype)
    grads = [g.to(dtype).float() for g in _grads(64, 5)]  # representable in both runs
    kw = dict(lr=1e-3, weight_decay=0.01)
    p = w0.clone()
    opt = _run(MixedPrecisionAdamW, p, grads, **kw)
    ref = w0.float().clone()
    _run(torch.optim.AdamW, ref, grads, **kw)
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(master, ref)
    assert torch.equal(p, ref.to(dtype))


def test_small_updates_accumulate_instead_of_vanishing():
    """lr 1e-6 on bf16 weights of ~0.02: plain AdamW's update is ~1% of the bf16 spacing and is
    rounded away every step; the master accumulates it until the parameter moves."""
    w0 = torch.full((16,), 0.02).to(torch.bfloat16)
    grads = [torch.ones(16)] * 200
    plain = w0.clone()
    _run(torch.optim.AdamW, plain, grads, lr=1e-6, weight_decay=0.0)
    assert torch.equal(plain, w0)
    mixed = w0.clone()
    opt = _run(MixedPrecisionAdamW, mixed, grads, lr=1e-6, weight_decay=0.0)
    moved = float(w0.float()[0] - opt.state[mixed]["master"][0])
    assert moved == pytest.approx(200e-6, rel=1e-3)
    assert (mixed < w0).all()


def test_changes_made_outside_the_optimizer_are_adopted():
    p = torch.randn(10).to(torch.bfloat16)
    opt = _run(MixedPrecisionAdamW, p, _grads(10, 2), lr=1e-3)
    master = opt.state[p]["master"].clone()
    assert not torch.equal(master, p.float())  # it holds more than the bf16 values
    with torch.no_grad():
        p[3] = 5.0  # e.g. weights loaded into the live model
    p.grad = torch.zeros(10, dtype=torch.bfloat16)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert float(p[3]) == 5.0 and float(opt.state[p]["master"][3]) == 5.0
    others = torch.arange(10) != 3
    assert torch.equal(opt.state[p]["master"][others], master[others])  # untouched: kept


def test_hooks_run_once_per_step_and_amsgrad_is_refused():
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # AdamW.step gets its hook wrapper
    p = torch.randn(4).to(torch.bfloat16).requires_grad_()
    opt = MixedPrecisionAdamW([p, torch.randn(3, requires_grad=True)], lr=1e-3)
    calls = []
    handle = opt.register_step_pre_hook(lambda *_: calls.append(1))
    for q in opt.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    opt.step()
    handle.remove()
    assert len(calls) == 1
    with pytest.raises(ValueError, match="amsgrad"):
        MixedPrecisionAdamW([p], amsgrad=True)


def test_bf16_trainer_keeps_fp32_masters_and_resumes_them(tmp_path):
    """A bf16 policy trained at lr 1e-6: the update lands in the fp32 masters, and a checkpoint
    restores them (the next step after resume is the same as without the save)."""
    # micro-batches of ~1 trajectory: the bf16 gradients are summed in fp32 (stash / unstash)
    tr = TraceRL(_model().to(torch.bfloat16), TOK, DATA, exact,
                 _cfg(tmp_path / "a", lr=1e-6, micro_batch_tokens=40))
    before = {n: p.detach().float().clone() for n, p in tr.model.named_parameters()}
    batch = tr.rollout(DATA[:1])
    trajs, rewards = batch.trajs, batch.rewards
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    tr.update(trajs, adv, rewards)
    moved = [n for n, p in tr.model.named_parameters()
             if not torch.equal(tr.opt.state[p]["master"], before[n])]
    assert len(moved) == len(before)
    path = tmp_path / "ckpt"
    tr.save(str(path))
    again = TraceRL(_model(seed=5).to(torch.bfloat16), TOK, DATA, exact,
                    _cfg(tmp_path / "b", lr=1e-6, micro_batch_tokens=40))
    again.resume(str(path))
    for (_, p), (_, q) in zip(tr.model.named_parameters(), again.model.named_parameters(),
                              strict=True):
        assert torch.equal(tr.opt.state[p]["master"], again.opt.state[q]["master"])
    tr.update(trajs, adv, rewards)
    again.update(trajs, adv, rewards)
    for (_, p), (_, q) in zip(tr.model.named_parameters(), again.model.named_parameters(),
                              strict=True):
        assert torch.equal(p, q)
        assert torch.equal(tr.opt.state[p]["master"], again.opt.state[q]["master"])


def test_stashed_gradients_sum_in_fp32_and_round_once():
    """Gradient accumulation over many micro-batches: bf16 .grad accumulation rounds at every
    backward; stash_grads / unstash_grads sum in fp32 and round once."""
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(256, generator=g) + 0.1).to(torch.bfloat16).float() for _ in range(64)]
    exact = torch.stack(parts).double().sum(0)
    p = torch.zeros(256, dtype=torch.bfloat16, requires_grad=True)
    opt = MixedPrecisionAdamW([p], lr=1e-3)
    naive = torch.zeros(256, dtype=torch.bfloat16)
    for x in parts:
        (p * x.to(torch.bfloat16)).sum().backward()
        naive += x.to(torch.bfloat16)
        opt.stash_grads()
        assert p.grad is None
    opt.unstash_grads()
    assert torch.equal(p.grad, exact.to(torch.bfloat16))  # one rounding of the exact sum
    assert (naive.double() - exact).abs().mean() > 4 * (p.grad.double() - exact).abs().mean()
    assert not opt._grad_acc and len(opt.state) == 0  # nothing left in the saved state
    (p * parts[0].to(torch.bfloat16)).sum().backward()
    opt.stash_grads()
    opt.zero_grad()  # an interrupted accumulation does not leak into the next step
    (p * parts[1].to(torch.bfloat16)).sum().backward()
    opt.unstash_grads()
    assert torch.equal(p.grad, parts[1].to(torch.bfloat16))
