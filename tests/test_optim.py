"""MixedPrecisionAdamW: fp32 master weights for bf16 / fp16 parameters (what the trainers use)."""

import pytest
import torch
from dlmkern import TraceRL
from dlmkern.trainers.optim import MixedPrecisionAdamW, _pins
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_follow_the_fp32_trajectory(dtype, offload):
    """The master copy is exactly what fp32 AdamW computes from the same gradients; the parameter
    is the master rounded to its dtype (offloaded or not)."""
    w0 = torch.randn(64).to(dtype)
    grads = [g.to(dtype).float() for g in _grads(64, 5)]  # representable in both runs
    kw = dict(lr=1e-3, weight_decay=0.01)
    p = w0.clone()
    opt = _run(MixedPrecisionAdamW, p, grads, offload=offload, **kw)
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


@pytest.mark.parametrize("offload", [False, True])
def test_changes_made_outside_the_optimizer_are_adopted(offload):
    p = torch.randn(10).to(torch.bfloat16)
    opt = _run(MixedPrecisionAdamW, p, _grads(10, 2), lr=1e-3, offload=offload)
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


@pytest.mark.parametrize("offload", [(False, False), (True, False), (False, True)],
                         ids=["device", "offload_to_device", "device_to_offload"])
def test_bf16_trainer_keeps_fp32_masters_and_resumes_them(tmp_path, offload):
    """A bf16 policy trained at lr 1e-6: the update lands in the fp32 masters, and a checkpoint
    restores them (the next step after resume is the same as without the save), whether the
    run that wrote it and the one that resumes offload the optimizer state or not."""
    # micro-batches of ~1 trajectory: the bf16 gradients are summed in fp32 (stash / unstash)
    tr = TraceRL(_model().to(torch.bfloat16), TOK, DATA, exact,
                 _cfg(tmp_path / "a", lr=1e-6, micro_batch_tokens=40,
                      optimizer_offload=offload[0]))
    assert tr.opt.offload is offload[0]
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
                    _cfg(tmp_path / "b", lr=1e-6, micro_batch_tokens=40,
                         optimizer_offload=offload[1]))
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


def _accumulated_steps(params, opt, steps=4, micro=3, seed=1):
    """`steps` optimizer steps of `micro` stashed micro-batch gradients each (a weight edited
    outside the optimizer halfway), as the trainers run them."""
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        for m in range(micro):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            if m < micro - 1:
                opt.stash_grads()
        opt.unstash_grads()
        opt.step()
        opt.zero_grad()
        if s == 1:
            with torch.no_grad():
                params[0][2, 3] = 0.5  # adopted into the master at the next step


def test_offloaded_update_equals_the_device_update():
    """The same AdamW arithmetic on the host: parameters, masters, moments and step counters
    after several accumulated steps with weight decay (one group maximising) are bit-identical
    to the update kept on the parameters' device; fp32 parameters keep torch's AdamW."""
    torch.manual_seed(0)
    w0 = [torch.randn(33, 7).to(torch.bfloat16), torch.randn(5).to(torch.bfloat16),
          torch.randn(6).to(torch.float16), torch.randn(4, 3)]
    runs = []
    for offload, sums in ((False, True), (True, True), (True, False)):
        ps = [w.clone().requires_grad_() for w in w0]
        opt = MixedPrecisionAdamW([{"params": ps[:3]}, {"params": ps[3:], "maximize": True}],
                                  lr=1e-2, weight_decay=0.1, offload=offload,
                                  offload_grad_sums=sums)
        _accumulated_steps(ps, opt)
        runs.append((ps, opt))
    (dev, dev_opt), *offloaded = runs
    assert not torch.equal(dev[0], w0[0]) and float(dev[0].detach()[2, 3]) != 0.5  # moved on
    for host, host_opt in offloaded:  # the sums on the host, or kept on the device
        for p, q in zip(dev, host, strict=True):
            assert torch.equal(p, q)
            assert dev_opt.state[p].keys() == host_opt.state[q].keys()
            for k, v in dev_opt.state[p].items():
                assert torch.equal(v, host_opt.state[q][k]), k
        assert float(host_opt.state[host[0]]["step"]) == 4
    assert offloaded[0][1].sums_on_host and not offloaded[1][1].sums_on_host


class _Outputs(TorchDispatchMode):
    """Records (device type, dtype) of every tensor an op returns, and the pin_memory flag of
    every empty host tensor made."""

    def __init__(self):
        super().__init__()
        self.out, self.pinned = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format:
            self.pinned.append(bool((kwargs or {}).get("pin_memory")))
        self.out += [(t.device.type, t.dtype) for t in tree_leaves(out) if torch.is_tensor(t)]
        return out


