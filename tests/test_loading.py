"""Loading (issue 25, item 5): a checkpoint goes straight to the run's device and dtype (built on
meta, one tensor at a time, no copy of the model in another dtype), trainers given a path load
onto the device and dtype they are asked for, a bare "cuda" is this rank's GPU, float32 with the
CUDA kernels is refused when the run is configured, and value models are filled from the
policy instead of being initialised at random."""

import json
import os

import pytest
import torch
from dlmkern import distributed
from dlmkern.cli import main, parse_run
from dlmkern.data import CharTokenizer
from dlmkern.doctor import e2e_checks as e2e
from dlmkern.models import DiffusionLM, ValueModel, load, tiny_config, upstream_name
from dlmkern.models.io import load_config, run_dtype
from dlmkern.ops import layouts, use_backend
from dlmkern.trainers import SFT, SFTConfig, TraceRL
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Allocations(TorchDispatchMode):
    """Bytes of the new (non-meta) storages that dispatched ops create: an in-place copy or a
    view makes none, a cast or an empty tensor makes one."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    self.bytes += t.untyped_storage().nbytes()
        return out


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once


def _policy(family="sdar", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return DiffusionLM(tiny_config(family, **kw)).to(dtype)


def _saved(tmp_path, dtype=torch.bfloat16, **kw) -> str:
    path = str(tmp_path / f"ckpt_{str(dtype)[6:]}_{len(kw)}")
    _policy(dtype=dtype, **kw).save_pretrained(path)
    return path


def _file_tensors(path) -> dict:
    """The checkpoint's tensors under our names, read by safetensors itself (the reference)."""
    raw = load_file(os.path.join(path, "model.safetensors"))
    with torch.device("meta"):
        names = DiffusionLM(load_config(path)).state_dict()
    return {n: raw[upstream_name("sdar", n)] for n in names if upstream_name("sdar", n) in raw}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32, torch.float16])
def test_load_gives_the_file_tensors_in_the_target_dtype(tmp_path, tied, dtype):
    path = _saved(tmp_path, tie_word_embeddings=tied)
    m = load(path, dtype=dtype)
    want = dtype or torch.bfloat16  # None: the checkpoint's own dtype (bf16 here)
    ref = _file_tensors(path)
    assert {p.dtype for p in m.parameters()} == {want}
    for name, p in m.state_dict().items():
        src = ref["embed.weight" if tied and name == "lm_head.weight" else name]
        assert torch.equal(p, src.to(want)), name  # bf16 -> bf16 bit for bit; casts as .to()
    if tied:
        assert m.lm_head.weight is m.embed.weight


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_allocates_the_model_once(tmp_path, tied, dtype):
    # The old path read the file (bf16), made an fp32 model, copied, then cast: about 3x a bf16
    # model for a bf16 -> bf16 load. Now each tensor is allocated once, in place.
    path = _saved(tmp_path, tie_word_embeddings=tied)
    with _Allocations() as alloc:
        m = load(path, dtype=dtype)
    assert _nbytes(m) <= alloc.bytes <= _nbytes(m) * 1.01, (alloc.bytes, _nbytes(m))


def test_load_onto_meta_checks_the_checkpoint_and_reads_nothing(tmp_path):
    path = _saved(tmp_path)
    with _Allocations() as alloc:
        m = load(path, device="meta")
    assert alloc.bytes == 0
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    t["model.norm.weight"] = torch.ones(3, dtype=torch.bfloat16)
    save_file(t, f)
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \(3,\)"):
        load(path, device="meta")


def test_sharded_bf16_checkpoint_loads_bit_exact(tmp_path):
    path = _saved(tmp_path)
    ref = load(path)
    t = load_file(os.path.join(path, "model.safetensors"))
    names = sorted(t)
    parts = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    for fname, keys in parts.items():
        save_file({k: t[k] for k in keys}, os.path.join(path, fname))
    os.remove(os.path.join(path, "model.safetensors"))
    index = {"weight_map": {k: f for f, keys in parts.items() for k in keys}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    for dtype in (None, torch.float32):
        m = load(path, dtype=dtype)
        for (n, a), b in zip(ref.state_dict().items(), m.state_dict().values(), strict=True):
            assert torch.equal(a.to(b.dtype), b), n


def test_a_checkpoint_that_mixes_dtypes_loads_in_float32_by_default(tmp_path):
    path = _saved(tmp_path, dtype=torch.float32)
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    t = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in t.items()}
    save_file(t, f)
    m = load(path)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert torch.equal(m.embed.weight, t["model.embed_tokens.weight"].float())


