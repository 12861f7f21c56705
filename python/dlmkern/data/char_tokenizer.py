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
