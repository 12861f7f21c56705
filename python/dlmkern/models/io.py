"""Load and save models in the Hugging Face directory format (config.json, *.safetensors), under
the upstream parameter names of each family, so real SDAR / TraDo / LLaDA / Dream checkpoints load
unchanged and saved models load back into the upstream code."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dlmkern import distributed
from dlmkern.models.config import ModelConfig
from dlmkern.models.transformer import DiffusionLM, ValueModel

_QWEN = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.wq\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"layers\.(\d+)\.attn\.wk\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"layers\.(\d+)\.attn\.wv\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"layers\.(\d+)\.attn\.wo\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.attn\.q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"layers\.(\d+)\.attn\.k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"layers\.(\d+)\.mlp\.w_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
_LLADA = [
    (r"embed\.weight", "model.transformer.wte.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.transformer.blocks.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.transformer.blocks.\1.ff_norm.weight"),
    (r"layers\.(\d+)\.attn\.wq\.(weight|bias)", r"model.transformer.blocks.\1.q_proj.\2"),
    (r"layers\.(\d+)\.attn\.wk\.(weight|bias)", r"model.transformer.blocks.\1.k_proj.\2"),
    (r"layers\.(\d+)\.attn\.wv\.(weight|bias)", r"model.transformer.blocks.\1.v_proj.\2"),
    (r"layers\.(\d+)\.attn\.wo\.weight", r"model.transformer.blocks.\1.attn_out.weight"),
    (r"layers\.(\d+)\.mlp\.w_gate\.weight", r"model.transformer.blocks.\1.ff_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w_up\.weight", r"model.transformer.blocks.\1.up_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w_down\.weight", r"model.transformer.blocks.\1.ff_out.weight"),
    (r"norm\.weight", "model.transformer.ln_f.weight"),
    (r"lm_head\.weight", "model.transformer.ff_out.weight"),
]
_VALUE_HEAD = "value_head"  # saved as value_head.weight / value_head.bias beside the trunk
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "F64": torch.float64}  # safetensors' dtype names


def upstream_name(family: str, key: str) -> str:
    """Our parameter name -> the checkpoint's (e.g. layers.3.attn.wq.weight ->
    model.layers.3.self_attn.q_proj.weight for SDAR)."""
    for pat, rep in (_LLADA if family == "llada" else _QWEN):
        if re.fullmatch(pat, key):
            return re.sub(pat, rep, key)
    raise KeyError(f"no upstream name for parameter {key!r}")


def _policy_keys(model: DiffusionLM) -> dict[str, str]:
    """upstream name -> our name, for every tensor the checkpoint must hold."""
    keys = {}
    for name in model.state_dict():
        if (name == "lm_head.weight" and model.config.tie_word_embeddings) or ".lora_" in name:
            continue  # tied; a LoRA adapter (saved merged, or by models.lora_io)
        keys[upstream_name(model.config.family, name)] = name
    return keys


def _tensor_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: model.safetensors, or every file of the index."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in files]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


@dataclass(frozen=True)
class _Entry:
    """One tensor of a checkpoint, as its file's header describes it (no data read)."""

    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...


def _read_headers(path: str) -> dict[str, _Entry]:
    from safetensors import safe_open

    out = {}
    for file in _tensor_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = _Entry(file, tuple(s.get_shape()), s.get_dtype())
    return out


