"""Preemption (issue 26 item 5): on SIGTERM / SIGUSR1 a run finishes its step, writes
output_dir/checkpoint-<step> on every rank and exits 0 naming it, and resuming gives the
parameters of an uninterrupted run bit for bit; a process killed inside save leaves the previous
checkpoint intact, and the run resumes from it."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.doctor import e2e_checks as e2e
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers import SFT, Preempted, SFTConfig
from safetensors.torch import load_file

from . import preemption_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(os.path.dirname(HERE), "configs", "trado4b_tracerl_value.yaml")


@contextlib.contextmanager
def _test_handlers(signals=(signal.SIGTERM, signal.SIGUSR1)):
    """`signals` fail the test unless the trainer handles them (instead of ending pytest); the
    trainer must give these handlers back when it is done."""
    def unhandled(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the test: not handled")

    before = {s: signal.signal(s, unhandled) for s in signals}
    try:
        yield unhandled
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _runs(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith(("checkpoint", "final")))


def _exported(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "final", "model", "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- one process, in this one: the Python API and dlmkern train ---------------------------------

def _sft(out, **kw):
    cfg = dict(batch_size=4, total_steps=4, lr=1e-3, output_dir=str(out), progress_bar=False)
    return SFT(e2e.model("cpu"), e2e.TOK, e2e.DATA, SFTConfig(**{**cfg, **kw}))


def test_sft_on_sigusr1_checkpoints_the_step_and_resumes_exactly(tmp_path, capsys):
    reference = _sft(tmp_path / "reference").train()
    tr = _sft(tmp_path / "run")
    batch = tr.batch

    def signalling_batch(*args, **kw):  # inside step 1, before its forward
        if tr.step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return batch(*args, **kw)

    tr.batch = signalling_batch
    with _test_handlers() as mine:
        with pytest.raises(Preempted) as stop:
            tr.train()
        assert signal.getsignal(signal.SIGUSR1) is mine  # given back
        assert signal.getsignal(signal.SIGTERM) is mine
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    assert (stop.value.code, stop.value.checkpoint, stop.value.step) == (0, ckpt, 2)
    assert f"preempted (SIGUSR1) after step 2: checkpoint written to {ckpt}" in \
        capsys.readouterr().err
    assert _runs(tmp_path / "run") == ["checkpoint-2"]  # step 1 finished; no final
    resumed = _sft(tmp_path / "run", existing_output_dir="resume")
    assert resumed.step == 2
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    resumed.train()
    after = resumed.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the resumed steps trained
    _assert_same(after, reference.model.state_dict())


_SIGNAL_AT = [0]  # the reward's call that sends SIGTERM (0: none)


def signals_sigterm(prompts, completions, **_):
    """A reward with spread in every group that sends this process SIGTERM on call
    _SIGNAL_AT (one call per step: inside that step, before its update)."""
    _SIGNAL_AT.append(1)
    if len(_SIGNAL_AT) - 1 == _SIGNAL_AT[0]:
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(i % 2) for i in range(len(completions))]


def test_dlmkern_train_exits_0_on_sigterm_and_resumes_exactly(tmp_path, capsys):
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = tmp_path / "model"
    DiffusionLM(tiny_config("sdar", vocab_size=tok.vocab_size,
                            mask_token_id=tok.mask_token_id)).save_pretrained(str(model))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(f'{{"prompt": "{a}+{b}=", "answer": "{a + b}"}}'
                              for a in range(5) for b in range(5)))
    common = ["train", RECIPE, f"model={model}", f"dataset={data}", "tokenizer=char",
              "reward=tests.test_preemption:signals_sigterm", "progress_bar=false",
              "prompts_per_step=1", "group_size=2", "max_new_tokens=8", "sampling.steps=2",
              "instruction=", "total_steps=3", "lr=1e-3", "value_lr=1e-3"]
    _SIGNAL_AT[:] = [0]
    assert main([*common, f"output_dir={tmp_path / 'reference'}"]) == 0
    out = tmp_path / "run"
    _SIGNAL_AT[:] = [2]  # step 1
    with _test_handlers():  # a periodic save at step 2 that keeps 1: the preemption's
        assert main([*common, f"output_dir={out}", "save_every=1", "keep_last=1"]) == 0
    assert f"preempted (SIGTERM) after step 2: checkpoint written to {out / 'checkpoint-2'}" \
        in capsys.readouterr().err
    assert _runs(out) == ["checkpoint-2"]
    _SIGNAL_AT[:] = [0]
    assert main([*common, f"output_dir={out}", "existing_output_dir=resume"]) == 0
    assert _runs(out) == ["checkpoint-2", "final"]
    _assert_same(_exported(out), _exported(tmp_path / "reference"))


# ---- other processes: 2 gloo ranks under torchrun, a process killed inside save -----------------

def _env():
    return {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": "1",
            "DLMKERN_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": ""}


@contextlib.contextmanager
def _launched(out, mode, ranks):
    """tests/preemption_worker.py in its own session (killed with everything it started if the
    test fails), output in OUT/<mode>.log."""
    script = [os.path.join(HERE, "preemption_worker.py"), str(out), mode]
    if ranks > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        script = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                  "--master-addr", "127.0.0.1", "--master-port", str(port), *script]
    with open(out / f"{mode}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *script], env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _log(out, mode) -> str:
    return (out / f"{mode}.log").read_text()


def _wait_for(path, proc, out, mode, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{_log(out, mode)[-3000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def _finished(proc, out, mode, timeout=240) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode}: still running after {timeout} s:\n{_log(out, mode)[-3000:]}")
    assert rc == 0, f"{mode}: exit status {rc}:\n{_log(out, mode)[-3000:]}"
    return _log(out, mode)


@pytest.mark.slow
def test_two_ranks_stop_on_sigterm_to_one_and_resume_exactly(tmp_path):
    # SIGTERM reaches rank 1 alone, inside step 1: rank 0 stops after the same step
    with _launched(tmp_path, "signal", ranks=2) as proc:
        _wait_for(tmp_path / "in_step", proc, tmp_path, "signal")
        os.kill(int((tmp_path / "in_step").read_text()), signal.SIGTERM)
        (tmp_path / "go").touch()
        log = _finished(proc, tmp_path, "signal")
    run = tmp_path / "run"
    assert f"preempted (SIGTERM) after step 2: checkpoint written to {run / 'checkpoint-2'}" \
        in log
    assert _runs(run) == ["checkpoint-2"]
    with _launched(tmp_path, "finish", ranks=2) as proc:  # a reference run, then run resumed
        log = _finished(proc, tmp_path, "finish")
    assert f"resumed from {run / 'checkpoint-2'} (step 2)" in log
    _assert_same(_exported(run), _exported(tmp_path / "reference"))


@pytest.mark.slow
def test_a_process_killed_inside_save_resumes_from_the_previous_checkpoint(tmp_path):
    with _launched(tmp_path, "killsave", ranks=1) as proc:
        _wait_for(tmp_path / "in_save", proc, tmp_path, "killsave")
        proc.kill()  # SIGKILL inside checkpoint-2's save: its dcp files written, no export
    run = tmp_path / "run"
    assert _runs(run) == ["checkpoint-1", "checkpoint-2.tmp"]
    assert os.listdir(run / "checkpoint-2.tmp") == ["dcp"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process ran: the same arithmetic, bit for bit
    try:
        resumed = worker.trainer(str(run), save_every=1, keep_last=1,
                                 existing_output_dir="resume")
        assert resumed.step == 1  # the previous checkpoint, whole
        resumed.train()
        reference = worker.trainer(str(tmp_path / "reference")).train()
    finally:
        torch.set_num_threads(threads)
    assert _runs(run) == [f"checkpoint-{worker.STEPS}", "final"]  # the stale .tmp replaced
    _assert_same(resumed.model.state_dict(), reference.model.state_dict())
