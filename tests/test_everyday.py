"""The everyday loop without traps (issue 27 items 1, 5, 6): rewards by name everywhere (one
registry for train, eval and the Python API; a file path or a module in the current directory),
`dlmkern eval` that says what it scored, help that speaks to users, held-out evaluation inside a
run with the same code as `dlmkern eval`, logs and curves that match what ran."""

import json
import os
import subprocess
import sys

import matplotlib.image
import pytest
import torch
import yaml
from dlmkern.cli import main, parse_run
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers.logging import RunLogger, progress, show_step

TOK = CharTokenizer()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a reward with fractional scores that depend on the completion: equal accuracies from two
# evaluations mean they scored the same completions
REWARD_FILE = """
def odd_digits(prompts, completions, **_):
    return [sum(ch in "13579" for ch in c) / (1 + len(c)) for c in completions]


def exact(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


NOT_A_FUNCTION = 3
"""


def _model_dir(tmp_path, family="sdar"):
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size,
                                mask_token_id=TOK.mask_token_id))
    d = tmp_path / f"model_{family}"
    m.save_pretrained(str(d))
    return str(d)


def _rows(tmp_path, name="data.jsonl", n=4):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)})
                           for a in range(n)))
    return str(p)


def _run_file(tmp_path, **keys):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"model": _model_dir(tmp_path), "dataset": _rows(tmp_path),
                                 "tokenizer": "char", **keys}))
    return str(p)


RL_SMALL = ["prompts_per_step=2", "group_size=2", "max_new_tokens=8", "sampling.steps=2",
            "gen_block_length=4", "progress_bar=false", "pass_rate_low=0", "pass_rate_high=1"]


# ---- 1. rewards by name -----------------------------------------------------------------------

def test_train_takes_every_reward_eval_takes(tmp_path):
    run, _ = parse_run(_run_file(tmp_path, algo="tracerl", reward="exact"), [])
    assert run.reward == "exact"


def test_a_reward_file_loads_by_path_and_a_module_from_the_current_directory(tmp_path,
                                                                            monkeypatch):
    (tmp_path / "myreward.py").write_text(REWARD_FILE)
    run_file = _run_file(tmp_path, algo="tracerl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    parse_run(run_file, [f"reward={tmp_path / 'myreward.py'}:exact"])  # absolute path
    parse_run(run_file, ["reward=../myreward.py:exact"])  # relative to the current directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "myreward", raising=False)
    parse_run(run_file, ["reward=./myreward.py:exact"])
    parse_run(run_file, ["reward=myreward:exact"])  # as `python -m` finds it, no PYTHONPATH


@pytest.mark.parametrize("spec, message", [
    ("mth", r"reward 'mth': unknown reward name; use math, exact, code, "
            r"path/to/file.py:function or module:function"),
    ("nofile.py:f", r"reward 'nofile.py:f' cannot be loaded: file nofile.py not found"),
    ("myreward.py:nothing", r"reward 'myreward.py:nothing' cannot be loaded: myreward.py has "
                            r"no function 'nothing' \(it defines: exact, odd_digits\)"),
    ("myreward.py:NOT_A_FUNCTION", r"reward 'myreward.py:NOT_A_FUNCTION' cannot be loaded: "
                                   r"NOT_A_FUNCTION is an int, not a function"),
    ("broken.py:f", r"reward 'broken.py:f' cannot be loaded: loading broken.py raised "
                    r"SyntaxError"),
    ("myreward.py:", r"reward 'myreward.py:': name the function after the colon"),
    ("no_such_module_here:f", r"reward 'no_such_module_here:f' cannot be loaded: no module "
                              r"named 'no_such_module_here' \(looked in the current directory"),
])
def test_reward_mistakes_name_the_spec_and_what_went_wrong(tmp_path, monkeypatch, spec, message):
    (tmp_path / "myreward.py").write_text(REWARD_FILE)
    (tmp_path / "broken.py").write_text("def f(:\n")
    run_file = _run_file(tmp_path, algo="tracerl")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        parse_run(run_file, [f"reward={spec}"])


def test_the_python_api_takes_reward_names(tmp_path):
    from dlmkern.evaluate import Generation, evaluate
    from dlmkern.models import load
    from dlmkern.trainers import TraceRL, TraceRLConfig

    model = load(_model_dir(tmp_path))
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    cfg = TraceRLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, total_steps=1,
                        output_dir=str(tmp_path / "out"), progress_bar=False)
    TraceRL(model, TOK, rows, "exact", cfg).train()
    res = evaluate(model, TOK, rows, "exact", Generation(max_new_tokens=4))
    assert res.reward == "exact" and len(res.scores) == 2 and len(res.completions) == 2


def test_eval_names_its_reward_shows_completions_and_warns_when_math_finds_no_boxed(tmp_path,
                                                                                   capsys):
    model, data = _model_dir(tmp_path), _rows(tmp_path)
    args = ["eval", "--model", model, "--tokenizer", "char", "--data", data,
            "--max-new-tokens", "4"]
    assert main(args) == 0
    out = capsys.readouterr()
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["accuracy"] == 0.0 and res["reward"] == "math"
    assert "reward: math" in out.err
    assert "answer '0'" in out.err and "answer '2'" in out.err  # completions beside answers
    assert "no completion has a \\boxed{}" in out.err and "--reward exact" in out.err
    (tmp_path / "myreward.py").write_text(REWARD_FILE)
    assert main([*args, "--reward", str(tmp_path / "myreward.py:exact")]) == 0
    out = capsys.readouterr()
    assert "\\boxed" not in out.err and "myreward.py:exact" in out.err


