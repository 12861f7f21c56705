"""Model configuration shared by SDAR / TraDo, LLaDA and Dream, read from and written to the
Hugging Face config.json of each family (the upstream key names, so real checkpoints load).

Strict: every config.json key is implemented, known not to change the computation (ignored, see
ModelConfig.ignored), or refused at load with its name and value. A switch dlmkern does not
implement (a sliding window, alibi, logit scaling, ...) is accepted only at its neutral value;
rope_scaling "linear", "dynamic" (NTK), "yarn" and "llama3" are implemented (rope_frequencies),
as Hugging Face transformers computes them (modeling_rope_utils)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

from dlmkern.models.hf_keys import IGNORED, NEUTRAL, ROPE_SCALING_KEYS

FAMILIES = ("sdar", "llada", "dream")
_log = logging.getLogger("dlmkern.models")


@dataclass
class ModelConfig:
    family: str                      # "sdar" (block diffusion), "llada" or "dream" (full attention)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    qk_norm: bool = False            # Qwen3 / SDAR: RMSNorm on each head's q and k
    qkv_bias: bool = False           # Qwen2 / Dream: biases on q, k, v projections
    block_size: int = 4              # SDAR only: diffusion block length
    mask_token_id: int = 0
    max_position_embeddings: int = 32768
    rope_scaling: dict | None = None   # SDAR / Dream: linear | dynamic | yarn | llama3
    extra: dict = field(default_factory=dict)  # other upstream keys, written back unchanged

    @property
    def ignored(self) -> dict:
        """The upstream keys that do not change the computation (kept for to_hf): metadata,
        token ids (checked against the vocabulary), switches at their neutral value."""
        return dict(self.extra)

    @property
    def block_causal(self) -> bool:
        return self.family == "sdar"

    @property
    def logits_shift(self) -> bool:
        """Dream predicts token i from position i - 1 (an autoregressive heritage)."""
        return self.family == "dream"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "block_size", "max_position_embeddings"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model config: {key} must be an integer >= 1, got {v!r}")
        # token ids index the embedding: one outside the vocabulary fails later, deep in a kernel
        ids = {"mask_token_id": self.mask_token_id}
        ids.update({k: self.extra[k] for k in ("pad_token_id", "eos_token_id", "bos_token_id")
                    if self.extra.get(k) is not None})
        for key, v in ids.items():
            for tid in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(tid, bool) or not isinstance(tid, int) or \
                        not 0 <= tid < self.vocab_size:
                    raise ValueError(f"model config: {key} = {v!r} is outside the vocabulary "
                                     f"(vocab_size = {self.vocab_size}: ids 0 .. "
                                     f"{self.vocab_size - 1})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.rope_scaling = check_rope_scaling(self.rope_scaling, self.family)

    # ---- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """From a config.json dict; a key that switches on something dlmkern does not implement
        is a ValueError naming it and its value. The ignored keys are logged once (info)."""
        mt = str(d.get("model_type", "")).lower()
        if mt == "sdar":
            c = cls._from_qwen(d, "sdar", qk_norm=True, qkv_bias=False)
        elif mt == "dream":
            c = cls._from_qwen(d, "dream", qk_norm=False, qkv_bias=True)
        elif mt == "llada" or "d_model" in d:
            c = cls._from_llada(d)
        else:
            raise ValueError(f"config.json: unsupported model_type {d.get('model_type')!r} "
                             "(dlmkern loads sdar, llada and dream models)")
        check_keys(c.family, c.extra)
        if c.extra:
            _log.info("config.json: keys that do not change the computation, ignored: %s",
                      ", ".join(sorted(c.extra)))
        return c

    @classmethod
    def _from_qwen(cls, d: dict, family: str, qk_norm: bool, qkv_bias: bool) -> ModelConfig:
        known = {"model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_theta", "tie_word_embeddings", "block_size",
                 "mask_token_id", "max_position_embeddings", "rope_scaling"}
        if family == "sdar":
            known.add("attention_bias")
        heads = _req(d, "num_attention_heads")
        return cls(
            family=family, vocab_size=_req(d, "vocab_size"), hidden_size=_req(d, "hidden_size"),
            intermediate_size=_req(d, "intermediate_size"),
            num_layers=_req(d, "num_hidden_layers"), num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or _req(d, "hidden_size") // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=d.get("rope_theta", 10000.0),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), qk_norm=qk_norm,
            qkv_bias=bool(d.get("attention_bias", qkv_bias)) if family == "sdar" else qkv_bias,
            block_size=d.get("block_size", 4),
            mask_token_id=d.get("mask_token_id", 151669 if family == "sdar" else 151666),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rope_scaling=d.get("rope_scaling"),
            extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def _from_llada(cls, d: dict) -> ModelConfig:
        known = {"model_type", "vocab_size", "embedding_size", "d_model", "mlp_hidden_size",
                 "n_layers", "n_heads", "n_kv_heads", "rms_norm_eps", "rope_theta",
                 "weight_tying", "mask_token_id", "max_sequence_length", "include_qkv_bias"}
        heads = _req(d, "n_heads")
        return cls(
            family="llada", vocab_size=d.get("embedding_size") or _req(d, "vocab_size"),
            hidden_size=_req(d, "d_model"), intermediate_size=_req(d, "mlp_hidden_size"),
            num_layers=_req(d, "n_layers"), num_heads=heads,
            num_kv_heads=d.get("n_kv_heads") or heads, head_dim=_req(d, "d_model") // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=d.get("rope_theta", 500000.0),
            tie_word_embeddings=bool(d.get("weight_tying", False)),
            qkv_bias=bool(d.get("include_qkv_bias", False)),  # include_bias: NEUTRAL (refused)
            mask_token_id=d.get("mask_token_id", 126336),
            max_position_embeddings=d.get("max_sequence_length", 4096),
            extra={k: v for k, v in d.items() if k not in known})

    def to_hf(self) -> dict:
        if self.family == "llada":
            d = {"model_type": "llada", "vocab_size": self.vocab_size,
                 "embedding_size": self.vocab_size, "d_model": self.hidden_size,
                 "mlp_hidden_size": self.intermediate_size, "n_layers": self.num_layers,
                 "n_heads": self.num_heads, "n_kv_heads": self.num_kv_heads,
                 "rms_norm_eps": self.rms_norm_eps, "rope_theta": float(self.rope_theta),
                 "weight_tying": self.tie_word_embeddings, "mask_token_id": self.mask_token_id,
                 "max_sequence_length": self.max_position_embeddings,
                 "include_qkv_bias": self.qkv_bias}
        else:
            d = {"model_type": "sdar" if self.family == "sdar" else "Dream",
                 "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size,
                 "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                 "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                 "rms_norm_eps": self.rms_norm_eps, "rope_theta": float(self.rope_theta),
                 "rope_scaling": self.rope_scaling,
                 "tie_word_embeddings": self.tie_word_embeddings,
                 "mask_token_id": self.mask_token_id,
                 "max_position_embeddings": self.max_position_embeddings}
            if self.family == "sdar":
                d["block_size"] = self.block_size
                d["attention_bias"] = self.qkv_bias
        return {**self.extra, **d}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rope_theta"] = float(self.rope_theta)
        return d


# ---- strict keys ------------------------------------------------------------------------------

def check_keys(family: str, extra: dict) -> None:
    """Every key the family does not map is ignored (hf_keys.IGNORED: metadata), at its neutral
    value (hf_keys.NEUTRAL), or an unknown key with an empty / false value; anything else is a
    ValueError naming the key and its value."""
    neutral = NEUTRAL[family]
    for key, value in extra.items():
        if key in neutral:
            ok, what = neutral[key]
            if not ok(value):
                raise ValueError(f"config.json: {key} = {value!r} is not supported by dlmkern "
                                 f"({what}); it would compute something else than the checkpoint "
                                 "was trained for")
        elif key not in IGNORED[family] and value not in (None, False, 0, "", [], {}):
            raise ValueError(f"config.json: unknown key {key} = {value!r}: dlmkern does not know "
                             "whether it changes the computation, so it refuses it (remove the "
                             "key if it does not)")


def check_rope_scaling(rs, family: str) -> dict | None:
    """A validated copy of rope_scaling (rope_type set), or None for no scaling."""
    if rs is None:
        return None
    if family == "llada":
        raise ValueError(f"config.json: rope_scaling = {rs!r} is not supported for LLaDA")
    if not isinstance(rs, dict):
        raise ValueError(f"config.json: rope_scaling = {rs!r} must be a mapping or null")
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default" and set(rs) <= {"rope_type", "type", "rope_theta"}:
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"config.json: rope_scaling type {kind!r} ({rs!r}) is not supported by "
                         f"dlmkern (supported: {', '.join(ROPE_SCALING_KEYS)})")
    required, optional = ROPE_SCALING_KEYS[kind]
    for key in required:
        if not isinstance(rs.get(key), (int, float)) or isinstance(rs.get(key), bool):
            raise ValueError(f"config.json: rope_scaling {kind!r} needs a number {key!r}, got "
                             f"{rs!r}")
    extra = set(rs) - set(required) - set(optional) - {"type", "rope_type", "rope_theta"}
    bad = {k: rs[k] for k in extra if not (k == "partial_rotary_factor" and rs[k] == 1)}
    if bad:
        raise ValueError(f"config.json: rope_scaling key(s) {bad!r} are not supported by dlmkern "
                         f"for type {kind!r}")
    if rs["factor"] < 1:
        raise ValueError(f"config.json: rope_scaling factor = {rs['factor']!r} must be >= 1")
    rs["rope_type"] = kind
    return rs


def rope_frequencies(dim: int, theta: float, positions=None, scaling: dict | None = None,
                     max_positions: int = 0):
    """(inv_freq [dim / 2] float32, attention factor) of the rotary embedding, as Hugging Face
    transformers computes them for each rope_scaling type (`scaling`: a checked rope_scaling
    dict, None for plain RoPE). Dynamic NTK scales the base by the longest position in
    `positions` (tensor math: no host sync) once it passes max_positions."""
    import torch

    dev = positions.device if positions is not None else None
    exponent = torch.arange(0, dim, 2, device=dev, dtype=torch.float32) / dim
    rs = scaling
    base = float(theta)
    if rs is None:
        return 1.0 / (base ** exponent), 1.0
    kind, factor = rs["rope_type"], float(rs["factor"])
    if kind == "linear":
        return 1.0 / (base ** exponent) / factor, 1.0
    if kind == "dynamic":
        top = max_positions
        seq = torch.clamp(positions.max().to(torch.float32) + 1, min=top)
        scaled = base * ((factor * seq / top) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (scaled ** exponent), 1.0
    inv = 1.0 / (base ** exponent)
    old = float(rs.get("original_max_position_embeddings") or max_positions)
    if kind == "llama3":
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old / lo, inv / factor, inv)
        return torch.where((wavelen <= old / lo) & (wavelen >= old / hi), mid, out), 1.0
    return _yarn(dim, base, factor, old, rs, inv, exponent)


def _yarn(dim, base, factor, old, rs, inv, exponent):
    import torch

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.get("beta_fast") or 32), correction_dim(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, device=inv.device, dtype=torch.float32) - low) /
                       (high - low), 0, 1)
    extrapolate = 1 - ramp
    return (inv / factor) * (1 - extrapolate) + inv * extrapolate, float(attn)


def _req(d: dict, key: str):
    if key not in d:
        raise ValueError(f"config.json: missing required key {key!r}")
    return d[key]


def tiny_config(family: str = "sdar", **overrides) -> ModelConfig:
    """A few-layer model built in code for tests and the demo (nothing downloaded). The mask
    token is the last id of the vocabulary: 63 by default, vocab_size - 1 when only vocab_size
    is given (pass mask_token_id to choose another)."""
    if "vocab_size" in overrides and "mask_token_id" not in overrides:
        overrides["mask_token_id"] = overrides["vocab_size"] - 1
    base = dict(family=family, vocab_size=64, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=False, qk_norm=family == "sdar",
                qkv_bias=family == "dream", block_size=4, mask_token_id=63,
                max_position_embeddings=512)
    base.update(overrides)
    return ModelConfig(**base)
