"""Interrupts (issue 27 item 2): Ctrl-C (SIGINT), like SIGTERM / SIGUSR1, ends the current step,
writes a checkpoint and the curves and exits with one line naming the checkpoint and the exact
command that continues the run; running that command gives the parameters of an uninterrupted
run. A second Ctrl-C stops at once. Resuming a directory whose run left no checkpoint is
refused naming it, and the log never holds a step twice."""

import json
import os
import re
import shlex
import signal

import pytest
import torch
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.doctor import e2e_checks as e2e
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers import SFT, Preempted, SFTConfig

from . import test_preemption as preemption_tests

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(os.path.dirname(HERE), "configs", "trado4b_tracerl_value.yaml")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _test_handlers():
    return preemption_tests._test_handlers(SIGNALS)


def _steps(out) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]


_exported, _assert_same = preemption_tests._exported, preemption_tests._assert_same


_SIGINT_AT = [0]  # the reward's call that sends SIGINT (0: none)
_SIGINT_TIMES = [1]  # how many times it sends it


def interrupts(prompts, completions, **_):
    """Spread in every group; sends this process SIGINT (Ctrl-C) on call _SIGINT_AT (one call
    per step: inside that step, before its update), _SIGINT_TIMES times."""
    _SIGINT_AT.append(1)
    if len(_SIGINT_AT) - 1 == _SIGINT_AT[0]:
        for _ in range(_SIGINT_TIMES[0]):
            os.kill(os.getpid(), signal.SIGINT)
    return [float(i % 2) for i in range(len(completions))]


def _tiny_run(tmp_path):
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = tmp_path / "model"
    DiffusionLM(tiny_config("sdar", vocab_size=tok.vocab_size,
                            mask_token_id=tok.mask_token_id)).save_pretrained(str(model))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(f'{{"prompt": "{a}+{b}=", "answer": "{a + b}"}}'
                              for a in range(5) for b in range(5)))
    return ["train", RECIPE, f"model={model}", f"dataset={data}", "tokenizer=char",
            "reward=tests.test_interrupts:interrupts", "progress_bar=false",
            "prompts_per_step=1", "group_size=2", "max_new_tokens=8", "sampling.steps=2",
            "instruction=", "total_steps=4", "lr=1e-3", "value_lr=1e-3"]


def test_ctrl_c_checkpoints_the_step_and_the_printed_command_resumes_exactly(tmp_path, capfd):
    common = _tiny_run(tmp_path)
    _SIGINT_AT[:] = [0]
    assert main([*common, f"output_dir={tmp_path / 'reference'}"]) == 0
    capfd.readouterr()
    out = tmp_path / "run"
    _SIGINT_AT[:] = [2]  # Ctrl-C inside step 1; save_every 0 (the default): nothing saved yet
    with _test_handlers() as mine:
        assert main([*common, f"output_dir={out}"]) == 130  # a shell sees an interrupt
        assert all(signal.getsignal(s) is mine for s in SIGNALS)  # given back
    err = capfd.readouterr().err  # the notice is written to fd 2 (safe in a signal handler)
    assert "Ctrl-C: finishing this step, then a checkpoint; Ctrl-C again stops at once" in err
    ckpt = out / "checkpoint-2"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"[dlmkern] interrupted (SIGINT) after step 2: checkpoint written to "
                           f"{ckpt}; continue with: dlmkern train ")
    assert "Traceback" not in err
    assert {"checkpoint-2", "curves.png"} <= set(os.listdir(out))
    assert not (out / "final").exists()
    assert _steps(out) == [0, 1]
    # the printed command, as printed, continues the run to the uninterrupted one's parameters
    command = shlex.split(re.search(r"continue with: (dlmkern train .*)$", last).group(1))
    assert command[-1] == "existing_output_dir=resume"
    _SIGINT_AT[:] = [0]
    assert main(command[1:]) == 0
    assert _steps(out) == [0, 1, 2, 3]  # no step twice
    _assert_same(_exported(out), _exported(tmp_path / "reference"))