def test_a_bare_cuda_device_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "_lazy_init", _no_cuda)  # everything below reads env only
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.resolve_device("cuda") == torch.device("cuda", 3)
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert distributed.resolve_device(None) == torch.device("cpu")
    assert distributed.resolve_device("meta") == torch.device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.local_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.local_device() == torch.device("cpu")


def _no_cuda(*a, **k):
    raise AssertionError("a CUDA call came before the refusal")


def _char_dir(tmp_path, dtype):
    """e2e's tiny model (its character tokenizer's vocabulary), saved in ``dtype``."""
    path = str(tmp_path / f"model_{str(dtype)[6:]}")
    e2e.model("cpu").to(dtype).save_pretrained(path)
    return path


def _moved(before, model) -> bool:
    return any(not torch.equal(before[k], p.detach()) for k, p in model.named_parameters())


@pytest.mark.parametrize("asked, want", [({}, torch.float32),  # the CPU run's default
                                         ({"device": "cpu", "dtype": torch.bfloat16},
                                          torch.bfloat16),
                                         ({"device": "cpu", "dtype": "float16"}, torch.float16)])
def test_sft_given_a_path_trains_on_the_device_and_dtype_asked_for(tmp_path, asked, want):
    path = _char_dir(tmp_path, torch.bfloat16)  # the file's dtype is not the run's
    sft = SFT(path, e2e.TOK, e2e.DATA, SFTConfig(batch_size=8, total_steps=1, lr=1e-2,
                                                 output_dir=str(tmp_path / "out")), **asked)
    before = {k: p.detach().clone() for k, p in sft.model.named_parameters()}
    sft.train_step()
    assert _moved(before, sft.model)
    assert {(p.device.type, p.dtype) for p in sft.model.parameters()} == {("cpu", want)}


def test_rl_trainer_given_a_path_trains_value_model_and_policy_as_asked(tmp_path):
    path = _char_dir(tmp_path, torch.float32)
    tr = TraceRL(path, e2e.TOK, e2e.DATA, e2e.digit_share,
                 e2e._rl_cfg(str(tmp_path / "out"), use_value_model=True, total_steps=1),
                 device="cpu", dtype=torch.bfloat16)
    before = {k: p.detach().clone() for k, p in tr.value_model.named_parameters()}
    log = tr.train_step()
    assert "skipped" not in log and _moved(before, tr.value_model)
    for m in (tr.model, tr.value_model):
        assert {(p.device.type, p.dtype) for p in m.parameters()} == {("cpu", torch.bfloat16)}


def test_trainer_given_a_module_refuses_device_and_dtype(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"device / dtype apply to a model path"):
        SFT(e2e.model("cpu"), e2e.TOK, e2e.DATA, SFTConfig(output_dir=str(out)),
            dtype=torch.bfloat16)
    assert not out.exists()


