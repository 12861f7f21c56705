"""Datasets (SPEC 4.8): JSONL, JSON, CSV, parquet and save_to_disk directories give the same rows;
column mappings with dot paths; verl rows; mistakes name the file, the line or row, the column."""

import csv
import json

import pytest
from dlmkern.data import load_dataset
from dlmkern.trainers import RLConfig, build_config

ROWS = [{"question": f"{a}+{a}=", "gt": str(2 * a), "level": a % 3} for a in range(5)]
EXPECTED = [{"question": f"{a}+{a}=", "gt": str(2 * a), "level": a % 3,
             "prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(5)]
COLUMNS = {"prompt": "question", "answer": "gt"}


def _write(tmp_path, fmt: str, rows=ROWS):
    p = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines are skipped
    elif fmt == "json":
        p.write_text(json.dumps(rows, indent=1))
    elif fmt == "csv":
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), p)
    elif fmt == "disk":
        datasets = pytest.importorskip("datasets")
        p = tmp_path / "disk"
        datasets.Dataset.from_list(rows).save_to_disk(str(p))
    return str(p)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    assert load_dataset(_write(tmp_path, fmt), COLUMNS) == EXPECTED


def test_csv_holds_text_and_json_variants(tmp_path):
    # CSV cells are text: the level comes back as "0", "1", ...
    assert load_dataset(_write(tmp_path, "csv"), COLUMNS) == \
        [dict(r, level=str(r["level"])) for r in EXPECTED]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert load_dataset(str(wrapped), COLUMNS) == EXPECTED
    lines = tmp_path / "lines.json"  # JSON lines under .json (datasets' to_json default)
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_dataset(str(lines), COLUMNS) == EXPECTED


def test_dataset_dict_directory_picks_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_dataset(str(tmp_path / "dd"), COLUMNS) == EXPECTED[:2]
    assert load_dataset(str(tmp_path / "dd"), COLUMNS, split="test") == EXPECTED[2:]
    with pytest.raises(ValueError, match=r"no split 'dev' \(splits: \['test', 'train'\]\)"):
        load_dataset(str(tmp_path / "dd"), COLUMNS, split="dev")


def test_verl_rows_dot_paths_and_chat_prompts(tmp_path):
    # verl's parquet layout: the prompt column holds the chat, the answer sits in reward_model
    verl = [{"data_source": "math", "prompt": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": f"{a}+1="}],
             "reward_model": {"style": "rule", "ground_truth": str(a + 1)},
             "extra_info": {"index": a}} for a in range(3)]
    rows = load_dataset(_write(tmp_path, "parquet", verl),
                        {"answer": "reward_model.ground_truth", "idx": "extra_info.index"})
    assert [r["prompt"] for r in rows] == ["0+1=", "1+1=", "2+1="]  # the last user message
    assert [r["answer"] for r in rows] == ["1", "2", "3"]
    assert [r["idx"] for r in rows] == [0, 1, 2]
    assert rows[1]["messages"] == verl[1]["prompt"]
    # a list index in a dot path; a column literally named with a dot wins over the path
    rows = load_dataset([{"messages": verl[0]["prompt"], "a.b": "flat", "a": {"b": "nested"}}],
                        {"first": "messages.0.content", "x": "a.b"})
    assert rows[0]["first"] == "Be brief." and rows[0]["x"] == "flat"


def test_a_conversation_ending_with_the_assistant_gives_the_answer():
    chat = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    (row,) = load_dataset([{"messages": chat}])
    assert row["answer"] == "4" and row["prompt"] == "2+2=" and row["messages"] == chat[:1]
    (kept,) = load_dataset([{"messages": chat, "answer": "four"}])  # an answer column wins
    assert kept["answer"] == "four" and kept["messages"] == chat


