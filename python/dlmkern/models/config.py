"""Model configuration shared by SDAR / TraDo, LLaDA and Dream, read from and written to the
Hugging Face config.json of each family (the upstream key names, so real checkpoints load)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FAMILIES = ("sdar", "llada", "dream")


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
    extra: dict = field(default_factory=dict)  # other upstream keys, written back unchanged

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

    # ---- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        mt = str(d.get("model_type", "")).lower()
        if mt == "sdar":
            return cls._from_qwen(d, "sdar", qk_norm=True, qkv_bias=False)
        if mt == "dream":
            return cls._from_qwen(d, "dream", qk_norm=False, qkv_bias=True)
        if mt == "llada" or "d_model" in d:
            return cls._from_llada(d)
        raise ValueError(f"config.json: unsupported model_type {d.get('model_type')!r} "
                         "(dlmkern loads sdar, llada and dream models)")

    @classmethod
    def _from_qwen(cls, d: dict, family: str, qk_norm: bool, qkv_bias: bool) -> ModelConfig:
        known = {"model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_theta", "tie_word_embeddings", "block_size",
                 "mask_token_id", "max_position_embeddings", "attention_bias"}
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
            extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def _from_llada(cls, d: dict) -> ModelConfig:
        known = {"model_type", "vocab_size", "embedding_size", "d_model", "mlp_hidden_size",
                 "n_layers", "n_heads", "n_kv_heads", "rms_norm_eps", "rope_theta",
                 "weight_tying", "mask_token_id", "max_sequence_length", "include_bias",
                 "include_qkv_bias"}
        heads = _req(d, "n_heads")
        return cls(
            family="llada", vocab_size=d.get("embedding_size") or _req(d, "vocab_size"),
            hidden_size=_req(d, "d_model"), intermediate_size=_req(d, "mlp_hidden_size"),
            num_layers=_req(d, "n_layers"), num_heads=heads,
            num_kv_heads=d.get("n_kv_heads") or heads, head_dim=_req(d, "d_model") // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=d.get("rope_theta", 500000.0),
            tie_word_embeddings=bool(d.get("weight_tying", False)),
            qkv_bias=bool(d.get("include_qkv_bias", False) or d.get("include_bias", False)),
            mask_token_id=d.get("mask_token_id", 126336),
            max_position_embeddings=d.get("max_sequence_length", 4096),
            extra={k: v for k, v in d.items() if k not in known})

    def to_hf(self) -> dict:
        if self.family == "llada":
            d = {"model_type": "llada", "vocab_size": self.vocab_size,
                 "embedding_size": self.vocab_size, "d_model": self.hidden_size,
                 "mlp_hidden_size": self.intermediate_size, "n_layers": self.num_layers,
                 "n_heads": self.num_heads, "n_kv_heads": self.num_kv_heads,
                 "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                 "weight_tying": self.tie_word_embeddings, "mask_token_id": self.mask_token_id,
                 "max_sequence_length": self.max_position_embeddings,
                 "include_qkv_bias": self.qkv_bias}
        else:
            d = {"model_type": "sdar" if self.family == "sdar" else "Dream",
                 "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size,
                 "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                 "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                 "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                 "tie_word_embeddings": self.tie_word_embeddings,
                 "mask_token_id": self.mask_token_id,
                 "max_position_embeddings": self.max_position_embeddings}
            if self.family == "sdar":
                d["block_size"] = self.block_size
                d["attention_bias"] = self.qkv_bias
        return {**self.extra, **d}

    def as_dict(self) -> dict:
        return asdict(self)


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
