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
        """One id per character; a ValueError naming the first character outside the alphabet
        (never dropped: a prompt or answer would silently lose it)."""
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise ValueError(self.refusal(e.args[0], text)) from None

    def refusal(self, char: str, text: str) -> str:
        """Why `text` cannot be encoded: `char` is outside the alphabet."""
        return (f"character {char!r} of {_short(text)!r} is not in the character tokenizer's "
                f"alphabet {self.alphabet!r}")

    def unknown(self, text: str) -> str | None:
        """The first character of `text` outside the alphabet (None: it encodes)."""
        return next((c for c in text if c not in self.index), None)

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
        tokenizer_config.json): ``transformers.AutoTokenizer.from_pretrained(path)`` gives the
        same ids for the same text, with <pad> / <eos> / <mask> as its special tokens, but drops
        characters outside the alphabet; ``dlmkern.models.load_tokenizer`` (and so
        ``dlmkern sample --model DIR``) reads it back as this class (``from_saved``), which
        refuses them."""
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

    @classmethod
    def from_saved(cls, path: str) -> CharTokenizer | None:
        """The character tokenizer save_pretrained wrote in directory `path` (single-character
        tokens with ids 0..n-1, then <pad>, <eos>, <mask>, no merges), or None when `path`
        holds another tokenizer (or none)."""
        import json
        import os

        try:
            with open(os.path.join(path, "tokenizer.json")) as f:
                spec = json.load(f)
        except (OSError, ValueError):
            return None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("merges") or spec.get("pre_tokenizer"):
            return None
        tokens = [t for t, _ in sorted((model.get("vocab") or {}).items(), key=lambda kv: kv[1])]
        ids = sorted((model.get("vocab") or {}).values())
        n = len(tokens) - 3
        if n < 1 or ids != list(range(n + 3)) or tokens[n:] != ["<pad>", "<eos>", "<mask>"] \
                or any(len(t) != 1 for t in tokens[:n]):
            return None
        return cls("".join(tokens[:n]))


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
