"""LoRA (Hu et al. 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski 2023, arXiv 2312.03732): a
frozen linear layer W plus a trained low-rank update, y = x W^T + s (dropout(x) A^T) B^T with A
[r, in] (Kaiming-uniform, as PEFT initialises it), B [out, r] (zero: training starts at the base
model) and s = alpha / r (rsLoRA: alpha / sqrt(r)).

The arithmetic has one owner, :class:`Linear`, the model's linear layer (every projection of
models.transformer and its lm_head); an adapter is two submodules of it, ``lora_A`` / ``lora_B``,
so the state dict holds ``layers.0.attn.wq.lora_A.weight`` beside the layer's own weight and
FSDP2 shards the adapters with their layers. The fused log-prob path takes the lm_head's
:meth:`Linear.merged_weight` (W + s B A, [V, H]: never the [N, V] logits).

The KL reference of a LoRA run is the same model under :func:`adapters_disabled` (no copy).
Adapters are saved in PEFT's format (models.lora_io)."""

from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# the linear layers of every family, by their name in a Layer / DiffusionLM
LAYER_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
TARGETS = (*LAYER_TARGETS, "lm_head")
# the checkpoints' names a user may write instead (Qwen-style / LLaDA), and ours
_UPSTREAM_HINT = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                  "attn_out": "wo", "gate_proj": "w_gate", "ff_proj": "w_gate",
                  "up_proj": "w_up", "down_proj": "w_down", "ff_out": "w_down or lm_head"}


def _help(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class LoRAConfig:
    """The `lora:` section of the SFT and RL configs (rank 0: off, every weight trained)."""

    rank: int = _help(0, "LoRA rank r of every targeted layer (0: off, full fine-tuning)")
    alpha: float = _help(16.0, "LoRA alpha: the update is scaled by alpha / rank (rslora: "
                         "alpha / sqrt(rank))")
    dropout: float = _help(0.0, "dropout on the adapters' input while training (PEFT's "
                           "lora_dropout)")
    targets: str = _help(",".join(LAYER_TARGETS),
                         "comma-separated patterns (fnmatch) of the linear layers that get "
                         "adapters, matched against a layer's name (" + ", ".join(TARGETS) +
                         ") or its path (layers.3.attn.wq, layers.1*.mlp.*)")
    rslora: bool = _help(False, "rank-stabilised scaling alpha / sqrt(rank) (rsLoRA)")
    value: bool = _help(True, "with a value model: it trains a LoRA of its own (same settings, "
                        "sharing the policy's frozen weights) plus its head; false: a full "
                        "copy of the base model, trained whole")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def patterns(self) -> list[str]:
        return [p.strip() for p in self.targets.split(",") if p.strip()]

    def checks(self) -> list:
        """(ok, message) checks of the section alone (the model's are check_model's)."""
        out = [(self.rank >= 0, f"lora.rank must be >= 0, got {self.rank}"),
               (0 <= self.dropout < 1, f"lora.dropout must lie in [0, 1), got {self.dropout}"),
               (self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")]
        if not self.enabled:
            return out
        out.append((bool(self.patterns()), "lora.targets names no layer"))
        for p in self.patterns():
            if "." not in p:  # a layer name: checkable without the model
                out.append((bool(fnmatch.filter(TARGETS, p)), _unknown_target(p)))
        return out

    def check_model(self, model_config) -> None:
        """Refusals that need the model's config (before its weights load): a pattern that
        matches no linear layer of this family / depth; lm_head with tied embeddings or with
        dropout (the fused log-prob path takes one weight, W + s B A)."""
        if not self.enabled:
            return
        names = linear_names(model_config)
        for p in self.patterns():
            if not _matching(names, [p]):
                raise ValueError(f"config: {_unknown_target(p)} (this {model_config.family} "
                                 f"model has {model_config.num_layers} layers: "
                                 f"layers.0..{model_config.num_layers - 1})")
        if "lm_head" in _matching(names, self.patterns()):
            if model_config.tie_word_embeddings:
                raise ValueError("config: lora.targets includes lm_head, whose weight this model "
                                 "ties to the embedding: a merged export could not stay tied; "
                                 "drop lm_head from lora.targets")
            if self.dropout > 0:
                raise ValueError(f"config: lora.targets includes lm_head with lora.dropout="
                                 f"{self.dropout}: the fused log-prob path takes the lm_head as "
                                 f"one weight (W + s B A), which cannot drop the adapter's input "
                                 f"alone; set lora.dropout: 0 or drop lm_head")


def _unknown_target(p: str) -> str:
    hint = _UPSTREAM_HINT.get(p.rsplit(".", 1)[-1])
    hint = f" (the checkpoint's {p!r} is {hint!r} here)" if hint else ""
    return (f"lora.targets: {p!r} matches no linear layer{hint}; the layers are "
            f"{', '.join(TARGETS)}, by name or path (layers.3.attn.wq)")


def linear_names(model_config) -> list[str]:
    """Every linear layer of a DiffusionLM with this config, by module path."""
    out = []
    for i in range(model_config.num_layers):
        out += [f"layers.{i}.attn.{w}" for w in LAYER_TARGETS[:4]]
        out += [f"layers.{i}.mlp.{w}" for w in LAYER_TARGETS[4:]]
    return [*out, "lm_head"]


def _matching(names, patterns) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) or
                                    fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], p)
                                    for p in patterns)]


