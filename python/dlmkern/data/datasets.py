"""Prompt datasets (SPEC 4.8): rows from a list of dicts or a local file / directory, with a
column mapping.

Files: JSONL (``.jsonl`` / ``.ndjson``), JSON (a list of rows, or an object holding one under
``"data"`` / ``"rows"`` / ``"train"``; a ``.json`` file of JSON lines, as ``datasets``'
``to_json`` writes, reads too), CSV / TSV, parquet (pyarrow) and directories written by
``datasets``' ``save_to_disk`` (the ``datasets`` library). JSONL, JSON and CSV need nothing
beyond Python; a mistake names the file and the line.

``columns`` maps the names the trainers and rewards read (``prompt``, ``messages``, ``answer``,
``tests``, ...) to where a row holds them: a column name, or a dot path into nested values
(verl's ``reward_model.ground_truth``; a number indexes a list: ``messages.0.content``).
``tests`` is the code reward's: a row whose tests it cannot decide soundly is refused, naming the
row (``dlmkern.rewards.code_tests``).

Every row ends up with ``prompt`` as text, the text the rewards receive: a ``prompt`` holding a
chat list (verl) becomes ``messages``, and ``prompt`` is then the last user message. A
conversation that ends with an assistant turn and has no ``answer`` gives that turn as the answer
(SFT on chat data)."""

from __future__ import annotations

import csv
import json
import os

JSON_LIST_KEYS = ("data", "rows", "train", "examples")
_MISSING = object()


def load_dataset(data, columns: dict | None = None, split: str = "train") -> list[dict]:
    """A list of row dicts from a list / iterable of dicts (a ``datasets.Dataset`` too) or a path.
    ``columns``: {name: source column or dot path}. ``split``: the split of a ``DatasetDict``
    directory. Every row must give a prompt (``prompt`` or ``messages``)."""
    where = "dataset"
    if isinstance(data, (str, os.PathLike)):
        where = os.fspath(data)
        rows = read_rows(where, split)
    else:
        rows = []
        for i, r in enumerate(data):
            if not isinstance(r, dict):
                raise ValueError(f"dataset row {i} is a {type(r).__name__}, not a dict of columns")
            rows.append(dict(r))
    if not rows:
        raise ValueError(f"{where}: the dataset is empty")
    if columns:
        rows = map_columns(rows, columns, where)
    return [_normalise(r, i, where) for i, r in enumerate(rows)]


# ---- readers ----------------------------------------------------------------------------------

def read_rows(path: str, split: str = "train") -> list[dict]:
    """The rows of a local file or `save_to_disk` directory, by its extension."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {path!r} does not exist")
    if os.path.isdir(path):
        return _read_disk(path, split)
    ext = path.lower().rsplit(".", 1)[-1] if "." in os.path.basename(path) else ""
    readers = {"jsonl": _read_jsonl, "ndjson": _read_jsonl, "json": _read_json,
               "csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet, "pq": _read_parquet}
    if ext not in readers:
        raise ValueError(f"{path}: unknown dataset format {('.' + ext) if ext else '(none)'}; "
                         "expected .jsonl, .json, .csv, .tsv, .parquet or a directory written by "
                         "datasets' save_to_disk")
    return readers[ext](path)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg} at column "
                                 f"{e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object (a row of columns), "
                                 f"got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file (datasets' to_json writes these)
            return _read_jsonl(path)
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column "
                         f"{e.colno})") from None
    if isinstance(obj, dict):
        lists = [k for k in JSON_LIST_KEYS if isinstance(obj.get(k), list)]
        if not lists:
            raise ValueError(f"{path}: a JSON object must hold the rows as a list under one of "
                             f"{', '.join(JSON_LIST_KEYS)} (its keys: {sorted(obj)[:10]})")
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, not an object of "
                             "columns")
    return obj


def _read_csv(path: str) -> list[dict]:
    delim = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delim)
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names
                raise ValueError(f"{path}: line {reader.line_num}: {len(row[None])} more fields "
                                 f"than the header's {len(reader.fieldnames)}")
            rows.append(row)
    return rows


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs the 'pyarrow' package "
                          "(pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) say what is wrong
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def _read_disk(path: str, split: str) -> list[dict]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any(os.path.isfile(os.path.join(path, m)) for m in markers):
        raise ValueError(f"{path}: a directory dataset must be written by datasets' save_to_disk "
                         f"(it has none of {', '.join(markers)})")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path}: reading a save_to_disk directory needs the 'datasets' "
                          "package (pip install datasets)") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    return ds.to_list()


# ---- columns ----------------------------------------------------------------------------------

def get_path(row: dict, path: str):
    """row[path] when the row has that column, else the dot path into nested dicts / lists;
    _MISSING when it leads nowhere."""
    if path in row:
        return row[path]
    cur = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit() and \
                -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def map_columns(rows: list[dict], columns: dict, where: str = "dataset") -> list[dict]:
    """Each row with columns[name] read from its source (a column or dot path); the source
    columns stay. A source missing from a row is an error naming it and the first such row."""
    for name, src in columns.items():
        if not isinstance(name, str) or not isinstance(src, str) or not src:
            raise ValueError(f"columns: {name!r}: {src!r} must map a column name to a source "
                             "column or dot path (strings)")
    out = []
    for i, row in enumerate(rows):
        r = dict(row)
        for name, src in columns.items():
            v = get_path(row, src)
            if v is _MISSING:
                raise ValueError(f"{where}: column {src!r} (mapped to {name!r}) is missing from "
                                 f"row {i} (its columns: {sorted(row)})")
            r[name] = v
        out.append(r)
    return out


def _normalise(r: dict, i: int, where: str) -> dict:
    prompt, messages = r.get("prompt"), r.get("messages")
    if isinstance(prompt, (list, tuple)):  # verl: the prompt column holds the chat list
        messages, r["messages"] = prompt, prompt
    if messages is not None:
        msgs = _check_messages(messages, i, where)
        if msgs[-1]["role"] == "assistant" and "answer" not in r and len(msgs) > 1:
            r["answer"] = msgs[-1]["content"]
            msgs = msgs[:-1]
        r["messages"] = msgs
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not isinstance(prompt, str):
            if not users:
                raise ValueError(f"{where}: row {i}: the conversation has no user message")
            r["prompt"] = users[-1]
    elif prompt is None:
        raise ValueError(f"{where}: row {i} has no 'prompt' or 'messages' column (its columns: "
                         f"{sorted(r)}); map one with columns, e.g. prompt: question")
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: row {i}: 'prompt' must be text or a chat list, got "
                         f"{type(prompt).__name__} {prompt!r:.60}")
    if "tests" in r:  # the code reward's column: a test it cannot decide soundly is refused now
        from dlmkern.rewards.code_tests import check_code_tests

        check_code_tests(r["tests"], f"{where}: row {i}")
    return r


def _check_messages(messages, i: int, where: str) -> list[dict]:
    if isinstance(messages, str):  # a JSON-encoded list (CSV columns hold text)
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            messages = None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: row {i}: 'messages' must be a non-empty list of "
                         "{role, content} dicts")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: row {i}: message {j} must be a dict with 'role' and "
                             f"'content' strings, got {m!r:.80}")
        out.append(dict(m))
    return out
