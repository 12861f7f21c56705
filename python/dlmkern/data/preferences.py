"""Preference rows (VRPO / DPO): ``prompt`` (or ``messages``), ``chosen`` and ``rejected``, read
by dlmkern.data.load_dataset (JSONL, JSON, CSV, parquet, save_to_disk directories; ``columns``
maps other names). A completion is text, or a chat list (TRL's conversational preference format:
the chosen / rejected conversation) whose last message is the assistant's: its content is the
completion. A row that cannot be trained is refused before any work, naming the file, the row
and the column."""

from __future__ import annotations

import os

from dlmkern.data.datasets import load_dataset

COMPLETIONS = ("chosen", "rejected")


def load_preferences(data, columns: dict | None = None) -> list[dict]:
    """Rows with ``prompt`` text and ``chosen`` / ``rejected`` completion texts (see the module
    docstring); a ValueError naming the file, row and column of the first bad one."""
    where = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "dataset"
    rows = load_dataset(data, columns)
    out = []
    for i, row in enumerate(rows):
        r = dict(row)
        for col in COMPLETIONS:
            r[col] = completion_text(row, col, f"{where}: row {i}, column {col!r}")
        if r["chosen"] == r["rejected"]:
            raise ValueError(f"{where}: row {i}: columns 'chosen' and 'rejected' hold the same "
                             f"completion {r['chosen']!r:.60}: a pair must differ")
        out.append(r)
    return out


def completion_text(row: dict, col: str, where: str) -> str:
    """The completion text of row[col]: a non-empty string, or the last (assistant) message of
    a chat list."""
    if row.get(col) is None:  # absent, or null (parquet / CSV give None for a hole)
        raise ValueError(f"{where}: missing (the row's columns: {sorted(row)}); map one with "
                         f"columns, e.g. columns.{col}=<source column>")
    v = row[col]
    if isinstance(v, (list, tuple)):
        last = v[-1] if v else None
        if not (isinstance(last, dict) and last.get("role") == "assistant" and
                isinstance(last.get("content"), str)):
            raise ValueError(f"{where}: a chat list must end with an assistant message "
                             f"{{role: assistant, content: text}}, got {last!r:.80}")
        v = last["content"]
    if not isinstance(v, str):
        raise ValueError(f"{where}: expected text (or a chat list), got {type(v).__name__} "
                         f"{v!r:.60}")
    if not v.strip():
        raise ValueError(f"{where}: the completion is empty")
    return v
