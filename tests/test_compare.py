"""`dlmkern compare` (issue 28 item 5): one task under several algorithms with equal rollout
budgets. Each run generates the same completions (dynamic sampling: more, counted), the table has
its columns and one row per algorithm, the plot is written, a bad algorithm name is refused
before any work, the start is evaluated once and shared, and a preset added later needs no
change in compare."""

import dataclasses
import json
import os

import dlmkern.evaluate
import pytest
import torch
import yaml
from dlmkern.cli import main
from dlmkern.compare import COLUMNS, compare, parse_algos, plan
from dlmkern.data import CharTokenizer
from dlmkern.demo import DemoSize, compare_task
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers.presets import PRESETS
from dlmkern.trainers.rl_config import RLConfig

TOK = CharTokenizer()
STEPS, PROMPTS, GROUP = 2, 2, 4
SMALL = [f"total_steps={STEPS}", f"prompts_per_step={PROMPTS}", f"group_size={GROUP}",
         "max_new_tokens=4", "gen_block_length=4", "sampling.steps=2", "pass_rate_low=0",
         "pass_rate_high=1", "eval_every=1", "lr=1e-3", "max_oversample_rounds=2"]


def _rows(path, numbers):
    path.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)})
                              for a in numbers))
    return str(path)


@pytest.fixture
def run_file(tmp_path):
    torch.manual_seed(0)
    model = DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                                    mask_token_id=TOK.mask_token_id))
    model.save_pretrained(str(tmp_path / "model"))
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({
        "algo": "tracerl", "model": str(tmp_path / "model"), "tokenizer": "char",
        "dataset": _rows(tmp_path / "train.jsonl", range(8)),
        "eval_dataset": _rows(tmp_path / "test.jsonl", range(20, 26)), "reward": "exact"}))
    return str(p)


def test_equal_budgets_one_row_per_algorithm_a_plot_and_the_start_evaluated_once(
        run_file, tmp_path, monkeypatch, capsys):
    calls = []
    real = dlmkern.evaluate.evaluate

    def counted(model, tok, rows, *a, **kw):
        calls.append(len(rows))
        return real(model, tok, rows, *a, **kw)

    monkeypatch.setattr(dlmkern.evaluate, "evaluate", counted)
    algos = ["tracerl", "dipo", "coupled_grpo"]
    out = tmp_path / "cmp"
    table = compare(run_file, SMALL, algos, seeds=2, out_dir=str(out), progress_bar=False)

    budget = STEPS * PROMPTS * GROUP
    assert table["budget"]["completions_per_run"] == budget
    for r in table["runs"]:
        rows = [json.loads(x) for x in
                (out / r["algo"] / f"seed{r['seed']}" / "log.jsonl").read_text().splitlines()]
        assert len(rows) == STEPS  # every step logged: the counts are whole
        generated = sum(x["sampled_groups"] for x in rows) * GROUP
        assert r["completions"] == generated
        assert r["tokens_generated"] == sum(x["sampled_tokens"] for x in rows) > 0
        assert r["tokens_trained"] == sum(x.get("train_tokens", 0) for x in rows)
        if r["algo"] == "dipo":  # dynamic sampling draws more rounds: counted, not hidden
            assert r["completions"] >= budget
        else:
            assert r["completions"] == budget
    assert [(r["algo"], r["seed"]) for r in table["runs"]] == \
        [(a, s) for a in algos for s in (0, 1)]

    # the start: evaluated once, before every run, and every run's curve continues from it
    n_evals = sum(len(r["curve"]) for r in table["runs"])
    assert n_evals == len(table["runs"]) * STEPS  # eval_every=1
    assert calls == [6] * (1 + n_evals)
    assert table["start"]["rows"] == 6 and 0 <= table["start"]["accuracy"] <= 1

    md = (out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| algorithm"))
    assert header == "| " + " | ".join(COLUMNS) + " |"
    body = [line for line in md.splitlines() if line.startswith("| ") and line != header]
    assert [line.split(" | ")[0][2:] for line in body] == algos
    assert list(json.loads((out / "table.json").read_text())["algorithms"]) == algos
    assert table["algorithms"]["dipo"]["own_keys"]["dynamic_sampling"] is True
    assert (out / "compare.png").stat().st_size > 0
    assert "| algorithm |" in capsys.readouterr().out  # the table is printed


@pytest.mark.parametrize("algos, words", [
    ("tracerl,dipoo", ["'dipoo'", "did you mean 'dipo'", ", ".join(PRESETS)]),
    ("sft", ["sft is not an RL algorithm"]),
    ("dipo,dipo", ["'dipo' is named twice"]),
])
def test_a_bad_algorithm_name_is_refused_before_any_work(run_file, tmp_path, capsys, algos,
                                                          words):
    out = tmp_path / "cmp"
    assert main(["compare", run_file, "--algos", algos, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()


def test_a_new_preset_needs_no_change_in_compare_and_unequal_budgets_are_refused(
        run_file, tmp_path, monkeypatch):
    @dataclasses.dataclass
    class Later(RLConfig):
        algo = "later"
        eps_high: float = 0.3

    @dataclasses.dataclass
    class BigGroups(RLConfig):
        algo = "big_groups"
        group_size: int = 16

    monkeypatch.setitem(PRESETS, "later", Later)
    monkeypatch.setitem(PRESETS, "big_groups", BigGroups)
    assert parse_algos("tracerl, later") == ["tracerl", "later"]
    over = [o for o in SMALL if not o.startswith("group_size")]
    p = plan(run_file, over, ["tracerl", "later"], 1, str(tmp_path / "cmp"))
    assert p.own_keys["later"] == {"estimator": "trace", "eps_high": 0.3}
    with pytest.raises(ValueError, match="group_size differs between the presets"):
        plan(run_file, over, ["tracerl", "big_groups"], 1, str(tmp_path / "cmp"))
    # the run file setting it makes the budget one value again
    assert plan(run_file, SMALL, ["tracerl", "big_groups"], 1,
                str(tmp_path / "cmp")).configs["big_groups"].group_size == GROUP


def test_held_out_rows_are_required(run_file, tmp_path):
    raw = yaml.safe_load(open(run_file))
    del raw["eval_dataset"]
    p = tmp_path / "no_eval.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="set eval_dataset"):
        plan(str(p), [o for o in SMALL if not o.startswith("eval_every")], ["tracerl"], 1,
             str(tmp_path / "cmp"))


def test_the_demo_task_as_a_run_file_reuses_its_sft_start(tmp_path, capsys):
    size = DemoSize(n_train=60, n_test=20, sft_steps=2, sft_batch=8, rl_steps=2,
                    prompts_per_step=2, group_size=2)
    demo = tmp_path / "demo"
    run_file = compare_task(str(demo), progress_bar=False, size=size)
    weights = demo / "sft" / "final" / "model" / "model.safetensors"
    made = os.path.getmtime(weights)
    assert compare_task(str(demo), progress_bar=False, size=size) == run_file
    assert os.path.getmtime(weights) == made  # the same task: its SFT start reused
    raw = yaml.safe_load(open(run_file))
    assert raw["model"] == str(weights.parent) and raw["reward"] == "exact"
    rc = main(["compare", run_file, "--algos", "tracerl,random_mask", "--out",
               str(tmp_path / "cmp"), "--quiet"])
    assert rc == 0
    table = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert table["start"]["rows"] == 20
    assert table["budget"]["completions_per_run"] == 2 * 2 * 2
