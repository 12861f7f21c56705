"""Text and tokenizer checked before any model work, each refusal naming the thing at fault: the
tokenizer's ids must fit the model's vocabulary (an id beyond it is an IndexError inside the
first step), and every row must be encodable by a tokenizer that can refuse characters (dlmkern's
character tokenizer: its ``unknown(text)``), prompts, the prompt format's own text and answers."""

from __future__ import annotations


def tokenizer_size(tok) -> int | None:
    """How many ids the tokenizer gives: ``len(tok)`` for Hugging Face tokenizers (added tokens
    included), ``vocab_size`` otherwise (dlmkern's character tokenizer); None when it says
    neither."""
    try:
        return len(tok)
    except TypeError:
        size = getattr(tok, "vocab_size", None)
        return int(size) if size is not None else None


def check_vocabulary(tok, model_config, name: str = "tokenizer", where: str = "") -> None:
    """A ValueError when the tokenizer gives ids the model has no embedding for. `name`: how
    the tokenizer was given (e.g. "tokenizer char"); `where`: the model's config.json."""
    n, vocab = tokenizer_size(tok), model_config.vocab_size
    if n is not None and n > vocab:
        src = f" (vocab_size in {where})" if where else ""
        raise ValueError(f"{name} gives ids up to {n - 1} ({n} ids) but the model's vocabulary "
                         f"has {vocab}{src}: use the tokenizer the model was trained with (the "
                         "one saved beside it, the default) or a model built for this tokenizer")


def check_characters(rows: list[dict], tok, fmt, answer_key: str | None = None) -> None:
    """Every row's prompt (as `fmt`, a PromptFormat, renders it) and answer (`answer_key`)
    encodes, for a tokenizer that can name what it cannot encode (``unknown`` and ``refusal``,
    as CharTokenizer has); others encode any text. The error names the row, the column (or the
    prompt format's key) and the character."""
    if not (hasattr(tok, "unknown") and hasattr(tok, "refusal")):
        return
    for key in ("system_prompt", "instruction", "template"):
        text = getattr(fmt, key)
        bad = tok.unknown(text.replace("{prompt}", ""))
        if bad is not None:
            name = "prompt_template" if key == "template" else key
            raise ValueError(f"{name}: {tok.refusal(bad, text)}")
    for i, row in enumerate(rows):
        texts = [("messages", m["content"]) for m in row["messages"]] if row.get("messages") \
            else [("prompt", row["prompt"])]
        if answer_key is not None:
            texts.append((answer_key, str(row[answer_key])))
        for column, text in texts:
            bad = tok.unknown(text)
            if bad is not None:
                raise ValueError(f"row {i}, column {column!r}: {tok.refusal(bad, text)}")
