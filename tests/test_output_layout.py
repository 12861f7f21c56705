"""One output layout (issue 27 item 3): dlmkern train, SFT, RL and the demo all leave the trained
model in output_dir/final/model; `dlmkern train` ends by saying where the model, log and curves
are and how to sample and evaluate it; `--model` given a run or checkpoint directory finds the
model inside it, or names where models are."""

import json
import os
import re
import shlex

import pytest
import torch
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.demo import DemoSize, run_demo
from dlmkern.models import DiffusionLM, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = CharTokenizer()


@pytest.fixture
def sft_run(tmp_path, capsys):
    """A 2-step SFT run by dlmkern train (a checkpoint at step 1): (output_dir, dataset, what
    train printed)."""
    torch.manual_seed(0)
    model = tmp_path / "base"
    DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                            mask_token_id=TOK.mask_token_id)).save_pretrained(str(model))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)})
                              for a in range(5) for b in range(5)))
    out = tmp_path / "runs" / "sft"
    assert main(["train", os.path.join(ROOT, "configs", "block_sft.yaml"), f"model={model}",
                 f"dataset={data}", "tokenizer=char", f"output_dir={out}", "batch_size=4",
                 "total_steps=2", "save_every=1", "keep_last=0", "progress_bar=false"]) == 0
    return out, data, capsys.readouterr().out


def _sample(capsys, model, *extra):
    rc = main(["sample", "--model", str(model), "--prompt", "1+2=", "--max-new-tokens", "4",
               *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_train_ends_naming_the_model_log_curves_and_the_commands_that_use_them(sft_run, capsys):
    out, data, printed = sft_run
    assert f"model:  {out / 'final' / 'model'}" in printed
    assert f"log:    {out / 'log.jsonl'}" in printed
    assert f"curves: {out / 'curves.png'}" in printed
    assert (out / "curves.png").stat().st_size > 0
    commands = dict(re.findall(r"^(sample|eval): +(dlmkern .*)$", printed, re.M))
    assert commands["sample"].startswith(f"dlmkern sample --model {out / 'final' / 'model'} "
                                         "--prompt ")
    assert commands["eval"].startswith(f"dlmkern eval --model {out / 'final' / 'model'} "
                                       f"--data {data}")
    for name in ("sample", "eval"):  # as printed, they run
        assert main(shlex.split(commands[name])[1:]) == 0, name
        capsys.readouterr()


def test_model_flag_finds_the_model_in_a_run_or_checkpoint_directory(sft_run, capsys):
    out, _, _ = sft_run
    rc, want, err = _sample(capsys, out / "final" / "model")
    assert rc == 0, err
    for where in (out, out / "final"):  # the run directory, its final checkpoint
        assert _sample(capsys, where)[:2] == (0, want), where
    rc, text, err = _sample(capsys, out / "checkpoint-1")
    assert rc == 0, err


def test_model_flag_on_a_directory_of_runs_names_the_models_in_it(sft_run, capsys):
    out, _, _ = sft_run
    rc, _, err = _sample(capsys, out.parent)  # runs/: one level too high
    assert rc == 2
    assert f"--model '{out.parent}' is not a model directory" in err
    assert str(out / "final" / "model") in err and "sentencepiece" not in err


def test_model_flag_on_a_run_stopped_before_its_end_names_its_checkpoints(sft_run, capsys):
    out, _, _ = sft_run
    os.rename(out / "final", out.parent / "elsewhere")  # as a run a signal stopped at step 2
    rc, _, err = _sample(capsys, out)
    assert rc == 2
    assert f"no final model (the run did not finish); its checkpoints' models: " \
           f"{out / 'checkpoint-2' / 'model'}, {out / 'checkpoint-1' / 'model'}" in err


def test_a_model_directory_without_a_tokenizer_says_how_to_give_one(tmp_path, capsys):
    model = tmp_path / "bare"
    DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                            mask_token_id=TOK.mask_token_id)).save_pretrained(str(model))
    rc, _, err = _sample(capsys, model)
    assert rc == 2
    assert f"{model} holds no tokenizer" in err and "--tokenizer" in err
    assert "sentencepiece" not in err
    assert _sample(capsys, model, "--tokenizer", "char")[0] == 0


def test_the_demo_leaves_its_model_where_train_does(tmp_path, capsys):
    size = DemoSize(n_train=24, n_test=8, sft_steps=2, sft_batch=8, rl_steps=1,
                    prompts_per_step=2, group_size=2)
    run_demo(out_dir=str(tmp_path / "demo"), progress_bar=False, size=size)
    printed = capsys.readouterr().out
    run = tmp_path / "demo" / "tracerl"
    assert (run / "final" / "model" / "config.json").exists()
    assert (run / "final" / "model" / "tokenizer.json").exists()
    assert not (run / "model").exists()
    assert f"dlmkern sample --model {run / 'final' / 'model'} --prompt" in printed


def test_the_printed_eval_command_scores_the_held_out_rows_as_the_run_did(tmp_path, capsys):
    """With eval_dataset, train's eval command scores those rows (not the training ones) and
    decodes as the run's held-out evaluation (its sampling steps): it prints the accuracy the
    run logged last. A reward with fractional scores that depend on the completion (and the
    held-out rows on other prompts) makes an equal number mean the same completions."""
    torch.manual_seed(0)
    model = tmp_path / "base"
    DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                            mask_token_id=TOK.mask_token_id)).save_pretrained(str(model))
    TOK.save_pretrained(str(model))
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"{a}+1="}) for a in range(4)))
    test.write_text("\n".join(json.dumps({"prompt": f"{a}*{a}="}) for a in range(6)))
    (tmp_path / "myreward.py").write_text(
        "def odd(prompts, completions, **_):\n"
        "    return [sum(ch in '13579' for ch in c) / (1 + len(c)) for c in completions]\n")
    out = tmp_path / "runs" / "rl"
    run_file = tmp_path / "rl.yaml"
    run_file.write_text(f"algo: tracerl\nmodel: {model}\ndataset: {train}\n"
                        f"eval_dataset: {test}\nreward: {tmp_path / 'myreward.py'}:odd\n")
    assert main(["train", str(run_file), f"output_dir={out}", "prompts_per_step=2",
                 "group_size=2", "max_new_tokens=8", "sampling.steps=2", "total_steps=1",
                 "eval_every=1", "progress_bar=false", "pass_rate_low=0",
                 "pass_rate_high=1"]) == 0
    printed = capsys.readouterr().out
    command = re.search(r"^eval: +(dlmkern .*)$", printed, re.M).group(1)
    assert f"--data {test} " in command and "--steps 2" in command
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert main(shlex.split(command)[1:]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(logged[-1]["eval_accuracy"])