def _float32_on_cuda(monkeypatch):
    """A machine that has CUDA, as far as the configuration can tell, and fails on any CUDA
    call: the refusal must come first (on a GPU machine as on this one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", _no_cuda)
    monkeypatch.setattr(torch.cuda, "current_device", _no_cuda)


REFUSAL = r"float32 cannot run on CUDA.*bfloat16 or float16"


def test_float32_with_cuda_is_refused_in_the_run_file(tmp_path, monkeypatch):
    model, data = _char_dir(tmp_path, torch.float32), tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    run = tmp_path / "run.yaml"
    run.write_text(f"algo: sft\nmodel: {model}\ndataset: {data}\ndtype: float32\n")
    assert parse_run(str(run), [])[0].dtype == "float32"  # on the CPU: allowed
    _float32_on_cuda(monkeypatch)
    with pytest.raises(ValueError, match=rf"run.yaml: dtype {REFUSAL}"):
        parse_run(str(run), [])
    assert parse_run(str(run), ["dtype=bfloat16"])[0].dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"dtype must be bfloat16, float16 or float32, got 'fp8'"):
        parse_run(str(run), ["dtype=fp8"])
    assert main(["train", str(run), f"output_dir={tmp_path / 'out'}"]) == 2
    assert not (tmp_path / "out").exists()


def test_float32_with_cuda_is_refused_by_sample_and_the_trainers(tmp_path, monkeypatch, capsys):
    path = _char_dir(tmp_path, torch.float32)
    _float32_on_cuda(monkeypatch)
    assert main(["sample", "--model", path, "--tokenizer", "char", "--prompt", "1+1=",
                 "--device", "cuda", "--dtype", "float32"]) == 2
    assert "--dtype float32 cannot run on CUDA" in capsys.readouterr().err
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"dtype {REFUSAL}"):
        SFT(path, e2e.TOK, e2e.DATA, SFTConfig(output_dir=str(out)), device="cuda",
            dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"dtype {REFUSAL}"):
        TraceRL(path, e2e.TOK, e2e.DATA, e2e.digit_share, e2e._rl_cfg(str(out)),
                device="cuda:0", dtype="float32")
    assert not out.exists()
    assert run_dtype("cuda") == torch.bfloat16 and run_dtype("cpu") == torch.float32
    with use_backend("reference"):  # dense torch attention takes float32 on CUDA
        assert run_dtype("cuda", "float32") == torch.float32


def test_train_command_loads_the_run_file_dtype(tmp_path):
    # `dlmkern train` hands the path to the trainer: dtype bfloat16 is honoured on the CPU too
    tok, model, data = CharTokenizer(), str(tmp_path / "model"), tmp_path / "d.jsonl"
    _policy(vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id).save_pretrained(model)
    data.write_text("\n".join(json.dumps(r) for r in e2e.DATA[:8]))
    out = tmp_path / "out"
    assert main(["train", os.path.join(ROOT, "configs", "block_sft.yaml"), f"model={model}",
                 f"dataset={data}", "tokenizer=char", "dtype=bfloat16", "total_steps=1",
                 "batch_size=4", f"output_dir={out}", "progress_bar=false", "instruction=",
                 "prompt_template="]) == 0
    saved = load_file(str(out / "final" / "model" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_value_model_from_policy_is_the_policy_trunk_and_a_zero_head(monkeypatch, dtype, tied):
    policy = _policy("dream", dtype, tie_word_embeddings=tied)
    real_normal = torch.nn.init.normal_

    def meta_only(*a, **k):  # a random init of real storage would be a wasted model
        assert (a[0] if a else k["tensor"]).is_meta, "from_policy initialised real weights"
        return real_normal(*a, **k)

    monkeypatch.setattr(torch.nn.init, "normal_", meta_only)
    with _Allocations() as alloc:
        vm = ValueModel.from_policy(policy)
    head = vm.value_head.weight.numel() + vm.value_head.bias.numel()
    assert alloc.bytes == _nbytes(policy) + head * policy.embed.weight.element_size()
    ref = policy.state_dict()
    for name, p in vm.trunk.state_dict().items():
        assert torch.equal(p, ref[name]) and p.dtype == dtype, name
        assert p.data_ptr() != ref[name].data_ptr(), name  # a copy: the policy trains apart
    assert {p.dtype for p in vm.parameters()} == {dtype}
    assert torch.all(vm.value_head.weight == 0) and torch.all(vm.value_head.bias == 0)
    if tied:
        assert vm.trunk.lm_head.weight is vm.trunk.embed.weight
    ids, lay = torch.randint(0, 62, (8,)), layouts.full([8])
    assert torch.all(vm(ids, lay) == 0)
    assert torch.equal(vm.trunk(ids, lay), policy(ids, lay))


def test_value_model_from_policy_checkpoint_loads_the_policy_once(tmp_path):
    path = _saved(tmp_path)
    with _Allocations() as alloc:
        vm = ValueModel.from_policy_checkpoint(path)
    assert alloc.bytes <= _nbytes(vm) * 1.01
    assert all(torch.equal(a, b) for a, b in zip(load(path).state_dict().values(),
                                                  vm.trunk.state_dict().values(), strict=True))
    vm.save_pretrained(str(tmp_path / "vm"))
    with pytest.raises(ValueError, match=r"holds a value model, not a policy"):
        ValueModel.from_policy_checkpoint(str(tmp_path / "vm"))
