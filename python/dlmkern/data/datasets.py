"""Prompt datasets: a list of dicts or a JSONL file, each row with a "prompt" and the columns
the reward functions read (e.g. "answer", "tests")."""

from __future__ import annotations

import json
import os


def load_dataset(data, prompt_key: str = "prompt") -> list[dict]:
    """A list of row dicts from a list / iterable of dicts or a JSONL path; every row must have
    `prompt_key`."""
    if isinstance(data, (str, os.PathLike)):
        with open(data) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = [dict(r) for r in data]
    for i, r in enumerate(rows):
        if prompt_key not in r:
            raise ValueError(f"dataset row {i} has no {prompt_key!r} column: {sorted(r)}")
    if not rows:
        raise ValueError("the dataset is empty")
    return rows