class Linear(nn.Linear):
    """nn.Linear with an optional LoRA adapter (the one owner of the LoRA arithmetic)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_A = self.lora_B = None
        self.lora_scale = 0.0
        self.lora_dropout = nn.Identity()
        self.adapter_on = True  # adapters_disabled turns it off

    def add_adapter(self, rank: int, scale: float, dropout: float = 0.0) -> None:
        """Adds A [rank, in] (Kaiming-uniform, PEFT's init) and B [out, rank] (zero) in the
        weight's dtype, on its device."""
        w = self.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device,
                                dtype=w.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device,
                                dtype=w.dtype)
        if w.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.lora_scale = float(scale)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def active(self) -> bool:
        return self.lora_A is not None and self.adapter_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.active:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scale

    def merged_weight(self) -> torch.Tensor:
        """W + s B A (differentiable in A and B), or W without an active adapter."""
        if not self.active:
            return self.weight
        return self.weight + (self.lora_B.weight @ self.lora_A.weight) * self.lora_scale


def apply_lora(model: nn.Module, lora: LoRAConfig) -> list[str]:
    """Adds an adapter to every targeted Linear of `model` (a DiffusionLM: a value model's
    trunk) and freezes its other parameters. Returns the adapted layers' paths. Refused under
    torchrun for now (FSDP2 sharding of the adapters with their layers is not written yet)."""
    from dlmkern import distributed

    if distributed.world() > 1:
        raise ValueError("config: lora.rank > 0 under torchrun (several ranks) is not supported "
                         "yet: train LoRA on one GPU or the CPU, or set lora.rank: 0")
    lora.check_model(model.config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    names = _matching(layers, lora.patterns())
    for n in names:
        layers[n].add_adapter(lora.rank, lora.scale, lora.dropout)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    model.lora = lora  # what save_adapter writes
    return names


def adapted(model: nn.Module) -> dict[str, Linear]:
    """The Linear layers of `model` that hold an adapter, by module path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Linear) and m.lora_A is not None}


def has_adapters(model: nn.Module) -> bool:
    return bool(adapted(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter of `model` off inside the block (the LoRA run's KL
    reference, no copy of the weights)."""
    layers = list(adapted(model).values())
    states = [m.adapter_on for m in layers]
    for m in layers:
        m.adapter_on = False
    try:
        yield model
    finally:
        for m, s in zip(layers, states, strict=True):
            m.adapter_on = s


def merged_state(model: nn.Module, state: dict) -> dict:
    """The base names' tensors of `state` (model's state dict, full, e.g. on the CPU) with every
    adapter merged: W + s B A computed in fp32 and stored in W's dtype; adapter keys dropped."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for n, m in adapted(model).items():
        w = state[f"{n}.weight"]
        delta = state[f"{n}.lora_B.weight"].float() @ state[f"{n}.lora_A.weight"].float()
        out[f"{n}.weight"] = (w.float() + delta * m.lora_scale).to(w.dtype)
    return out


def shared_trunk(policy: nn.Module) -> nn.Module:
    """A DiffusionLM whose base parameters ARE the policy's (the same tensors, frozen: no copy)
    and which has no adapters: a value model's trunk for its own LoRA."""
    from dlmkern.models.transformer import DiffusionLM

    with torch.device("meta"):
        trunk = DiffusionLM(policy.config)
    for name, p in policy.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        mod, _, attr = name.rpartition(".")
        setattr(trunk.get_submodule(mod) if mod else trunk, attr, p)
    return trunk
