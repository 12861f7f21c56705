"""Load and save models in the Hugging Face directory format (config.json, *.safetensors), under
the upstream parameter names of each family, so real SDAR / TraDo / LLaDA / Dream checkpoints load
unchanged and saved models load back into the upstream code."""

from __future__ import annotations

import json
import os
import re
import warnings

import torch

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
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        keys[upstream_name(model.config.family, name)] = name
    return keys


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for fname in files:
            out.update(load_file(os.path.join(path, fname)))
        return out
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _read_config(path: str) -> tuple[dict, ModelConfig]:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    return raw, ModelConfig.from_hf(raw)


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory, without its weights."""
    return _read_config(path)[1]


def load(path: str, dtype: torch.dtype | None = None, device=None):
    """Loads a DiffusionLM (or a ValueModel, if the directory holds one) from a Hugging Face
    directory. Every expected tensor must be present with the expected shape; the error names
    the tensor otherwise."""
    raw, config = _read_config(path)
    is_value = bool(raw.get("dlmkern_value_model", False))
    with torch.device("meta"):
        model = ValueModel(config) if is_value else DiffusionLM(config)
    policy = model.trunk if is_value else model
    expected = _policy_keys(policy)
    if is_value:
        expected.update({f"{_VALUE_HEAD}.weight": "value_head.weight",
                         f"{_VALUE_HEAD}.bias": "value_head.bias"})
    tensors = _read_tensors(path)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"{path}: checkpoint has unexpected tensor {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    own = model.state_dict()
    state = {}
    for up, ours in expected.items():
        key = ours if not is_value or ours.startswith("value_head") else f"trunk.{ours}"
        t = tensors[up]
        if tuple(t.shape) != tuple(own[key].shape):
            raise ValueError(f"{path}: tensor {up!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(own[key].shape)} from config.json")
        state[key] = t
    model = model.to_empty(device=device or "cpu")
    if config.tie_word_embeddings:
        policy.lm_head.weight = policy.embed.weight
        state.pop("lm_head.weight", None)
        state.pop("trunk.lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    if dtype is not None:
        model = model.to(dtype)
    return model


def save_pretrained(model, path: str) -> None:
    """Writes config.json and model.safetensors under the upstream names (atomically: a
    temporary file is renamed into place), in the model's own dtype."""
    is_value = isinstance(model, ValueModel)
    policy = model.trunk if is_value else model
    head = None
    if is_value:
        head = {"weight": model.value_head.weight, "bias": model.value_head.bias}
    save_state(policy.config, policy.state_dict(), path, value_head=head)


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


def load_tokenizer(path: str):
    """The tokenizer saved beside a checkpoint, through transformers, from the local path only."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json too and warns about model_type sdar
    try:
        with warnings.catch_warnings():  # and about config.json's rope_scaling key
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                 trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
