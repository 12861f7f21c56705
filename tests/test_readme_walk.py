"""README's "Your own task in five minutes" cannot drift from the code: the files its commands
write (the data and model scripts, the reward, the run files) are taken from the section and
checked as `dlmkern train` checks them before any work, and the commands it shows train printing
are the ones train prints for those run files. Nothing is trained."""

import json
import os
import re
import runpy

import pytest
from dlmkern.models import load_tokenizer
from dlmkern.rewards import get_reward
from dlmkern.run_layout import finished_lines
from dlmkern.runfile import check_train_inputs, parse_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLE = "## Your own task in five minutes"


def _section() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert TITLE in text, f"README.md lost its section {TITLE!r}"
    start = text.index(TITLE)
    end = text.find("\n## ", start + len(TITLE))
    return text[start:end if end > 0 else None]


@pytest.fixture
def walk(tmp_path, monkeypatch):
    """The section's files written into a fresh directory (the current one), its data and model
    made by its own scripts: (section text, {file name: content})."""
    section = _section()
    files = dict(re.findall(r"^cat > (\S+) <<'EOF'\n(.*?)^EOF$", section, re.S | re.M))
    assert {"make_task.py", "make_model.py", "myreward.py", "sft.yaml", "rl.yaml"} <= set(files)
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    runpy.run_path("make_task.py", run_name="__main__")
    runpy.run_path("make_model.py", run_name="__main__")
    return section, files


def _printed(section: str, run_file: str) -> list[str]:
    """The lines the section shows `dlmkern train RUN_FILE` printing at its end."""
    block = section.split(f"dlmkern train {run_file}\n```\n\n```\n", 1)[1].split("```", 1)[0]
    return [x for x in block.splitlines() if x.startswith(("model:", "log:", "sample:", "eval:"))]


def test_the_run_files_load_and_their_inputs_pass_trains_checks(walk):
    tok = load_tokenizer("base")
    run, cfg = parse_run("sft.yaml", [])
    check_train_inputs(run, cfg, tok)
    assert cfg.eval_every and run.eval_dataset
    # the RL run starts from the SFT run, which is not trained here: the base model stands in
    run, cfg = parse_run("rl.yaml", ["model=base"])
    check_train_inputs(run, cfg, tok)
    assert cfg.eval_every and run.eval_dataset


def test_the_reward_file_scores_the_held_out_answers_right(walk):
    reward = get_reward(parse_run("rl.yaml", ["model=base"])[0].reward)
    rows = [json.loads(x) for x in open("test.jsonl")]
    prompts = [r["prompt"] for r in rows]
    assert reward(prompts, [r["answer"] for r in rows]) == [1.0] * len(rows)
    assert reward(prompts, [r["answer"] + "a" for r in rows]) == [0.0] * len(rows)


@pytest.mark.parametrize("run_file", ["sft.yaml", "rl.yaml"])
def test_the_commands_shown_are_the_ones_train_prints(walk, run_file):
    section, _ = walk
    run, cfg = parse_run(run_file, [] if run_file == "sft.yaml" else ["model=base"])
    rows = [json.loads(x) for x in open(run.dataset)]
    want = finished_lines(cfg.output_dir, cfg, run.dataset, rows[0]["prompt"], run.reward_spec,
                          run.tokenizer, run.eval_dataset)
    assert _printed(section, run_file) == [x for x in want if not x.startswith("curves:")]
    if run_file == "rl.yaml":  # step 5 runs the eval command as printed
        printed_eval = want[-1].removeprefix("eval:").strip()
        assert f"```bash\n{printed_eval}\n" in section
