"""`dlmkern doctor` on the CPU: every check passes on a good install, prints its table and exits 0;
each check fails, and makes the doctor exit non-zero, on a defect planted where it would live: a
native kernel (``torch.ops.dlmkern``: the reference backend the gradient check compares against
stays right) or the trainer's own code (both backends)."""

import json

import pytest
import torch
from dlmkern.cli import main
from dlmkern.doctor import e2e_checks, ops_checks, run
from dlmkern.trainers import rollout, update

OPS = ("block_attention", "decode_attention", "masked_logprobs", "logprobs_from_logits",
       "policy_value_loss")
SFT, RL, VALUE = "SFT (SDAR)", "TraceRL, temperature 1.0 (LLaDA)", "TraceRL + value model (SDAR)"


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


def _plant_native(monkeypatch, op: str, change) -> None:
    """Replaces the native kernel ``torch.ops.dlmkern.<op>`` by ``change(real, *args)``."""
    real = getattr(torch.ops.dlmkern, op)
    monkeypatch.setattr(torch.ops.dlmkern, op, lambda *args: change(real, *args))


def _times(factor: float):
    """A kernel whose first output (or only one) is ``factor`` times the right one."""
    def change(real, *args):
        out = real(*args)
        if isinstance(out, torch.Tensor):
            return out * factor
        return (out[0] * factor, *out[1:])
    return change


def _doctor(tmp_path, only: str) -> dict:
    """Runs the doctor's `only` checks; {(row name, dtype): (ok, detail)}."""
    out = tmp_path / "doctor.json"
    rc = run("cpu", only=only, json_path=str(out))
    rows = {(c["name"], c["dtype"]): (c["ok"], c["detail"])
            for c in json.loads(out.read_text())["checks"]}
    assert rc == (0 if all(ok for ok, _ in rows.values()) else 1)
    return rows


@pytest.mark.parametrize("op", OPS)
def test_each_op_row_fails_on_a_wrong_kernel_and_only_its_own(monkeypatch, tmp_path, op):
    _plant_native(monkeypatch, op, _times(1.1))  # 10 % off (bf16 tolerance: 2 %)
    rows = _doctor(tmp_path, "ops")
    failed = {row for row, (ok, _) in rows.items() if not ok}
    assert failed == {row for row in rows if row[0].split()[0] == op}, failed  # both dtypes
    assert all(rows[row][1] == "outside tolerance" for row in failed)


@pytest.mark.parametrize("op", [o for o in OPS if o != "decode_attention"])  # no backward
def test_each_op_row_fails_on_a_wrong_backward_kernel(monkeypatch, tmp_path, op):
    _plant_native(monkeypatch, f"{op}_backward", _times(1.1))
    mine = [c for c in ops_checks.cases("cpu") if c[0].split()[0] == op]
    monkeypatch.setattr(ops_checks, "cases", lambda device: mine)
    rows = _doctor(tmp_path, "ops")
    low = set() if op == "policy_value_loss" else {"bfloat16"}  # the loss is checked in fp32
    assert {dtype for _, dtype in rows} == {"float32"} | low
    assert not any(ok for ok, _ in rows.values()), rows


def _flip_advantages(monkeypatch):  # the trainer's loss call: both backends see it
    real = update.policy_value_loss
    monkeypatch.setattr(update, "policy_value_loss",
                        lambda logp, old, adv, mask, **kw: real(logp, old, -adv, mask, **kw))


def _rl_off(monkeypatch):  # the reward never reaches the policy's loss
    real = update.policy_value_loss
    monkeypatch.setattr(update, "policy_value_loss",
                        lambda logp, old, adv, mask, **kw: real(logp, old, adv * 0, mask, **kw))


def _flip_rollout_advantages(monkeypatch):
    real = rollout.group_advantages  # the rollout's one call that makes group advantages
    monkeypatch.setattr(rollout, "group_advantages", lambda *a, **kw: -real(*a, **kw))


def _flip_value_loss(monkeypatch):  # the trainer's value term: both backends see it
    real = update.policy_value_loss
    monkeypatch.setattr(update, "policy_value_loss",
                        lambda *a, vf_coef=0.5, **kw: real(*a, vf_coef=-vf_coef, **kw))


# (planted defect, rows that must fail, the start of their detail, rows that must pass). A defect
# in the trainer's code reaches both backends: the behaviour checks must see it; a gradient 10x
# too large in a native kernel passes them (Adam's first step ignores a gradient's scale) and the
# gradient check against the reference backend must see it.
DEFECTS = {
    "RL switched off": (_rl_off, [RL], "AssertionError: the DiffusionLM's parameters did not "
                        "change", []),
    "advantage sign flipped in the loss": (_flip_advantages, [RL], "AssertionError: the update "
                                           "changed sum(A logp) by -", []),
    "rollout's advantages flipped": (_flip_rollout_advantages, [RL], "AssertionError: the "
                                     "rollout's advantages rank", []),
    "policy-loss gradient 10x (native backward)": (
        lambda mp: _plant_native(mp, "policy_value_loss_backward", _times(10.0)), [RL],
        "outside tolerance", [SFT]),
    "log-prob gradient 10x (native backward)": (
        lambda mp: _plant_native(mp, "masked_logprobs_backward", _times(10.0)), [SFT],
        "outside tolerance", []),
    "SFT gradient sign flipped (native backward)": (
        lambda mp: _plant_native(mp, "masked_logprobs_backward", _times(-1.0)), [SFT],
        "AssertionError: an SFT step moved the loss", []),
    "value loss sign flipped": (_flip_value_loss, [VALUE], "AssertionError: 3 updates moved "
                                "the value loss", []),
}


@pytest.mark.parametrize("defect", DEFECTS.values(), ids=DEFECTS.keys())
def test_trainer_rows_fail_on_planted_defects(monkeypatch, tmp_path, defect):
    plant, fail, detail, ok = defect
    chosen = [(n, f) for n, f in e2e_checks.cases("cpu") if n in fail + ok]
    assert len(chosen) == len(fail + ok)
    plant(monkeypatch)
    monkeypatch.setattr(e2e_checks, "cases", lambda device: chosen)
    rows = {name: v for (name, _), v in _doctor(tmp_path, "e2e").items()}
    for name in fail:
        assert not rows[name][0] and rows[name][1].startswith(detail), rows[name]
    assert all(rows[name][0] for name in ok), rows


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
