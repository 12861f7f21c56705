"""Scale-out on CPU (gloo): a 2-process RL (or SFT) step equals a 1-process step with the same
global batch and seed, and a 2-process checkpoint resumes in 1 process."""

import os
import subprocess
import sys

import pytest
import torch

from .dist_worker import make_sft, make_trainer, make_vrpo

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, *extra):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": "1",
           "DLMKERN_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           os.path.join(HERE, "dist_worker.py"),
           str(out), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tracerl", "value", "minibatch", "uneven", "coupled", "odd",
                                  "dynamic", "refkl", "llada", "micro", "uneven_micro",
                                  "sum_micro", "sft", "sft_micro", "vrpo", "vrpo_micro"])
def test_two_ranks_equal_one_rank_and_resume_on_one(tmp_path, mode):
    _torchrun(tmp_path, mode)
    two = torch.load(tmp_path / "params.pt")

    def make(out):
        if mode == "sft":
            return make_sft(out)
        if mode == "sft_micro":
            return make_sft(out, micro_batch_tokens=30)
        if mode.startswith("vrpo"):
            return make_vrpo(out, micro_batch_tokens=300 if mode == "vrpo_micro" else 0)
        return make_trainer(out, mode)

    one = make(str(tmp_path / "single"))
    init = {k: v.clone() for k, v in one.model.state_dict().items()}
    torch.set_num_threads(1)
    log = one.train_step()
    if mode.startswith("uneven"):  # the setup does what it says: only rank 0's groups train
        assert log["kept_groups"] == 2 and torch.load(tmp_path / "log.pt")["kept_groups"] == 2
    if mode in ("minibatch", "uneven", "uneven_micro"):
        assert log["optimizer_steps"] == 6
    assert any(not torch.equal(init[k], v) for k, v in one.model.state_dict().items())
    for name, p in one.model.state_dict().items():
        torch.testing.assert_close(p, two[name], atol=2e-5, rtol=1e-4, msg=name)
    if mode in ("value", "micro"):  # the value model trained the same too
        two_v = torch.load(tmp_path / "value_params.pt")
        for name, p in one.value_model.state_dict().items():
            torch.testing.assert_close(p, two_v[name], atol=2e-5, rtol=1e-4, msg=name)
        assert not torch.equal(one.value_model.value_head.weight,
                               torch.zeros_like(one.value_model.value_head.weight))
    if mode.startswith("vrpo"):  # the logged margin is the global batch's on both
        two_log = torch.load(tmp_path / "log.pt")
        assert two_log["loss"] == pytest.approx(log["loss"], abs=1e-6)
        assert two_log["reward_accuracy"] == log["reward_accuracy"]
    if mode in ("odd", "dynamic"):  # the same prompts were drawn
        assert torch.load(tmp_path / "log.pt")["sampled_groups"] == log["sampled_groups"]
    # the 2-rank checkpoint resumes in this single process
    resumed = make(str(tmp_path / "resumed"))
    resumed.resume(str(tmp_path / "ckpt"))
    assert resumed.step == 1
    for name, p in resumed.model.state_dict().items():
        assert torch.equal(p, two[name]), name
    assert os.path.exists(tmp_path / "ckpt" / "model" / "model.safetensors")
    # optimizer state, data position and RNG came back too: the next step matches the
    # single-process run's second step
    one.train_step()
    resumed.train_step()
    for name, p in resumed.model.state_dict().items():
        torch.testing.assert_close(p, one.model.state_dict()[name], atol=1e-4, rtol=1e-3,
                                   msg=name)


@pytest.mark.slow
def test_bf16_two_ranks_train_with_fp32_masters_and_resume_on_one(tmp_path):
    """bf16 weights under FSDP2 (gradients reduced in fp32, fp32 master weights in the optimizer,
    micro-batches summed in fp32): the step runs on 2 ranks and its checkpoint resumes in one
    process with the same weights and fp32 masters. (bf16 rollouts need not match a 1-process
    run token for token, so the step itself is not compared.)"""
    _torchrun(tmp_path, "bf16")
    two = torch.load(tmp_path / "params.pt")
    assert all(v.dtype == torch.bfloat16 for v in two.values())
    resumed = make_trainer(str(tmp_path / "resumed"), "bf16")
    init = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    resumed.resume(str(tmp_path / "ckpt"))
    assert any(not torch.equal(init[k], v) for k, v in two.items())
    for name, p in resumed.model.state_dict().items():
        assert torch.equal(p, two[name]), name
    masters = [resumed.opt.state[p]["master"] for p in resumed.model.parameters()
               if "master" in resumed.opt.state[p]]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    for p, m in zip(resumed.model.parameters(), masters, strict=True):
        assert torch.equal(m.to(torch.bfloat16), p)
    assert "loss" in resumed.train_step()