def test_mistakes_name_the_file_line_row_and_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 3: invalid JSON"):
        load_dataset(str(bad))
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"list.jsonl: line 2: expected a JSON object"):
        load_dataset(str(notobj))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(ValueError, match=r"broken.json: line 3: invalid JSON"):
        load_dataset(str(broken))
    rows = [{"question": "q0", "gt": "1"}, {"question": "q1"}]
    with pytest.raises(ValueError, match=r"column 'gt' \(mapped to 'answer'\) is missing from "
                                         r"row 1 \(its columns: \['question'\]\)"):
        load_dataset(rows, COLUMNS)
    with pytest.raises(ValueError, match=r"column 'reward_model.truth' .* missing from row 0"):
        load_dataset([{"prompt": "p", "reward_model": {"ground_truth": "1"}}],
                     {"answer": "reward_model.truth"})
    with pytest.raises(ValueError, match=r"row 1 has no 'prompt' or 'messages' column"):
        load_dataset([{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(ValueError, match=r"row 0: message 1 must be a dict with 'role' and "
                                         r"'content'"):
        load_dataset([{"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}])
    csvp = tmp_path / "ragged.csv"
    csvp.write_text("prompt,answer\na,1\nb,2,extra\n")
    with pytest.raises(ValueError, match=r"ragged.csv: line 3: 1 more fields"):
        load_dataset(str(csvp))
    with pytest.raises(ValueError, match=r"unknown dataset format .txt"):
        (tmp_path / "rows.txt").write_text("x")
        load_dataset(str(tmp_path / "rows.txt"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.jsonl"):
        load_dataset(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ValueError, match=r"empty.jsonl: the dataset is empty"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_dataset(str(tmp_path / "empty.jsonl"))


def test_parquet_and_directories_name_the_missing_package(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_arrow(name, *a, **k):
        if name.startswith(("pyarrow", "datasets")):
            raise ImportError(name)
        return real(name, *a, **k)

    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "state.json").write_text("{}")
    monkeypatch.setattr(builtins, "__import__", no_arrow)
    with pytest.raises(ImportError, match=r"x.parquet: reading parquet needs the 'pyarrow'"):
        load_dataset(str(tmp_path / "x.parquet"))
    with pytest.raises(ImportError, match=r"needs the 'datasets' package"):
        load_dataset(str(tmp_path / "d"))


def test_config_column_mapping_and_overrides():
    cfg = build_config(RLConfig, {"columns": {"prompt": "question"}},
                       ["columns.answer=reward_model.ground_truth"])
    assert cfg.columns == {"prompt": "question", "answer": "reward_model.ground_truth"}
    with pytest.raises(ValueError, match=r"columns must be a mapping of names to strings"):
        build_config(RLConfig, {"columns": ["question"]})
    with pytest.raises(ValueError, match=r"prompt_template must contain \{prompt\}"):
        build_config(RLConfig, {"prompt_template": "<s>user: hi"})


def test_dlmkern_train_reads_parquet_with_column_overrides(tmp_path, capsys):
    import os

    import torch
    from dlmkern.cli import main
    from dlmkern.data import CharTokenizer
    from dlmkern.models import DiffusionLM, tiny_config

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = tmp_path / "model"
    DiffusionLM(tiny_config("sdar", vocab_size=tok.vocab_size,
                            mask_token_id=tok.mask_token_id)).save_pretrained(str(model))
    data = _write(tmp_path, "parquet")
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "trado4b_tracerl_value.yaml")
    out = tmp_path / "out"
    common = ["train", recipe, f"model={model}", f"dataset={data}", "tokenizer=char",
              "reward=tests.test_cli:alternating", "instruction=", "total_steps=1",
              "prompts_per_step=1", "group_size=2", "max_new_tokens=4", "progress_bar=false",
              f"output_dir={out}"]
    assert main(common) == 2  # no prompt column without the mapping
    assert "rows.parquet: row 0 has no 'prompt' or 'messages' column" in capsys.readouterr().err
    assert main([*common, "columns.prompt=question", "columns.answer=gt"]) == 0
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 0
