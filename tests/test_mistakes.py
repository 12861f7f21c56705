"""Mistakes refused before work starts, each naming the thing at fault (rewards' outputs and
signatures, dataset columns, token ids and sizes of a model config, group_size=1 with a
group-relative advantage, an output_dir holding a previous run), and non-finite training stopped
(or skipped) before the optimizer applies it."""

import json
import math
import os

import pytest
import torch
from dlmkern import SFT, DiPO, TraceRL
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, ModelConfig, ValueModel, tiny_config
from dlmkern.trainers import RLConfig, SFTConfig, build_config

from .rl_helpers import rl_config

TOK = CharTokenizer()
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "level": "easy"}
        for a in range(5) for b in range(5)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOWHERE = "/nonexistent/model"  # loading it would fail: an error about anything else came first


def _model(seed=0):
    torch.manual_seed(seed)
    return DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id))


def _rl(tmp_path, **kw):
    base = dict(prompts_per_step=1, group_size=4, max_new_tokens=8, steps_per_block=2,
                total_steps=2, output_dir=str(tmp_path), progress_bar=False, lr=1e-3,
                pass_rate_low=0.0, pass_rate_high=1.0)
    base.update(kw)
    return rl_config(**base)


def _sft(tmp_path, **kw):
    base = dict(batch_size=4, lr=1e-3, total_steps=2, output_dir=str(tmp_path),
                progress_bar=False, log_every=1)
    base.update(kw)
    return SFTConfig(**base)


def alternating(prompts, completions, **_):
    return [float(i % 2) for i in range(len(completions))]


def _log(path):
    return [json.loads(x) for x in open(os.path.join(path, "log.jsonl")).read().splitlines()]


# ---- 1. reward outputs ------------------------------------------------------------------------

@pytest.mark.parametrize("out, message", [
    (lambda n: [1.0], r"reward 'bad' returned a list of length 1 for 4 completions; expected a "
                      r"list of 4 floats"),
    (lambda n: [1.0] * (n + 1), r"reward 'bad' returned a list of length 5 for 4 completions"),
    (lambda n: ["1.0"] * n, r"reward 'bad' returned str '1.0' at index 0 of 4; expected a list "
                            r"of 4 floats"),
    (lambda n: [1.0, None, 0.0, 1.0], r"reward 'bad' returned NoneType None at index 1 of 4"),
    (lambda n: [[1.0]] * n, r"reward 'bad' returned list \[1.0\] at index 0 of 4"),
    (lambda n: 1.0, r"reward 'bad' returned float 1.0 for 4 completions; expected a list of 4"),
    (lambda n: [0.0, float("nan"), 1.0, float("inf")],
     r"reward 'bad' returned non-finite values \(nan at index 1, inf at index 3\) for 4 "
     r"completions"),
])
def test_reward_output_is_checked_naming_the_reward(tmp_path, out, message):
    def bad(prompts, completions, **_):
        return out(len(completions))

    tr = TraceRL(_model(), TOK, DATA, [alternating, bad], _rl(tmp_path))
    with pytest.raises(ValueError, match=message):
        tr.rollout(DATA[:1])


