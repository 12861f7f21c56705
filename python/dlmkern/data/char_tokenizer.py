"""A character tokenizer built in code, for tests and the embedded demo."""

from __future__ import annotations


class CharTokenizer:
    """One id per character of `alphabet`, then <pad>, <eos>, <mask>. The same encode / decode /
    eos_token_id / mask_token_id surface the trainers use from Hugging Face tokenizers."""

    def __init__(self, alphabet: str = "0123456789+-*=?: \n"):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self.index = {c: i for i, c in enumerate(alphabet)}
        self.pad_token_id = len(alphabet)
        self.eos_token_id = len(alphabet) + 1
        self.mask_token_id = len(alphabet) + 2
        self.vocab_size = len(alphabet) + 3

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet") from e

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.alphabet):
                out.append(self.alphabet[i])
            elif i == self.eos_token_id:
                if skip_special_tokens:
                    break
                out.append("<eos>")
            elif not skip_special_tokens:
                out.append("<pad>" if i == self.pad_token_id else "<mask>")
        return "".join(out)

    def save_pretrained(self, path: str) -> None:
        """Writes this tokenizer as a Hugging Face fast tokenizer (tokenizer.json and
        tokenizer_config.json): ``transformers.AutoTokenizer.from_pretrained(path)`` (and so
        ``dlmkern.models.load_tokenizer`` / ``dlmkern sample --model DIR``) gives the same ids for
        the same text, with <pad> / <eos> / <mask> as its special tokens."""
        import json
        import os

        from tokenizers import Tokenizer, decoders, models

        specials = {"pad_token": "<pad>", "eos_token": "<eos>", "mask_token": "<mask>"}
        vocab = {c: i for i, c in enumerate(self.alphabet)}
        vocab.update({"<pad>": self.pad_token_id, "<eos>": self.eos_token_id,
                      "<mask>": self.mask_token_id})
        # one token per character: BPE without merges and without a pre-tokenizer (spaces and
        # newlines are characters of the alphabet like any other); tokens decode fused
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.add_special_tokens(list(specials.values()))
        tok.decoder = decoders.Fuse()
        os.makedirs(path, exist_ok=True)
        tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
                       "clean_up_tokenization_spaces": False, **specials}, f, indent=2)
