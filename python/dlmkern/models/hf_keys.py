"""The config.json keys of SDAR / TraDo (Qwen3), LLaDA and Dream (Qwen2) that dlmkern does not map
to ModelConfig fields: which are ignored (they do not change the computation) and which are
switches accepted only at their neutral value. Built from the released configs (JetLM SDAR /
Gen-Verse TraDo and OpenMOSS/DiRL models/sdar/config.json, GSAI-ML LLaDA-8B-Instruct, Dream-org
Dream-v0-Instruct-7B) and the upstream configuration classes (Gen-Verse/dLLM-RL
models/{sdar,dream,llada}/configuration_*.py)."""

from __future__ import annotations

# transformers' PretrainedConfig bookkeeping and generation defaults: never the forward pass.
# Token ids are checked against the vocabulary by ModelConfig.
_GENERIC = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "name_or_path", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "initializer_range", "attn_implementation",
    "_attn_implementation_autoset", "output_hidden_states", "output_attentions", "return_dict",
    "use_return_dict", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "tie_encoder_decoder", "is_decoder", "is_encoder_decoder", "add_cross_attention",
    "chunk_size_feed_forward", "tokenizer_class", "id2label", "label2id", "problem_type",
    "task_specific_params", "finetuning_task", "prefix", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "dlmkern_value_model",
}
# SDAR's training / serving switches (OpenMOSS/DiRL models/sdar/config.json); the window size
# and window layers only matter when use_sliding_window is on (refused below)
_QWEN = _GENERIC | {
    "debug", "ep_size", "fuse_cross_entropy", "micro_forward", "skip_checkpoint", "use_deepep",
    "sliding_window", "max_window_layers", "pretraining_tp",
}
_LLADA = _GENERIC | {
    # initialisation, precision and kernel choices; mlp_ratio is superseded by mlp_hidden_size,
    # alibi_bias_max only matters with alibi, the attention-norm affine only with
    # attention_layer_norm (both refused below)
    "init_device", "init_fn", "init_std", "init_cutoff_factor", "precision", "flash_attention",
    "block_group_size", "mlp_ratio", "rope_full_precision", "alibi_bias_max",
    "attention_layer_norm_with_affine", "vocab_size",
}
IGNORED = {"sdar": _QWEN, "dream": _QWEN | {"attention_bias"}, "llada": _LLADA}


def _is(*values):
    return lambda v: any(v == x and type(v) is type(x) for x in values) or \
        (v is None and None in values)


def _zero(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


def _full_attention(v):
    return v is None or (isinstance(v, list) and all(x == "full_attention" for x in v))


# key: (accepted value, what another value would switch on)
_QWEN_NEUTRAL = {
    "use_sliding_window": (_is(False, None), "sliding-window attention"),
    "layer_types": (_full_attention, "per-layer attention types other than full attention"),
    "hidden_act": (_is("silu"), "an MLP activation other than SiLU"),
    "attention_dropout": (_zero, "attention dropout"),
    "use_mrope": (_is(False, None), "multimodal rotary embeddings"),
    "mlp_bias": (_is(False, None), "MLP biases"),
    "num_experts": (_zero, "a mixture-of-experts MLP"),
}
_LLADA_NEUTRAL = {
    "alibi": (_is(False, None), "ALiBi attention biases"),
    "rope": (_is(True), "no rotary embedding"),
    "scale_logits": (_is(False, None), "logits scaled by 1 / sqrt(d_model)"),
    "input_emb_norm": (_is(False, None), "embeddings scaled by sqrt(d_model)"),
    "attention_layer_norm": (_is(False, None), "layer norms on q and k"),
    "include_bias": (_is(False, None), "biases on every linear layer"),
    "bias_for_layer_norm": (_is(False, None), "layer-norm biases"),
    "layer_norm_type": (_is("rms"), "a layer norm other than RMSNorm"),
    "layer_norm_with_affine": (_is(True, None), "layer norms without weights"),
    "activation_type": (_is("silu"), "an MLP activation other than SiLU"),
    "block_type": (_is("llama"), "a transformer block other than LLaMA's"),
    "multi_query_attention": (_is(False, None), "multi-query attention (one k / v head)"),
    "clip_qkv": (_is(None), "q / k / v clipping"),
    "attention_dropout": (_zero, "attention dropout"),
    "residual_dropout": (_zero, "residual dropout"),
    "embedding_dropout": (_zero, "embedding dropout"),
}
NEUTRAL = {"sdar": _QWEN_NEUTRAL, "dream": _QWEN_NEUTRAL, "llada": _LLADA_NEUTRAL}

# rope_scaling types implemented: (required keys, optional keys), as transformers reads them
ROPE_SCALING_KEYS = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ("original_max_position_embeddings",)),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast",
                           "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), ()),
}