@pytest.mark.parametrize("offload", [False, True])
def test_offload_keeps_fp32_state_off_the_parameters_device(offload):
    """CUDA parameters as fake tensors (no GPU here): with offload no op makes an fp32 tensor on
    the parameters' device through stash, unstash and two steps; the masters, moments and sums
    are host tensors, host buffers are pinned for CUDA, and the gradients go back to CUDA. (The
    device-kept run does make fp32 CUDA tensors: the check can fail.) Each kind's state dict
    loads into the other kind, placed where that one keeps its state."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert _pins(torch.device("cuda", 1)) and not _pins(torch.device("cpu"))
    assert not _pins(torch.device("meta"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        ps = [torch.nn.Parameter(torch.zeros(shape, device="cuda", dtype=torch.bfloat16))
              for shape in ((8, 4), (5,))]
        opt = MixedPrecisionAdamW(ps, lr=1e-3, weight_decay=0.1, offload=offload)
        with _Outputs() as seen:
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.stash_grads()
            sums = list(opt._grad_acc.values())
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.unstash_grads()
            grads = [(p.grad.device.type, p.grad.dtype) for p in ps]
            opt.step()
            opt.step()
        # a state dict of either kind loads into the other where that one keeps its state
        other = MixedPrecisionAdamW(ps, lr=1e-3, offload=not offload)
        with _Outputs() as loading:
            other.load_state_dict(opt.state_dict())
    fp32_on_cuda = ("cuda", torch.float32) in seen.out
    state = [v for p in ps for k, v in opt.state[p].items() if k != "step"]
    loaded = [v for p in ps for k, v in other.state[p].items() if k != "step"]
    assert len(state) == len(loaded) == 6
    assert all(v.dtype == torch.float32 for v in state + sums + loaded)
    assert grads == [("cuda", torch.bfloat16)] * 2
    assert all((p.device.type, p.dtype) == ("cuda", torch.bfloat16) for p in ps)
    host, device = (state + sums, loaded) if offload else (loaded, state)
    assert all(v.device.type == "cpu" for v in host)
    assert all(v.device.type == "cuda" for v in device)
    if offload:
        assert not fp32_on_cuda
        assert seen.pinned and all(seen.pinned)  # every host buffer exchanged with CUDA
    else:
        assert fp32_on_cuda
        assert not any(d == "cuda" for d, _ in loading.out)  # no bf16 copy of the state there


def _fsdp_model(offload: bool):
    """A bf16 two-layer model sharded by FSDP2 over the 2 ranks as distributed.shard does
    (fp32 gradient reduction; 5 and 3 rows: uneven shards), and its optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(torch.bfloat16)
    mesh = init_device_mesh("cpu", (2,))
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    fully_shard(model[0], mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model, MixedPrecisionAdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                      offload=offload)


def _fsdp_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for m in range(2):  # two micro-batches, summed in fp32
            x = torch.randn(4, 6, generator=g).to(torch.bfloat16)
            model(x).float().pow(2).mean().backward()
            if m == 0:
                opt.stash_grads()
        opt.unstash_grads()
        opt.step()
        opt.zero_grad()


def _shard(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _assert_same(a, b):
    """Two (model, optimizer) pairs hold the same local parameters and optimizer state."""
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p.to_local(), q.to_local())
        for k in ("master", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(_shard(a[1].state[p][k]), _shard(b[1].state[q][k])), k


def _fsdp_worker(rank, store, out):
    """Rank `rank` of 2 (gloo): offloaded and device-kept optimizers of the same sharded model
    agree; each writes a checkpoint (checkpoint.py's dcp state) that the other kind resumes."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from dlmkern.trainers.checkpoint import Checkpointing, _set_models
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.tensor import DTensor

    class Holder(Checkpointing):
        def __init__(self, model, opt):
            self.model, self.opt = model, opt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        dev, host = _fsdp_model(False), _fsdp_model(True)
        for m in (dev, host):
            _fsdp_steps(*m, steps=3, seed=rank)
        _assert_same(dev, host)
        for p in host[0].parameters():
            master = host[1].state[p]["master"]
            assert isinstance(master, DTensor) and master.placements == p.placements
            assert master.shape == p.shape and master.dtype == torch.float32
            local = master.to_local()
            assert local.device.type == "cpu" and local.shape == p.to_local().shape
        resumed = []
        for name, (model, opt), offload in (("dev", dev, True), ("host", host, False)):
            dcp.save(Holder(model, opt)._state(), checkpoint_id=f"{out}/{name}")
            fresh = Holder(*_fsdp_model(offload))
            _fsdp_steps(fresh.model, fresh.opt, steps=1, seed=7)  # state to be replaced
            state = fresh._state()
            dcp.load(state, checkpoint_id=f"{out}/{name}",
                     planner=DefaultLoadPlanner(allow_partial_load=True))
            _set_models(state, [("model", fresh.model, fresh.opt)])
            _assert_same((model, opt), (fresh.model, fresh.opt))
            resumed.append((fresh.model, fresh.opt))
        for m in (dev, host, *resumed):
            _fsdp_steps(*m, steps=1, seed=10 + rank)
        for m in (host, *resumed):
            _assert_same(dev, m)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_offload_under_fsdp2_on_two_ranks(tmp_path):
    """FSDP2 on 2 gloo ranks: each rank offloads its own shard (the masters stay DTensors laid
    out as the parameters, local shards on the host), the update equals the device-kept one, and
    checkpoints resume across the two kinds (checkpoint.py's dcp state)."""
    torch.multiprocessing.spawn(_fsdp_worker, args=(str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2)


def test_offload_can_keep_the_gradient_sums_on_the_device():
    """offload_grad_sums=False: masters and moments on the host, the fp32 sums on the
    parameters' (fake CUDA) device: 4 bytes per parameter there, none on the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        ps = [torch.nn.Parameter(torch.zeros(8, 4, device="cuda", dtype=torch.bfloat16))]
        opt = MixedPrecisionAdamW(ps, lr=1e-3, offload=True, offload_grad_sums=False)
        ps[0].grad = torch.ones_like(ps[0])
        opt.stash_grads()
        sums = list(opt._grad_acc.values())
        ps[0].grad = torch.ones_like(ps[0])
        opt.unstash_grads()
        opt.step()
    assert [(t.device.type, t.dtype) for t in sums] == [("cuda", torch.float32)]
    assert all(v.device.type == "cpu" for k, v in opt.state[ps[0]].items() if k != "step")