def test_reward_arrays_and_tensors_are_accepted(tmp_path):
    import numpy as np

    def arr(prompts, completions, **_):
        return np.array([1.0, 0.0] * (len(completions) // 2))

    def ten(prompts, completions, **_):
        return torch.tensor([0.5] * len(completions))

    tr = TraceRL(_model(), TOK, DATA, [arr, ten], _rl(tmp_path))
    rewards = tr.rollout(DATA[:1]).rewards
    assert rewards.tolist() == [1.5, 0.5, 1.5, 0.5]


# ---- 2. rewards receive the columns their signature names -------------------------------------

def test_rewards_receive_only_the_columns_they_name(tmp_path):
    seen = {}

    def named(prompts, completions, answer):  # no **kwargs: no 'level' for it
        seen["named"] = answer
        return [0.0] * len(completions)

    def keyword_only(prompts, completions, *, level, missing_ok=None):
        seen["keyword_only"] = (level, missing_ok)
        return [0.0] * len(completions)

    def everything(prompts, completions, **columns):
        seen["everything"] = sorted(columns)
        return [0.0] * len(completions)

    tr = TraceRL(_model(), TOK, DATA, [named, keyword_only, everything], _rl(tmp_path))
    tr.rollout(DATA[:1])
    assert seen["named"] == ["0"] * 4
    assert seen["keyword_only"] == (["easy"] * 4, None)
    assert seen["everything"] == ["answer", "level"]


def test_reward_signatures_that_cannot_be_called_are_refused(tmp_path):
    def one_arg(completions):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"reward 'one_arg' must accept \(prompts, completions"):
        TraceRL(NOWHERE, TOK, DATA, one_arg, _rl(tmp_path))


# ---- 3. dataset columns -----------------------------------------------------------------------

def test_sft_rows_without_the_answer_fail_when_the_trainer_is_built(tmp_path):
    rows = [*DATA[:3], {"prompt": "1+1="}, *DATA[3:]]
    with pytest.raises(ValueError, match=r"SFT needs column 'answer', but dataset row 3 has none"):
        SFT(NOWHERE, TOK, rows, _sft(tmp_path))  # before the model: its path is not loaded
    with pytest.raises(ValueError, match=r"SFT needs column 'solution', but dataset row 0"):
        SFT(NOWHERE, TOK, DATA, _sft(tmp_path), answer_key="solution")


def test_a_reward_column_missing_from_the_dataset_fails_when_the_trainer_is_built(tmp_path):
    def needs_tests(prompts, completions, tests, answer=None):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"reward 'needs_tests' \(parameter 'tests' has no "
                                         r"default\) needs column 'tests', but dataset row 0"):
        TraceRL(NOWHERE, TOK, DATA, [alternating, needs_tests], _rl(tmp_path))
    rows = [{**r, "tests": []} for r in DATA]
    del rows[7]["tests"]
    with pytest.raises(ValueError, match=r"needs column 'tests', but dataset row 7 has none"):
        DiPO(NOWHERE, TOK, rows, needs_tests, {"output_dir": str(tmp_path)})


