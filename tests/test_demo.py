"""`dlmkern demo` end to end at a few steps: both algorithms run, print the two held-out
accuracies, and write the logs, the plot and the trained model."""

import json

import pytest
from dlmkern.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tracerl", "dipo"])
def test_demo_runs_end_to_end(tmp_path, capsys, algo):
    out = tmp_path / "demo"
    rc = main(["demo", "--algo", algo, "--sft-steps", "3", "--rl-steps", "2", "--out", str(out),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy after SFT" in printed and f"held-out accuracy after {algo}" in printed
    rows = [json.loads(x) for x in (out / algo / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)  # held-out curve, every step here
    assert (out / algo / "curves.png").stat().st_size > 0
    assert (out / algo / "model" / "config.json").exists()
    assert (out / "sft" / "final" / "model" / "model.safetensors").exists()
