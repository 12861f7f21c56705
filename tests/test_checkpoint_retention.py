"""Checkpoint disk (issue 25 item 7): a run keeps its last `keep_last` periodic checkpoints and
`final`, may leave the optimizer state out (`save_optimizer: false`), and is refused before it
trains when the checkpoints that will exist at once do not fit on output_dir's disk."""

import os
import shutil
import warnings
from collections import namedtuple

import pytest
import torch
from dlmkern.doctor import e2e_checks as e2e
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers import SFT, RLConfig, SFTConfig, TraceRL
from dlmkern.trainers import checkpoint as ckpt
from dlmkern.trainers.config import build_config

Usage = namedtuple("Usage", "total used free")


def _model(hidden=64):
    """e2e's tiny model; hidden=256 (1.3 M parameters) makes dcp's per-tensor overhead
    (~2 KB) negligible next to the tensors."""
    torch.manual_seed(0)
    return DiffusionLM(tiny_config("sdar", vocab_size=e2e.TOK.vocab_size, hidden_size=hidden,
                                   intermediate_size=2 * hidden, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=64,
                                   mask_token_id=e2e.TOK.mask_token_id))


def _sft(out, dtype=torch.float32, hidden=64, **kw):
    cfg = dict(batch_size=4, total_steps=5, lr=1e-3, output_dir=str(out), progress_bar=False)
    return SFT(_model(hidden).to(dtype), e2e.TOK, e2e.DATA, SFTConfig(**{**cfg, **kw}))


def _run_dir(out):
    return sorted(n for n in os.listdir(out) if n.startswith(("checkpoint", "final")))


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("keep_last, kept", [(2, ["checkpoint-4", "checkpoint-5"]),
                                             (0, [f"checkpoint-{n}" for n in range(1, 6)])])
def test_sft_keeps_the_last_checkpoints_and_final(tmp_path, keep_last, kept):
    _sft(tmp_path, save_every=1, keep_last=keep_last).train()
    assert _run_dir(tmp_path) == kept + ["final"]


def test_rl_keeps_the_last_checkpoints_and_final(tmp_path):
    TraceRL(e2e.model("cpu"), e2e.TOK, e2e.DATA, e2e.digit_share,
            e2e._rl_cfg(str(tmp_path), total_steps=3, save_every=1, keep_last=2)).train()
    assert _run_dir(tmp_path) == ["checkpoint-2", "checkpoint-3", "final"]


def test_stale_checkpoints_are_the_oldest_up_to_this_step(tmp_path):
    for n in ("checkpoint-1", "checkpoint-2", "checkpoint-10", "checkpoint-3", "checkpoint-20",
              "checkpoint-4.tmp", "final", "checkpoint-x", "log.jsonl"):
        (tmp_path / n).mkdir()
    (tmp_path / "checkpoint-7").write_text("a file, not a checkpoint")
    assert ckpt.periodic_checkpoints(str(tmp_path)) == [1, 2, 3, 10, 20]
    stale = ckpt.stale_checkpoints(str(tmp_path), step=10, keep_last=2)
    # numeric order (not "10" < "2"); checkpoint-20 is past this step (an earlier run's): kept
    assert stale == [str(tmp_path / f"checkpoint-{n}") for n in (1, 2)]
    assert ckpt.stale_checkpoints(str(tmp_path), step=10, keep_last=0) == []


def test_save_optimizer_false_writes_the_model_only_and_resumes_fresh(tmp_path):
    bf16 = torch.bfloat16  # the GPU case: fp32 masters and moments, 12 bytes per parameter
    full = _sft(tmp_path / "full", bf16, hidden=256)
    lean = _sft(tmp_path / "lean", bf16, hidden=256, save_optimizer=False)
    for tr in (full, lean):
        tr.train_step()
        tr.save(str(tmp_path / tr.cfg.output_dir / "ckpt"))
    n = sum(p.numel() for p in full.model.parameters())
    full_dcp, lean_dcp = (_du(os.path.join(t.cfg.output_dir, "ckpt", "dcp")) for t in (full, lean))
    assert lean_dcp == pytest.approx(2 * n, rel=0.03)   # bf16 weights
    assert full_dcp == pytest.approx(14 * n, rel=0.03)  # + fp32 master, exp_avg, exp_avg_sq

    resumed = _sft(tmp_path / "resumed", bf16, hidden=256, save_optimizer=False)
    with pytest.warns(RuntimeWarning, match="no optimizer state.*start fresh"):
        resumed.resume(os.path.join(lean.cfg.output_dir, "ckpt"))
    assert resumed.step == 1 and not resumed.opt.state
    for a, b in zip(resumed.model.parameters(), lean.model.parameters(), strict=True):
        assert torch.equal(a, b)
    resumed.train_step()  # the fresh optimizer takes its first step
    assert resumed.step == 2 and len(resumed.opt.state) == len(list(resumed.model.parameters()))

    again = _sft(tmp_path / "again", bf16, hidden=256)  # a full checkpoint restores it
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again.resume(os.path.join(full.cfg.output_dir, "ckpt"))
    master = [again.opt.state[p]["master"] for p in again.model.parameters()]
    assert all(torch.equal(m, full.opt.state[p]["master"])
               for m, p in zip(master, full.model.parameters(), strict=True))


