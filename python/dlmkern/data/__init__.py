"""Datasets and tokenizers built in code (nothing downloaded)."""

from dlmkern.data.char_tokenizer import CharTokenizer
from dlmkern.data.datasets import load_dataset

__all__ = ["CharTokenizer", "load_dataset"]
