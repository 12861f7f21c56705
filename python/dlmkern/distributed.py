"""torch.distributed helpers (SPEC 4.6): launch with torchrun, shard with FSDP2 (fully_shard),
NCCL on GPUs and gloo on CPUs (DLMKERN_DIST_BACKEND overrides). No home-made parallelism: one
process per rank, the trainers split the prompts of a step across ranks and normalise losses
over the global token count."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world() -> int:
    return dist.get_world_size() if enabled() else 1


def init() -> bool:
    """Initialises the process group when launched by torchrun (WORLD_SIZE > 1). Returns whether
    training is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = os.environ.get("DLMKERN_DIST_BACKEND") or (
            "nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        # A process group still alive at interpreter exit is torn down during static destruction,
        # where gloo can abort ("terminate called without an active exception", SIGABRT) after
        # all work is done, when a peer closes its connections first: meet, then destroy.
        atexit.register(_destroy_at_exit)
    return True


def _destroy_at_exit():
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        # gloo: a peer that died is reported within the timeout, not waited for. NCCL has no
        # such barrier (a crashed rank would hang here) and no such abort: destroy only.
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
    finally:
        dist.destroy_process_group()


def local_device() -> torch.device:
    """This rank's device: its GPU when there is CUDA (cuda:LOCAL_RANK under torchrun, else the
    current GPU), otherwise the CPU. Where a run's weights, given as a path, are loaded."""
    return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_device(device, key: str = "device") -> torch.device:
    """``device`` as a torch.device; a ValueError naming `key` when it is not one."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{key} {device!r} is not a device (cpu, cuda, cuda:N)") from None


def check_device(device, key: str = "device") -> torch.device:
    """``device`` as a torch.device, refused (a ValueError naming `key`) when it is not a device
    or names a GPU this machine does not have: before any work, not as a CUDA error at the
    first tensor. Only torch.cuda.is_available / device_count are called."""
    dev = parse_device(device, key)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"{key} {device}: this machine has no CUDA GPU (torch.cuda.is_available() "
                         f"is False); use {key} cpu or leave {key} out")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{key} {device}: this machine has {torch.cuda.device_count()} CUDA "
                         f"GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def resolve_device(device) -> torch.device:
    """``device`` (default: the CPU) as a torch.device; a bare "cuda" names this rank's GPU
    (cuda:LOCAL_RANK under torchrun: not cuda:0 on every rank), explicit indices are kept."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type != "cuda" or dev.index is not None:
        return dev
    if "LOCAL_RANK" in os.environ:  # torchrun sets it; no CUDA call needed to read it
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


def to_local_device(model: torch.nn.Module) -> torch.nn.Module:
    """Under torchrun a model loaded onto cuda:0 before the process group existed sits there on
    every rank; move it to this rank's GPU (LOCAL_RANK)."""
    p = next(model.parameters(), None)
    if enabled() and p is not None and p.is_cuda:
        local = resolve_device("cuda")
        if p.device != local:
            model.to(local)
    return model


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: every transformer layer is its own shard group, the rest (embedding, final norm,
    lm_head, value head) belong to the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    with _host_modes_off():  # dlmkern.plan: the mesh reads its rank map on the host
        mesh = init_device_mesh(device, (world(),))
    # bf16 / fp16 models: gradients are reduced across ranks in fp32 (then stored in the
    # parameter dtype; the optimizer keeps fp32 masters, see trainers/optim.py)
    low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32 if low else None)
    trunk = getattr(model, "trunk", model)
    for layer in trunk.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _host_modes_off():
    """No fake-tensor / tracking mode for host bookkeeping while dlmkern.plan runs a step."""
    from dlmkern._host import _real_modes_off, planning

    return _real_modes_off() if planning() is not None else contextlib.nullcontext()


def _fsdp_modules(model):
    return [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Full (unsharded) parameters inside the block, for code that calls submodules outside
    their forward (the samplers' prefill / decode) or runs forwards a data-dependent number of
    times (uncached full-attention sampling, evaluation). Resharding after each forward is off
    inside, so no collective happens until the block ends: ranks may run different numbers of
    forwards without deadlocking. A no-op when not sharded."""
    mods = _fsdp_modules(model)
    # The layers reshard after each forward (shard() leaves fully_shard's default); the root
    # never does (FSDP2 turns that off for the root), so only the layers are switched here.
    layers = [m for m in mods if m is not model]
    for m in mods:
        m.unshard()
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)  # as shard() set them
        for m in mods:
            m.reshard()


def all_sum(x: float | int) -> float:
    if not enabled():
        return x
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    with _host_modes_off():  # a host value, whatever mode the caller runs in
        t = torch.tensor([float(x)], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return float(t.item())


def all_gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] when not distributed."""
    if not enabled():
        return [obj]
    out = [None] * world()
    with _host_modes_off():  # pickled into host tensors
        dist.all_gather_object(out, obj)
    return out


def barrier():
    if enabled():
        dist.barrier()
