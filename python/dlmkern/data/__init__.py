"""Datasets, prompt formats and tokenizers built in code (nothing downloaded)."""

from dlmkern.data.char_tokenizer import CharTokenizer
from dlmkern.data.datasets import load_dataset
from dlmkern.data.prompts import MATH_INSTRUCTION, PromptFormat

__all__ = ["MATH_INSTRUCTION", "CharTokenizer", "PromptFormat", "load_dataset"]