def test_cli_train_checks_the_dataset_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import dlmkern.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(dlmkern.models, "load", no_load)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": r["prompt"]}) for r in DATA))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = os.path.join(ROOT, "configs", "block_sft.yaml")
    args = ["train", path, f"model={model_dir}", f"dataset={data}", "tokenizer=char",
            f"output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    assert "SFT needs column 'answer', but dataset row 0 has none" in capsys.readouterr().err
    path = os.path.join(ROOT, "configs", "trado4b_tracerl_value.yaml")
    assert main([*args[:1], path, *args[2:], "reward=tests.test_cli:exact"]) == 2
    assert "reward 'exact' (parameter 'answer' has no default) needs column 'answer'" in \
        capsys.readouterr().err


# ---- 4 / 7. model config ----------------------------------------------------------------------

def test_model_config_token_ids_must_lie_in_the_vocabulary():
    with pytest.raises(ValueError, match=r"mask_token_id = 63 is outside the vocabulary "
                                         r"\(vocab_size = 12"):
        tiny_config(vocab_size=12, mask_token_id=63)
    assert tiny_config(vocab_size=12).mask_token_id == 11  # the last id, as the default's 63
    assert tiny_config().mask_token_id == 63
    hf = tiny_config().to_hf()
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        with pytest.raises(ValueError, match=rf"{key} = 64 is outside the vocabulary "
                                             r"\(vocab_size = 64"):
            ModelConfig.from_hf({**hf, key: 64})
    with pytest.raises(ValueError, match=r"eos_token_id = \[1, 99\] is outside"):
        ModelConfig.from_hf({**hf, "eos_token_id": [1, 99]})
    ModelConfig.from_hf({**hf, "eos_token_id": [1, 2], "pad_token_id": None})


def test_model_config_sizes_must_be_positive():
    with pytest.raises(ValueError, match=r"head_dim must be an integer >= 1, got 0"):
        tiny_config(head_dim=0)
    with pytest.raises(ValueError, match=r"num_kv_heads must be an integer >= 1, got 0"):
        tiny_config(num_kv_heads=0)


# ---- 5. group_size=1 with a group-relative advantage ------------------------------------------

def test_group_size_one_needs_a_value_model(tmp_path):
    with pytest.raises(ValueError, match=r"group_size=1 with a group-relative advantage .* "
                                         r"nothing would train"):
        build_config(RLConfig, {"group_size": 1})
    with pytest.raises(ValueError, match=r"group_size=1"):
        TraceRL(NOWHERE, TOK, DATA, alternating, _rl(tmp_path, group_size=1))
    build_config(RLConfig, {"group_size": 1, "use_value_model": True})
    m = _model()
    tr = TraceRL(m, TOK, DATA, alternating, _rl(tmp_path, group_size=1),
                 value_model=ValueModel.from_policy(m))
    assert tr.value_model is not None


# ---- 6. an output_dir holding a previous run --------------------------------------------------

def test_existing_output_dir_refuse_overwrite_resume(tmp_path):
    out = tmp_path / "run"
    SFT(_model(), TOK, DATA, _sft(out)).train()
    assert [r["step"] for r in _log(out)] == [0, 1]
    with pytest.raises(ValueError, match=rf"output_dir '{out}' holds a previous run .* "
                                         r"existing_output_dir: resume"):
        SFT(NOWHERE, TOK, DATA, _sft(out))  # refused before the model loads
    with pytest.raises(ValueError, match=r"existing_output_dir must be one of refuse, overwrite, "
                                         r"resume, got 'append'"):
        build_config(SFTConfig, {"existing_output_dir": "append"})
    # resume: continues from the latest checkpoint (final, step 2) and appends to the log
    tr = SFT(_model(1), TOK, DATA, _sft(out, total_steps=3, existing_output_dir="resume"))
    assert tr.step == 2
    tr.train()
    assert [r["step"] for r in _log(out)] == [0, 1, 2]
    # overwrite: a fresh start (its old checkpoints are gone too)
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.pt").write_bytes(b"")
    (out / "notes.txt").write_text("kept")
    tr = SFT(_model(), TOK, DATA, _sft(out, total_steps=1, existing_output_dir="overwrite"))
    assert tr.step == 0 and not (out / "log.jsonl").exists() and not (out / "final").exists()
    assert not (out / "checkpoint-1").exists() and (out / "notes.txt").read_text() == "kept"
    tr.train()
    assert [r["step"] for r in _log(out)] == [0]


def test_resume_picks_the_latest_checkpoint_and_drops_later_log_rows(tmp_path):
    out = tmp_path / "rl"
    tr = TraceRL(_model(), TOK, DATA, alternating, _rl(out, total_steps=3, save_every=2))
    tr.train()
    assert [r["step"] for r in _log(out)] == [0, 1, 2]
    os.rename(out / "final", out / "old-final")  # a crash after step 2: checkpoint-2 is latest
    with pytest.raises(ValueError, match="holds a previous run"):
        TraceRL(NOWHERE, TOK, DATA, alternating, _rl(out))
    tr = TraceRL(_model(), TOK, DATA, alternating,
                 _rl(out, total_steps=4, existing_output_dir="resume"))
    assert tr.step == 2 and [r["step"] for r in _log(out)] == [0, 1]  # step 2 comes again
    tr.train()
    assert [r["step"] for r in _log(out)] == [0, 1, 2, 3]


def test_resume_from_a_checkpoint_inside_output_dir_continues_that_run(tmp_path):
    out = tmp_path / "run"
    SFT(_model(), TOK, DATA, _sft(out, total_steps=3, save_every=2)).train()
    assert [r["step"] for r in _log(out)] == [0, 1, 2]
    tr = SFT(_model(), TOK, DATA, _sft(out, total_steps=4),
             resume_from=str(out / "checkpoint-2"))  # the default policy (refuse) does not apply
    assert tr.step == 2 and [r["step"] for r in _log(out)] == [0, 1]
    tr.train()
    assert [r["step"] for r in _log(out)] == [0, 1, 2, 3]
    other = tmp_path / "other"
    SFT(_model(), TOK, DATA, _sft(other, total_steps=1)).train()
    with pytest.raises(ValueError, match=rf"output_dir '{other}' holds a previous run"):
        SFT(NOWHERE, TOK, DATA, _sft(other), resume_from=str(out / "final"))
    with pytest.raises(ValueError, match=r"resume_from '.*' is not a dlmkern checkpoint"):
        SFT(NOWHERE, TOK, DATA, _sft(tmp_path / "fresh"), resume_from=str(tmp_path))


def test_cli_train_resumes_into_its_own_output_dir(tmp_path):
    torch.manual_seed(0)
    model_dir = str(tmp_path / "model")
    _model().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in DATA))
    out = tmp_path / "out"
    args = ["train", os.path.join(ROOT, "configs", "block_sft.yaml"), f"model={model_dir}",
            f"dataset={data}", "tokenizer=char", f"output_dir={out}", "batch_size=4",
            "log_every=1", "progress_bar=false", "save_every=1"]
    assert main([*args, "total_steps=2"]) == 0
    assert main([*args, "total_steps=3", f"resume={out / 'checkpoint-1'}"]) == 0
    assert [r["step"] for r in _log(out)] == [0, 1, 2]
    assert main([*args, "total_steps=3"]) == 2  # without resume: refused


