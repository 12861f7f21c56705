"""LoRA adapters in PEFT's directory format: adapter_config.json (peft_type LORA, r, lora_alpha,
lora_dropout, use_rslora, target_modules, base_model_name_or_path) and adapter_model.safetensors
with the keys PEFT writes, ``base_model.model.<the checkpoint's module>.lora_A.weight`` (the
upstream module names of models.io, e.g. model.layers.0.self_attn.q_proj for SDAR / Dream), so
``peft.PeftModel.from_pretrained(<the family's HF model>, dir)`` loads them; and the way back
(load_adapter), used by ``dlmkern export --merge``."""

from __future__ import annotations

import json
import os
import re

import torch

from dlmkern.models.io import upstream_name
from dlmkern.models.lora import LoRAConfig, adapted, linear_names

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _upstream_module(family: str, name: str) -> str:
    return upstream_name(family, f"{name}.weight").removesuffix(".weight")


def _target_modules(config, names: list[str]) -> list[str]:
    """PEFT's target_modules: a module's last name where it selects exactly the adapted modules
    of that name (PEFT matches a listed name against a module path's end), else full paths."""
    every = [_upstream_module(config.family, n) for n in linear_names(config)]
    mine = {_upstream_module(config.family, n) for n in names}
    out = []
    for short in sorted({m.rsplit(".", 1)[-1] for m in mine}):
        of_short = {m for m in every if m.rsplit(".", 1)[-1] == short}
        out += [short] if of_short <= mine else sorted(of_short & mine)
    return out


def save_adapter(model, path: str, state: dict | None = None, base: str | None = None) -> None:
    """Writes `model`'s adapters (a DiffusionLM with LoRA) in PEFT's format; `state`: its full
    state dict when already gathered (a sharded model's), else read from the model; `base`: the
    base model's path for adapter_config.json's base_model_name_or_path."""
    from safetensors.torch import save_file

    layers = adapted(model)
    if not layers:
        raise ValueError("save_adapter: the model holds no LoRA adapter")
    state = model.state_dict() if state is None else state
    config = model.config
    lora = model.lora  # the settings apply_lora / load_adapter recorded
    tensors = {}
    for n in layers:
        up = _PREFIX + _upstream_module(config.family, n)
        for ab in ("lora_A", "lora_B"):
            tensors[f"{up}.{ab}.weight"] = state[f"{n}.{ab}.weight"].detach().contiguous().cpu()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
           "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
           "use_rslora": lora.rslora, "bias": "none", "fan_in_fan_out": False,
           "init_lora_weights": True, "inference_mode": True,
           "modules_to_save": None, "target_modules": _target_modules(config, list(layers))}
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, WEIGHTS + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, WEIGHTS))
    with open(os.path.join(path, CONFIG + ".tmp"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    os.replace(os.path.join(path, CONFIG + ".tmp"), os.path.join(path, CONFIG))


def read_config(path: str) -> LoRAConfig:
    """The LoRA settings of a PEFT adapter directory (refusing what dlmkern does not model)."""
    with open(os.path.join(path, CONFIG)) as f:
        raw = json.load(f)
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r}; dlmkern reads LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise ValueError(f"{path}: {key} (per-layer ranks / alphas) is not supported")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise ValueError(f"{path}: bias / modules_to_save adapters are not supported")
    return LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                      dropout=float(raw.get("lora_dropout", 0.0)),
                      rslora=bool(raw.get("use_rslora", False)))


def load_adapter(model, path: str) -> LoRAConfig:
    """Adds the adapters of a PEFT directory to `model` (a DiffusionLM without adapters), in its
    dtype on its device, freezing the base weights. Every tensor must name a linear layer of
    the model with the expected shape."""
    from safetensors.torch import load_file

    lora = read_config(path)
    config = model.config
    ours = {_upstream_module(config.family, n): n for n in linear_names(config)}
    tensors = load_file(os.path.join(path, WEIGHTS))
    pat = re.compile(re.escape(_PREFIX) + r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = pat.fullmatch(key)
        if m is None or m.group(1) not in ours:
            raise ValueError(f"{path}: tensor {key!r} names no linear layer of this "
                             f"{config.family} model")
        found.setdefault(ours[m.group(1)], {})[m.group(2)] = t
    for name, ab in found.items():
        layer = model.get_submodule(name)
        layer.add_adapter(lora.rank, lora.scale, lora.dropout)
        with torch.no_grad():
            for k in ("lora_A", "lora_B"):
                dst = getattr(layer, k).weight
                if k not in ab or tuple(ab[k].shape) != tuple(dst.shape):
                    raise ValueError(f"{path}: {name}.{k} is missing or has shape "
                                     f"{tuple(ab[k].shape) if k in ab else None}, expected "
                                     f"{tuple(dst.shape)}")
                dst.copy_(ab[k])
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    model.lora = lora
    return lora


def merge_export(adapter: str, out: str, base: str | None = None) -> str:
    """`dlmkern export --merge`: the base model (``base``, else the adapter's
    base_model_name_or_path) with the adapters of ``adapter`` (a PEFT directory, or a checkpoint
    holding adapter/) merged, W + s B A, written to ``out`` as a Hugging Face directory in the
    base's dtype (tokenizer files copied from the base). Returns the base path used."""
    import shutil

    from dlmkern.models.io import TOKENIZER_FILES, load, save_state
    from dlmkern.models.lora import merged_state

    if not os.path.exists(os.path.join(adapter, CONFIG)) and \
            os.path.exists(os.path.join(adapter, "adapter", CONFIG)):
        adapter = os.path.join(adapter, "adapter")  # a training checkpoint
    if not os.path.exists(os.path.join(adapter, CONFIG)):
        raise FileNotFoundError(f"{adapter}: no {CONFIG} (a PEFT LoRA adapter directory, or a "
                                "checkpoint holding adapter/)")
    if base is None:
        with open(os.path.join(adapter, CONFIG)) as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter}: {CONFIG} names no base_model_name_or_path: give "
                             "--base DIR")
    model = load(base)  # its own dtype, on the CPU
    load_adapter(model, adapter)
    with torch.no_grad():
        save_state(model.config, merged_state(model, model.state_dict()), out)
    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt"):
        if os.path.exists(os.path.join(base, name)):
            shutil.copy(os.path.join(base, name), os.path.join(out, name))
    return base