# ---- 5. help ----------------------------------------------------------------------------------

def _help(argv) -> str:
    p = subprocess.run([sys.executable, "-m", "dlmkern.cli", *argv], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_help_lists_the_run_file_keys_and_every_command():
    from dlmkern.runfile import RUN_KEYS

    train = _help(["train", "--help"])
    for key in RUN_KEYS:
        assert f"\n  {key}:" in train or f"\n  {key} " in train, key
    assert "dlmkern config ALGO" in train
    top = _help(["--help"])
    summaries = {x.split(None, 1)[0]: x.split(None, 1)[1] for x in top.splitlines()
                 if x.startswith("    ") and len(x.split(None, 1)) == 2}
    for cmd in ("demo", "train", "sample", "eval", "config", "plan", "doctor"):
        assert cmd in summaries, cmd  # argparse lists a command with its summary only


def test_no_internal_document_references_in_help():
    from dlmkern.trainers import PRESETS

    texts = [_help(["--help"])]
    for cmd in ("demo", "train", "sample", "eval", "config", "plan", "doctor"):
        texts.append(_help([cmd, "--help"]))
    for algo in [*PRESETS, "sft"]:
        texts.append(_help(["config", algo]))
    assert not [t for t in texts if "SPEC" in t]


# ---- 6. held-out evaluation in a run ----------------------------------------------------------

def test_eval_every_without_eval_dataset_is_refused_naming_both_keys(tmp_path):
    for algo in ("tracerl", "sft"):
        with pytest.raises(ValueError, match=r"eval_every.*eval_dataset"):
            parse_run(_run_file(tmp_path, algo=algo), ["eval_every=2"])


def test_rl_held_out_accuracy_is_dlmkern_evals(tmp_path, monkeypatch, capsys):
    (tmp_path / "myreward.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run_file = _run_file(tmp_path, algo="tracerl", reward="./myreward.py:odd_digits",
                         eval_dataset=_rows(tmp_path, "held_out.jsonl", 3))
    assert main(["train", run_file, *RL_SMALL, "total_steps=3", "eval_every=2", "log_every=2",
                 f"output_dir={out}"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]  # 1: held-out; 2: the last step, always
    assert "eval_accuracy" in log[1] and "eval_accuracy" in log[2]
    assert (out / "curves.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "final" / "model"), "--tokenizer", "char",
                 "--data", "held_out.jsonl", "--reward", "./myreward.py:odd_digits",
                 "--max-new-tokens", "8", "--steps", "2", "--block-length", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["accuracy"] == pytest.approx(log[2]["eval_accuracy"], abs=1e-12)
    assert res["accuracy"] > 0  # a fractional score: not a vacuous equality


def test_sft_logs_held_out_accuracy_draws_curves_and_shows_the_loss(tmp_path, capsys):
    out = tmp_path / "out"
    run_file = _run_file(tmp_path, algo="sft", eval_dataset=_rows(tmp_path, "held_out.jsonl", 3))
    common = [f"output_dir={out}", "batch_size=2", "log_every=10", "eval_every=2"]
    assert main(["train", run_file, *common, "total_steps=3", "save_every=1"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]  # 1: held-out; 2: the last step, always
    assert all(0 <= log[i]["eval_accuracy"] <= 1 for i in (1, 2))
    assert (out / "curves.png").is_file()
    err = capsys.readouterr().err
    assert "[sft] 3/3" in err and "loss=" in err
    # resumed: progress counts from the resume step, not from 0
    assert main(["train", run_file, *common, "total_steps=5", "existing_output_dir=resume"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[sft] ")]
    assert lines[-1].startswith("[sft] 5/5 ")
    assert not any(x.startswith("[sft] 2/2 ") for x in lines)


def test_progress_lines_show_the_latest_held_out_accuracy(capsys):
    bar = progress(range(40), True, "rl")  # a line every 2 steps (pytest's stderr: no TTY)
    for i in bar:
        show_step(bar, {"reward_mean": 0.5, **({"eval_accuracy": i / 100} if i % 10 == 9
                                               else {})})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(" reward=0.500")  # before the first held-out score: none shown
    assert lines[4].endswith(" reward=0.500 held_out=0.090")  # step 10, scored
    assert lines[5].endswith(" reward=0.500 held_out=0.090")  # step 12: still the latest
    assert lines[-1].endswith(" reward=0.500 held_out=0.390")


def test_a_zero_one_reward_draws_one_panel_not_two(tmp_path):
    log = RunLogger(str(tmp_path), {})
    for s in range(6):
        r = float(s % 3 == 0)
        log.log({"step": s, "reward_mean": r, "pass_rate": r})
    one = log.plot(("reward_mean",), path=str(tmp_path / "one.png"))
    same = log.plot(("reward_mean", "pass_rate"), path=str(tmp_path / "same.png"))
    assert matplotlib.image.imread(same).shape == matplotlib.image.imread(one).shape