def _checkpoint_dtype(path: str, entries: dict[str, _Entry]) -> torch.dtype:
    """The dtype the checkpoint stores its weights in; float32 if it mixes several."""
    for name, e in entries.items():
        if e.dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {e.dtype}; dlmkern loads "
                             f"{', '.join(_DTYPES)}")
    kinds = {_DTYPES[e.dtype] for e in entries.values()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def _read_config(path: str) -> tuple[dict, ModelConfig]:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    return raw, ModelConfig.from_hf(raw)


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory, without its weights."""
    return _read_config(path)[1]


def materialize(model: nn.Module, dtype: torch.dtype | None, device) -> nn.Module:
    """Uninitialised storage in ``dtype`` on ``device`` for a model built on the meta device:
    each tensor allocated once, where it will live (no init, no fp32 copy); tied embeddings
    stay tied (and are allocated once)."""
    policy = getattr(model, "trunk", model)
    tied = policy.config.tie_word_embeddings
    if tied:  # to_empty would give lm_head a storage of its own, then drop it
        policy.lm_head.weight = None
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to_empty(device=device)
    if tied:
        policy.lm_head.weight = policy.embed.weight
    return model


def _expected(model, is_value: bool) -> dict[str, str]:
    """upstream name -> our state-dict key, for every tensor the checkpoint must hold."""
    policy = model.trunk if is_value else model
    out = {up: f"trunk.{ours}" if is_value else ours
           for up, ours in _policy_keys(policy).items()}
    if is_value:
        out.update({f"{_VALUE_HEAD}.{k}": f"value_head.{k}" for k in ("weight", "bias")})
    return out


def _check_names_and_shapes(path, expected: dict[str, str], own: dict, entries) -> None:
    missing = [k for k in expected if k not in entries]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in entries if k not in expected]
    if unexpected:
        raise ValueError(f"{path}: checkpoint has unexpected tensor {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for up, ours in expected.items():
        want = tuple(own[ours].shape)
        if entries[up].shape != want:
            raise ValueError(f"{path}: tensor {up!r} has shape {entries[up].shape}, expected "
                             f"{want} from config.json")


def load(path: str, dtype: torch.dtype | None = None, device=None):
    """Loads a DiffusionLM (or a ValueModel, if the directory holds one) from a Hugging Face
    directory, straight into ``dtype`` on ``device``: the model is built on the meta device and
    each tensor is read from its safetensors file and copied into place, cast on the way, one at
    a time (no full copy of the model in any other dtype or on any other device).

    ``dtype`` None: the checkpoint's own dtype (float32 if it mixes several). ``device`` None:
    the CPU; a bare "cuda" is this rank's GPU (distributed.resolve_device); "meta" checks names
    and shapes and reads no data. Every expected tensor must be present with the expected
    shape; the error names the tensor otherwise."""
    from safetensors import safe_open

    raw, config = _read_config(path)
    is_value = bool(raw.get("dlmkern_value_model", False))
    with torch.device("meta"):
        model = ValueModel(config) if is_value else DiffusionLM(config)
    expected = _expected(model, is_value)
    entries = _read_headers(path)
    _check_names_and_shapes(path, expected, model.state_dict(), entries)
    if dtype is None:
        dtype = _checkpoint_dtype(path, entries)
    device = distributed.resolve_device(device)
    model = materialize(model, dtype, device)
    if device.type == "meta":
        return model
    own = model.state_dict()  # views of the new storage
    by_file: dict[str, list[str]] = {}
    for up in expected:
        by_file.setdefault(entries[up].file, []).append(up)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for up in names:
                    own[expected[up]].copy_(f.get_tensor(up))
    model.name_or_path = path  # e.g. a LoRA adapter's base_model_name_or_path
    return model


def run_dtype(device, dtype=None, key: str = "dtype") -> torch.dtype:
    """The dtype a run's weights take on ``device``: ``dtype`` (a torch.dtype or its name), else
    bfloat16 on CUDA and float32 elsewhere. float32 on CUDA is refused, naming ``key``: the
    CUDA attention kernels take bfloat16 / float16 only (SPEC 2.1; the reference backend
    excepted)."""
    from dlmkern.ops import backend

    dev = torch.device(device)
    if dtype is None:
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if dt not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{key} must be bfloat16, float16 or float32, got {dtype!r}")
    if dt == torch.float32 and dev.type == "cuda" and not backend.is_reference():
        raise ValueError(f"{key} float32 cannot run on CUDA: the CUDA attention kernels take "
                         f"bfloat16 or float16; set {key} to bfloat16 or float16")
    return dt


@dataclass(frozen=True)
class RunTarget:
    """Where a run's model, given as a path, is loaded: a device and a dtype."""

    device: torch.device
    dtype: torch.dtype


def run_target(model, device=None, dtype=None) -> RunTarget | None:
    """A trainer's model target, checked before any work: for a path, ``device`` (default:
    this rank's, distributed.local_device) and ``dtype`` (default and refusals: run_dtype);
    None for a module, which is used as it is (device / dtype are then refused, not ignored)."""
    if not isinstance(model, str | os.PathLike):
        if device is not None or dtype is not None:
            raise ValueError("device / dtype apply to a model path; a model passed as a module "
                             "is used as it is (move it with .to())")
        return None
    dev = distributed.parse_device(device) if device is not None else distributed.local_device()
    dt = run_dtype(dev, dtype)  # before resolve_device: no CUDA call comes first
    distributed.check_device(dev)  # a GPU this machine has
    return RunTarget(distributed.resolve_device(dev), dt)


def load_for_run(model, target: RunTarget | None):
    """The model a trainer trains: a path loaded onto ``target`` (run_target), or the module."""
    if target is None:
        return model
    return load(os.fspath(model), dtype=target.dtype, device=target.device)


def save_pretrained(model, path: str) -> None:
    """Writes config.json and model.safetensors under the upstream names (atomically: a
    temporary file is renamed into place), in the model's own dtype; LoRA adapters merged
    (models.lora_io.save_adapter writes them on their own)."""
    from dlmkern.models.lora import merged_state

    is_value = isinstance(model, ValueModel)
    policy = model.trunk if is_value else model
    head = None
    if is_value:
        head = {"weight": model.value_head.weight, "bias": model.value_head.bias}
    with torch.no_grad():  # LoRA adapters merged (none: the state as it is)
        state = merged_state(policy, policy.state_dict())
    save_state(policy.config, state, path, value_head=head)


def save_state(config: ModelConfig, state: dict, path: str, value_head: dict | None = None):
    """Writes a policy state dict (our names, any device, kept in its dtype) as a Hugging Face
    directory, without building a model: checkpoints export the trained weights this way."""
    from safetensors.torch import save_file

    with torch.device("meta"):  # the name map only: nothing allocated, nothing initialised
        names = _policy_keys(DiffusionLM(config))
    os.makedirs(path, exist_ok=True)
    tensors = {up: state[ours].detach().contiguous().cpu() for up, ours in names.items()}
    cfg = config.to_hf()
    if value_head is not None:
        for k in ("weight", "bias"):
            tensors[f"{_VALUE_HEAD}.{k}"] = value_head[k].detach().contiguous().cpu()
        cfg["dlmkern_value_model"] = True
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json.tmp"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")


def load_tokenizer(path: str):
    """The tokenizer saved beside a checkpoint, through transformers, from the local path only;
    dlmkern's character tokenizer as a CharTokenizer (which refuses characters it lacks, where
    transformers would drop them). A directory without tokenizer files is refused naming it."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from dlmkern.data.char_tokenizer import CharTokenizer

    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, n))
                                       for n in TOKENIZER_FILES):
        raise ValueError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                         "give a tokenizer directory (--tokenizer DIR; in a run file, tokenizer: "
                         "DIR) or char, the built-in character tokenizer")
    char = CharTokenizer.from_saved(path)
    if char is not None:
        return char
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json too and warns about model_type sdar
    try:
        with warnings.catch_warnings():  # and about config.json's rope_scaling key
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                 trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