def test_checkpoint_bytes_match_what_a_save_writes(tmp_path):
    tr = _sft(tmp_path, torch.bfloat16, hidden=256)
    tr.train_step()
    tr.save(str(tmp_path / "ckpt"))
    n = sum(p.numel() for p in tr.model.parameters())
    est = ckpt.checkpoint_bytes(tr.model)
    assert est == n * (2 + 12 + 2)  # dcp weights + optimizer state + the bf16 export
    written = _du(tmp_path / "ckpt" / "dcp") + _du(tmp_path / "ckpt" / "model")
    assert est == pytest.approx(written, rel=0.03)
    assert ckpt.checkpoint_bytes(tr.model, save_optimizer=False) == n * (2 + 2)


def test_value_and_reference_models_count_too():
    pol, val, ref = e2e.model("cpu"), e2e.model("cpu", seed=1), e2e.model("cpu", seed=2)
    n = sum(p.numel() for p in pol.parameters())
    ref.requires_grad_(False)
    # fp32: dcp 4 bytes per parameter of each model, AdamW's two moments for policy and value,
    # the fp32 export of the policy
    assert ckpt.checkpoint_bytes(pol, val, ref) == 3 * 4 * n + 2 * 8 * n + 4 * n
    assert ckpt.checkpoint_bytes(pol, val, ref, save_optimizer=False) == 3 * 4 * n + 4 * n


@pytest.mark.parametrize("keep_last, saves, existing, want", [
    (2, 10, 0, 3),  # two kept and the one being written
    (2, 0, 0, 1),   # final only
    (2, 1, 0, 2),
    (0, 5, 0, 6),   # every periodic one and final
    (2, 5, 2, 1),   # resumed: the two already there are deleted as new ones come
    (3, 5, 1, 3),
    (2, 5, 5, 1),   # keep_last lowered on resume: the first new save prunes to two
])
def test_checkpoints_at_once(keep_last, saves, existing, want):
    assert ckpt.checkpoints_at_once(keep_last, saves, existing) == want


def test_a_run_whose_checkpoints_do_not_fit_is_refused_before_it_trains(tmp_path, monkeypatch):
    tr = _sft(tmp_path, torch.bfloat16, total_steps=4, save_every=1, keep_last=2)
    per = sum(p.numel() for p in tr.model.parameters()) * 16
    need = 3 * per  # two kept + one being written
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * need, 0, need - 1))
    refused = (r"output_dir .*checkpoints need .* GiB \(3 x .* but the disk has .* free; set "
               r"save_optimizer: false .*keep_last")
    with pytest.raises(ValueError, match=refused):
        tr.train()
    assert tr.step == 0 and _run_dir(tmp_path) == []  # nothing trained, nothing written
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * need, 0, need))
    tr.check_checkpoint_disk()  # exactly enough
    lean = _sft(tmp_path / "lean", torch.bfloat16, total_steps=4, save_every=1, keep_last=2,
                save_optimizer=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * need, 0, need // 4))
    lean.check_checkpoint_disk()  # 4 of 16 bytes per parameter: fits in a quarter


@pytest.mark.parametrize("cls", [SFTConfig, RLConfig])
def test_keep_last_and_save_optimizer_config(cls):
    cfg = build_config(cls, {}, ["keep_last=5", "save_optimizer=false"])
    assert (cfg.keep_last, cfg.save_optimizer) == (5, False)
    assert (cls().keep_last, cls().save_optimizer) == (2, True)
    with pytest.raises(ValueError, match="keep_last must be >= 0"):
        build_config(cls, {"keep_last": -1})
    with pytest.raises(ValueError, match="save_optimizer must be a bool"):
        build_config(cls, {}, ["save_optimizer=maybe"])


def test_checkpoint_bytes_of_a_tied_model_match_what_a_save_writes(tmp_path):
    # dcp writes a tied embedding once per state-dict key (twice), the export once
    torch.manual_seed(0)
    model = DiffusionLM(tiny_config("sdar", vocab_size=4096, hidden_size=256,
                                    intermediate_size=512, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                                    mask_token_id=e2e.TOK.mask_token_id)).to(torch.bfloat16)
    cfg = SFTConfig(batch_size=4, total_steps=1, output_dir=str(tmp_path / "run"),
                    progress_bar=False, save_optimizer=False)
    tr = SFT(model, e2e.TOK, e2e.DATA, cfg)
    tr.save(str(tmp_path / "ckpt"))
    written = _du(tmp_path / "ckpt" / "dcp") + _du(tmp_path / "ckpt" / "model")
    est = ckpt.checkpoint_bytes(tr.model, save_optimizer=False)
    assert est == pytest.approx(written, rel=0.03), (est, written)
