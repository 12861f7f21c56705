"""Every benchmark row has the one fixed schema (bench/common.py), and the writer produces it."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, BENCH)
import common  # noqa: E402

KEYS = {"op", "shape", "provider", "p20_ms", "p50_ms", "p80_ms", "tflops", "gbps", "peak_mib",
        "device", "torch", "git", "date"}
NUMBER_OR_NONE = ("p20_ms", "p80_ms", "tflops", "gbps", "peak_mib")


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _check(row):
    assert set(row) == KEYS, sorted(set(row) ^ KEYS)
    for key in ("op", "provider", "device", "torch", "git", "date"):
        assert isinstance(row[key], str) and (row[key] or key == "git"), key
    assert isinstance(row["p50_ms"], float) and row["p50_ms"] > 0
    for key in NUMBER_OR_NONE:
        assert row[key] is None or isinstance(row[key], float), key
    assert isinstance(row["shape"], dict) and "dtype" in row["shape"]
    assert all(isinstance(v, (int, float, str, bool)) for v in row["shape"].values())
    assert common.check_row(row) == []


def test_schema_matches_common():
    assert set(common.ROW_KEYS) == KEYS


def test_stored_rows_fit_the_schema():
    rows = _rows(common.RESULTS)
    assert rows
    for row in rows:
        _check(row)
    keys = [(r["op"], json.dumps(r["shape"], sort_keys=True), r["provider"], r["date"])
            for r in rows]
    assert len(keys) == len(set(keys)), "one row per (op, shape, provider) per run"


def test_writer_produces_the_schema(tmp_path, monkeypatch):
    timing = common.Timing(0.001, 0.002, 0.003)
    row = common.make_row("op_x", {"N": 4, "dtype": "float32"}, "dlmkern", timing, "cpu",
                          flops=2e9, nbytes=4e6, peak_bytes=2**20)
    path = tmp_path / "rows.jsonl"
    monkeypatch.setenv("DLMKERN_BENCH_RESULTS", str(path))
    common.write_rows([row, common.make_row("op_x", {"N": 4, "dtype": "float32"}, "naive",
                                            timing, "cpu")])
    written = _rows(path)
    assert len(written) == 2
    for r in written:
        _check(r)
    assert written[0]["p50_ms"] == 2.0 and written[0]["tflops"] == 1.0
    assert written[0]["gbps"] == 2.0 and written[0]["peak_mib"] == 1.0
    assert written[1]["tflops"] is None and written[1]["peak_mib"] is None


def test_writer_refuses_bad_rows(tmp_path):
    row = common.make_row("op_x", {"N": 4, "dtype": "float32"}, "dlmkern",
                          common.Timing(1.0, 1.0, 1.0), "cpu")
    for bad in ({**row, "extra": 1}, {k: v for k, v in row.items() if k != "gbps"},
                {**row, "shape": {"N": 4}}, {**row, "p50_ms": "1"}):
        with pytest.raises(ValueError):
            common.write_rows([bad], str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()


def test_size_sets_and_overrides():
    args = common.parser("x").parse_args(["--tiny", "--set", "n=8", "--set", "blocks=4,32"])
    cfg = common.pick_sizes(args, {"default": {"n": 1, "blocks": [4]},
                                   "quick": {"n": 2, "blocks": [4]},
                                   "tiny": {"n": 3, "blocks": [4]}})
    assert cfg == {"n": 8, "blocks": [4, 32]}
    assert common.parser("x").parse_args([]).size_set == "default"
    assert common.parser("x").parse_args(["--quick"]).size_set == "quick"


def test_summary_targets_name_providers_the_benches_write():
    """A speed-up target names a baseline provider that some bench still writes (a renamed
    provider would leave its SPEC 6 target silently unmeasured in the GPU summary)."""
    import summary

    figures = {"tflops", "tok_s", "token_ratio", "peak_pct"}
    sources = "".join(open(os.path.join(BENCH, n)).read() for n in sorted(os.listdir(BENCH))
                      if n.startswith("bench_") and n.endswith(".py"))
    for op, what, _ in summary.TARGETS:
        assert what in figures or f'"{what}"' in sources, (op, what)
