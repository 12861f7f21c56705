"""Strict model configs: the released SDAR / TraDo, LLaDA and Dream config.json files load; a switch
dlmkern does not implement is refused naming the key and its value; rope_scaling linear, dynamic
(NTK), yarn and llama3 match hand-computed frequencies / rotations (and transformers')."""

import math

import pytest
import torch
from dlmkern.models.config import ModelConfig, rope_frequencies, tiny_config
from dlmkern.models.transformer import rope

# OpenMOSS/DiRL models/sdar/config.json (SDAR-8B-Chat), verbatim
SDAR = {
    "architectures": ["SDARForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig",
                 "AutoModel": "modeling_sdar.SDARModel",
                 "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
    "bos_token_id": 151643, "debug": False, "eos_token_id": 151643, "block_size": 4,
    "mask_token_id": 151669, "ep_size": 1, "fuse_cross_entropy": True, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 32768, "max_window_layers": 36,
    "micro_forward": False, "model_type": "sdar", "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "skip_checkpoint": False,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False,
    "use_sliding_window": False, "vocab_size": 151936}
# GSAI-ML/LLaDA-8B-Instruct config.json (its key set and values)
LLADA = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32,
    "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3",
    "use_cache": False, "vocab_size": 126464, "weight_tying": False}
# Dream-org/Dream-v0-Instruct-7B config.json (Qwen2.5-7B layout; keys of configuration_dream.py)
DREAM = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "pad_token_id": 151643, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": True,
    "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064}


def test_the_released_configs_load():
    s = ModelConfig.from_hf(SDAR)
    assert (s.family, s.num_layers, s.head_dim, s.block_size, s.rope_scaling) == \
        ("sdar", 36, 128, 4, None)
    assert {"use_cache", "fuse_cross_entropy", "sliding_window", "eos_token_id"} <= set(s.ignored)
    lla = ModelConfig.from_hf(LLADA)
    assert (lla.family, lla.vocab_size, lla.qkv_bias, lla.num_kv_heads) == \
        ("llada", 126464, False, 32)
    assert "init_fn" in lla.ignored and "alibi" in lla.ignored  # alibi: false is neutral
    d = ModelConfig.from_hf(DREAM)
    assert (d.family, d.qkv_bias, d.num_kv_heads, d.head_dim) == ("dream", True, 4, 128)
    # the round trip keeps every upstream key
    assert ModelConfig.from_hf(s.to_hf()) == s and set(SDAR) <= set(s.to_hf())