def test_the_resume_command_of_a_run_started_from_a_checkpoint_names_the_new_one(tmp_path,
                                                                                 capsys):
    common = _tiny_run(tmp_path)
    out = tmp_path / "run"
    _SIGINT_AT[:] = [0]
    assert main([*common, f"output_dir={out}", "total_steps=1", "save_every=1"]) == 0
    _SIGINT_AT[:] = [2]  # step 2 (the second step of this process)
    with _test_handlers():
        assert main([*common, f"output_dir={out}", f"resume={out / 'checkpoint-1'}"]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    command = shlex.split(re.search(r"continue with: (dlmkern train .*)$", last).group(1))
    assert command[-1] == f"resume={out / 'checkpoint-3'}"  # not checkpoint-1 again
    assert sum(a.startswith("resume=") for a in command) == 1
    _SIGINT_AT[:] = [0]
    assert main(command[1:]) == 0
    assert _steps(out) == [0, 1, 2, 3]


def _sft(out, resume_from=None, **kw):
    cfg = dict(batch_size=4, total_steps=4, lr=1e-3, output_dir=str(out), progress_bar=False,
               log_every=1)
    return SFT(e2e.model("cpu"), e2e.TOK, e2e.DATA, SFTConfig(**{**cfg, **kw}),
               resume_from=resume_from)


def _signal_in_step(tr, step, signals):
    batch = tr.batch

    def signalling_batch(*args, **kw):  # inside `step`, before its forward
        if tr.step == step:
            for s in signals:
                os.kill(os.getpid(), s)
        return batch(*args, **kw)

    tr.batch = signalling_batch


def test_sft_on_ctrl_c_writes_checkpoint_and_curves_and_names_the_api_resume(tmp_path, capsys):
    tr = _sft(tmp_path / "run")
    _signal_in_step(tr, 1, [signal.SIGINT])
    with _test_handlers():
        with pytest.raises(Preempted) as stop:
            tr.train()
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    assert (stop.value.code, stop.value.checkpoint, stop.value.signal_name) == (130, ckpt,
                                                                               "SIGINT")
    assert (f"interrupted (SIGINT) after step 2: checkpoint written to {ckpt}; continue with "
            f"existing_output_dir=\"resume\" (or resume_from=\"{ckpt}\")") in \
        capsys.readouterr().err
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    resumed = _sft(tmp_path / "run", existing_output_dir="resume")
    assert resumed.step == 2
    resumed.train()
    assert _steps(tmp_path / "run") == [0, 1, 2, 3]


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    tr = _sft(tmp_path / "run")
    _signal_in_step(tr, 1, [signal.SIGINT, signal.SIGINT])
    with _test_handlers() as mine:
        with pytest.raises(KeyboardInterrupt):
            tr.train()
        assert signal.getsignal(signal.SIGINT) is mine
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(("checkpoint", "final"))]


def test_dlmkern_train_on_a_second_ctrl_c_prints_one_line(tmp_path, capsys):
    common = _tiny_run(tmp_path)
    _SIGINT_AT[:], _SIGINT_TIMES[0] = [2], 2
    try:
        with _test_handlers():
            assert main([*common, f"output_dir={tmp_path / 'run'}"]) == 130
    finally:
        _SIGINT_TIMES[0] = 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "dlmkern train: stopped at once by Ctrl-C: nothing saved since the last checkpoint")
    assert not (tmp_path / "run" / "checkpoint-2").exists()


def _crashed_run(out):
    """An SFT run that crashed in step 2 (save_every 0): its log holds steps 0 and 1, no
    checkpoint exists."""
    tr = _sft(out)
    step = tr.train_step

    def crashing():
        if tr.step == 2:
            raise RuntimeError("crash")
        return step()

    tr.train_step = crashing
    with pytest.raises(RuntimeError, match="crash"):
        tr.train()
    assert _steps(out) == [0, 1] and not [n for n in os.listdir(out) if "checkpoint" in n]


def test_resuming_a_run_without_a_checkpoint_is_refused_naming_the_directory(tmp_path):
    out = tmp_path / "run"
    _crashed_run(out)
    with pytest.raises(ValueError, match=rf"existing_output_dir: resume, but output_dir '{out}' "
                                         r"holds no checkpoint .*log\.jsonl"):
        SFT("/nonexistent/model", e2e.TOK, e2e.DATA,  # refused before the model loads
            SFTConfig(output_dir=str(out), existing_output_dir="resume"))
    assert _steps(out) == [0, 1]  # untouched


def test_dlmkern_train_refuses_to_resume_a_run_without_a_checkpoint(tmp_path, capsys):
    common = _tiny_run(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    assert main([*common, f"output_dir={out}", "existing_output_dir=resume"]) == 2
    assert f"output_dir '{out}' holds no checkpoint" in capsys.readouterr().err
    assert _steps(out) == [0, 1]


def test_resume_into_an_empty_or_new_directory_starts_a_fresh_run(tmp_path):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        tr = _sft(out, total_steps=2, existing_output_dir="resume")
        assert tr.step == 0
        tr.train()
        assert _steps(out) == [0, 1]


def test_resume_from_an_earlier_checkpoint_drops_the_later_log_rows(tmp_path):
    out = tmp_path / "run"
    _sft(out, save_every=2, keep_last=0).train()
    assert _steps(out) == [0, 1, 2, 3]
    tr = _sft(out, total_steps=5, existing_output_dir="resume")  # final: step 4
    assert tr.step == 4
    tr = _sft(out, total_steps=5, resume_from=str(out / "checkpoint-2"))
    assert _steps(out) == [0, 1]  # steps 2 and 3 come again
    tr.train()
    assert _steps(out) == [0, 1, 2, 3, 4]
