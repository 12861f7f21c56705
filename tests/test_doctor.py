"""`dlmkern doctor` on the CPU: every check passes on a good install, prints its table and exits 0;
a wrong kernel or a broken trainer makes it fail and exit non-zero."""

import json

import pytest
import torch
from dlmkern.cli import main
from dlmkern.doctor import e2e_checks, ops_checks, run


def test_doctor_passes_on_this_install(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cuda_kernels_built" in printed and " FAIL" not in printed
    report = json.loads(out.read_text())
    assert report["passed"] and report["device"] == "cpu"
    names = {c["name"] for c in report["checks"]}
    for part in ("block_attention packed_rounds D=64", "block_attention packed_rounds D=128",
                 "decode_attention", "masked_logprobs", "logprobs_from_logits",
                 "policy_value_loss seq_mean", "sampler", "SFT", "TraceRL + value model",
                 "DiPO + reference KL", "(LLaDA)", "save + resume"):
        assert any(part in n for n in names), part
    assert {c["dtype"] for c in report["checks"]} >= {"float32", "bfloat16"}
    assert all(c["ok"] and c["seconds"] >= 0 for c in report["checks"])


def test_doctor_fails_on_a_wrong_kernel(monkeypatch, tmp_path, capsys):
    real = ops_checks.block_attention

    def off_by_a_bit(*args, **kwargs):  # an attention kernel 10 % off (bf16 tolerance: 2 %)
        out, lse = real(*args, **kwargs)
        return out * 1.1, lse

    monkeypatch.setattr(ops_checks, "block_attention", off_by_a_bit)
    out = tmp_path / "doctor.json"
    assert run("cpu", only="ops", json_path=str(out)) == 1
    checks = json.loads(out.read_text())["checks"]
    failed = {c["name"] for c in checks if not c["ok"]}
    assert failed and all(n.startswith("block_attention") for n in failed)
    assert all(c["ok"] for c in checks if not c["name"].startswith("block_attention"))
    assert "FAIL outside tolerance" in capsys.readouterr().out


def test_doctor_reports_a_trainer_that_breaks(monkeypatch, tmp_path):
    monkeypatch.setattr(e2e_checks, "cases", lambda device: [
        ("TraceRL on NaN rewards", lambda d: e2e_checks._run_steps(e2e_checks.TraceRL(
            e2e_checks.model(d), e2e_checks.TOK, e2e_checks.DATA,
            lambda p, c, **_: [float("nan")] * len(c), e2e_checks._rl_cfg(str(tmp_path)))))])
    out = tmp_path / "doctor.json"
    assert run("cpu", only="e2e", json_path=str(out)) == 1
    (check,) = json.loads(out.read_text())["checks"]
    # NaN rewards are refused by name (a ValueError) before they reach the loss
    assert not check["ok"] and check["detail"].startswith("NonFiniteReward: reward '<lambda>'")
    assert torch.isfinite(torch.tensor(0.0))  # the process survived the failing check


@pytest.mark.cuda
@pytest.mark.parametrize("name", [n for n, _ in e2e_checks.cases("cuda")])
def test_end_to_end_on_cuda(name):
    """The doctor's end-to-end checks as tests on the GPU: the samplers and every trainer with
    the model on cuda (bf16), as bench/gpu_check.sh's test phase runs them."""
    fn = dict(e2e_checks.cases("cuda"))[name]
    measured, ratio = fn("cuda")
    assert ratio <= 1.0, (name, measured)