REFUSED = [
    (SDAR, "use_sliding_window", True), (SDAR, "hidden_act", "gelu"),
    (SDAR, "rope_scaling", {"rope_type": "longrope", "factor": 2.0}),
    (SDAR, "rope_scaling", {"type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
    (SDAR, "rope_scaling", {"type": "llama3", "factor": 8.0}),  # its other keys missing
    (SDAR, "attention_dropout", 0.1), (SDAR, "num_experts", 64),
    (SDAR, "layer_types", ["sliding_attention", "full_attention"]),
    (DREAM, "use_sliding_window", True), (DREAM, "use_mrope", True),
    (LLADA, "alibi", True), (LLADA, "scale_logits", True), (LLADA, "input_emb_norm", True),
    (LLADA, "attention_layer_norm", True), (LLADA, "include_bias", True),
    (LLADA, "rope", False), (LLADA, "block_type", "sequential"),
    (LLADA, "layer_norm_type", "default"), (LLADA, "multi_query_attention", True),
    (LLADA, "clip_qkv", 8.0), (LLADA, "rope_scaling", {"type": "linear", "factor": 2.0}),
    (SDAR, "quantization_config", {"quant_method": "gptq", "bits": 4}),  # unknown, switched on
]


@pytest.mark.parametrize("base, key, value", REFUSED, ids=[f"{k}={v}" for _, k, v in REFUSED])
def test_switches_dlmkern_does_not_implement_are_refused_by_name(base, key, value):
    with pytest.raises(ValueError, match=rf"\b{key}\b"):
        ModelConfig.from_hf({**base, key: value})


def test_unknown_keys_at_a_neutral_value_are_ignored():
    c = ModelConfig.from_hf({**SDAR, "some_new_switch": False, "another": None})
    assert c.ignored["some_new_switch"] is False
    with pytest.raises(ValueError, match=r"unknown key some_new_switch = True"):
        ModelConfig.from_hf({**SDAR, "some_new_switch": True})


# ---- rope_scaling: references computed per frequency with math, as the papers / HF write them --

D, THETA = 16, 10000.0


def _base_inv():
    return [1.0 / THETA ** (2 * i / D) for i in range(D // 2)]


def _spec(scaling, max_pos=64):
    """(theta, checked rope_scaling, max positions) of a config with this scaling."""
    c = tiny_config("sdar", head_dim=D, max_position_embeddings=max_pos, rope_scaling=scaling)
    return c.rope_theta, c.rope_scaling, c.max_position_embeddings


def _freqs(scaling, positions, max_pos=64):
    theta, rs, mp = _spec(scaling, max_pos)
    return rope_frequencies(D, theta, positions, rs, mp)


def _llama3_ref(factor, lo, hi, old):
    out = []
    for f in _base_inv():
        wl = 2 * math.pi / f
        if wl < old / hi:
            out.append(f)
        elif wl > old / lo:
            out.append(f / factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
    return out


def _yarn_ref(factor, old, fast=32, slow=1):
    def dim_of(rot):
        return D * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(THETA))

    low, high = max(math.floor(dim_of(fast)), 0), min(math.ceil(dim_of(slow)), D - 1)
    out = []
    for i, f in enumerate(_base_inv()):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / factor * ramp + f * (1 - ramp))
    return out, 0.1 * math.log(factor) + 1.0


CASES = {
    "linear": ({"type": "linear", "factor": 4.0}, [f / 4 for f in _base_inv()], 1.0),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               _llama3_ref(8.0, 1.0, 4.0, 64), 1.0),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             *_yarn_ref(4.0, 32)),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_static_rope_scaling_matches_the_reference(kind):
    scaling, ref, attn = CASES[kind]
    inv, factor = _freqs(scaling, torch.arange(8))
    assert torch.allclose(inv, torch.tensor(ref), rtol=1e-6, atol=0)
    assert factor == pytest.approx(attn, rel=1e-12)
    assert not torch.allclose(inv, torch.tensor(_base_inv()))  # it does scale
    # the rotation itself: pair (i, i + D/2) of a vector turned by position * inv_freq[i],
    # scaled by the attention factor
    x = torch.randn(1, 1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = 37
    out = rope(x.float(), torch.tensor([pos]), *_spec(scaling))[0, 0].double()
    for i, f in enumerate(ref):
        a, b, ang = x[0, 0, i].item(), x[0, 0, i + D // 2].item(), pos * f
        assert out[i].item() == pytest.approx(attn * (a * math.cos(ang) - b * math.sin(ang)),
                                              abs=2e-5)
        assert out[i + D // 2].item() == pytest.approx(
            attn * (b * math.cos(ang) + a * math.sin(ang)), abs=2e-5)


def test_linear_scaling_is_position_interpolation():
    x = torch.randn(10, 2, D)
    pos = torch.arange(10) * 3
    scaled = rope(x, pos, THETA, {"rope_type": "linear", "factor": 3.0}, 64)
    assert torch.allclose(scaled, rope(x, pos.float() / 3, THETA), atol=1e-5)


def test_dynamic_ntk_scales_the_base_past_max_positions():
    dynamic = {"type": "dynamic", "factor": 2.0}
    inside, _ = _freqs(dynamic, torch.arange(64))
    assert torch.allclose(inside, torch.tensor(_base_inv()), rtol=1e-6)  # seq <= max: unchanged
    longest = 100  # positions 0 .. 99: sequence length 100 > 64
    base = THETA * (2.0 * longest / 64 - 1.0) ** (D / (D - 2))
    outside, factor = _freqs(dynamic, torch.arange(longest))
    ref = [1.0 / base ** (2 * i / D) for i in range(D // 2)]
    assert torch.allclose(outside, torch.tensor(ref), rtol=1e-5) and factor == 1.0


@pytest.mark.parametrize("kind, scaling", [
    ("linear", CASES["linear"][0]), ("llama3", CASES["llama3"][0]), ("yarn", CASES["yarn"][0]),
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0})])
def test_rope_scaling_agrees_with_transformers(kind, scaling):
    tf = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {**scaling, "rope_type": kind, "rope_theta": THETA}
    params.pop("type", None)
    try:
        cfg = tf.Qwen2Config(hidden_size=4 * D, num_attention_heads=4,
                             max_position_embeddings=64, rope_parameters=params)
        kw = {"seq_len": 100} if kind == "dynamic" else {}
        ref, attn = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", **kw)
    except (TypeError, KeyError) as e:  # another transformers version's API
        pytest.skip(f"transformers rope API: {e}")
    inv, factor = _freqs(scaling, torch.arange(100))
    assert torch.allclose(inv, ref.float(), rtol=1e-5) and factor == pytest.approx(attn)