def test_cli_train_refuses_an_existing_run_before_loading_the_model(tmp_path, monkeypatch,
                                                                   capsys):
    import dlmkern.models

    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0}\n')
    monkeypatch.setattr(dlmkern.models, "load", lambda *a, **k: pytest.fail("model loaded"))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in DATA))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    rc = main(["train", os.path.join(ROOT, "configs", "block_sft.yaml"), f"model={model_dir}",
               f"dataset={data}", "tokenizer=char", f"output_dir={out}"])
    assert rc == 2
    assert f"output_dir '{out}' holds a previous run" in capsys.readouterr().err


# ---- 8. non-finite training -------------------------------------------------------------------

def _params(m):
    return {k: p.detach().clone() for k, p in m.named_parameters()}


def _unchanged(before, m, skip=()):
    return all(torch.equal(before[k], p) for k, p in m.named_parameters() if k not in skip)


def nan_reward(prompts, completions, **_):
    return [float("nan")] * len(completions)


def test_a_nan_reward_stops_or_skips_the_step(tmp_path):
    tr = TraceRL(_model(), TOK, DATA, nan_reward, _rl(tmp_path / "stop"))
    before = _params(tr.model)
    with pytest.raises(ValueError, match=r"reward 'nan_reward' returned non-finite values"):
        tr.train_step()
    assert _unchanged(before, tr.model)
    tr = TraceRL(_model(), TOK, DATA, nan_reward, _rl(tmp_path / "skip", on_nonfinite="skip"))
    tr.train()
    assert _unchanged(before, tr.model)
    rows = _log(tmp_path / "skip")
    assert [r["nonfinite_skipped"] for r in rows] == [1, 2]
    assert all("reward 'nan_reward' returned non-finite" in r["skipped"] for r in rows)


def _poison(param):
    with torch.no_grad():
        param.view(-1)[0] = float("inf")


def test_sft_stops_on_a_non_finite_loss_without_stepping(tmp_path):
    tr = SFT(_model(), TOK, DATA, _sft(tmp_path / "stop"))
    _poison(tr.model.lm_head.weight)
    before = _params(tr.model)
    with pytest.raises(RuntimeError, match=r"step 0: non-finite (loss|grad_norm) = (nan|inf) in "
                                           r"the SFT update; the optimizer step was not applied"):
        tr.train_step()
    assert _unchanged(before, tr.model) and not tr.opt.state
    tr = SFT(_model(), TOK, DATA, _sft(tmp_path / "skip", on_nonfinite="skip"))
    _poison(tr.model.lm_head.weight)
    before = _params(tr.model)
    tr.train()
    assert _unchanged(before, tr.model)
    rows = _log(tmp_path / "skip")
    assert [r["nonfinite_skipped"] for r in rows] == [1, 2] and all("skipped" in r for r in rows)


@pytest.mark.parametrize("value", [False, True])
def test_rl_stops_on_a_non_finite_loss_without_stepping(tmp_path, value):
    tr = TraceRL(_model(), TOK, DATA, alternating, _rl(tmp_path, use_value_model=value))
    batch = tr.rollout(DATA[:1])  # sampled with finite weights
    trajs, rewards = batch.trajs, batch.rewards
    poisoned = tr.value_model.value_head.weight if value else tr.model.lm_head.weight
    _poison(poisoned)
    before = _params(tr.model)
    what = (r"value_(loss|grad_norm) = (nan|inf) in the value" if value
            else r"(loss|grad_norm) = (nan|inf) in the policy")
    with pytest.raises(RuntimeError, match=rf"step 0: non-finite {what} update; the optimizer "
                                           r"step was not applied"):
        tr.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), rewards)
    assert _unchanged(before, tr.model) and not tr.opt.state
    # skip: the update is dropped and counted, training goes on
    tr.cfg.on_nonfinite = "skip"
    stats = tr.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), rewards)
    keys = ("value_loss", "value_grad_norm") if value else ("loss", "grad_norm")
    assert not all(math.isfinite(stats[k]) for k in keys)
    assert tr.nonfinite_skipped >= 1 and _unchanged(before, tr.model)


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of stop, skip, got 'ignore'"):
        build_config(RLConfig, {"on_nonfinite": "ignore"})


@pytest.mark.slow
def test_the_demo_runs_twice_into_the_same_directory(tmp_path, capsys):
    for _ in range(2):  # the demo overwrites its own previous run
        assert main(["demo", "--sft-steps", "1", "--rl-steps", "1", "--out", str(tmp_path),
                     "--quiet"]) == 0
    assert [r["step"] for r in _log(tmp_path / "tracerl")] == [0]
    assert [r["step"] for r in _log(tmp_path / "sft")] == [0]
