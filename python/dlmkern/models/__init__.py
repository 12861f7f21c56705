"""Diffusion language models: SDAR / TraDo (block diffusion), LLaDA and Dream (full attention),
and value models; Hugging Face directory format in and out."""

from dlmkern.models.config import ModelConfig, tiny_config
from dlmkern.models.io import load, load_tokenizer, save_pretrained, upstream_name
from dlmkern.models.transformer import DiffusionLM, KVCache, ValueModel

__all__ = ["DiffusionLM", "KVCache", "ModelConfig", "ValueModel", "load", "load_tokenizer",
           "save_pretrained", "tiny_config", "upstream_name"]
