"""`dlmkern demo` end to end at a few steps: both algorithms run, print the two held-out
accuracies, and write the logs, the plot and the trained model. And the point of the demo: RL with
the exact-match reward raises held-out accuracy more than SFT continued from the same checkpoint
for as many steps, whose data (a teacher that forgets the carry half the time) hold the mistakes."""

import json

import pytest
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.demo import DemoSize, accuracy, addition_task, continued_sft, run_demo


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["tracerl", "dipo"])
def test_demo_runs_end_to_end(tmp_path, capsys, algo):
    out = tmp_path / "demo"
    rc = main(["demo", "--algo", algo, "--sft-steps", "3", "--rl-steps", "2", "--out", str(out),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy after SFT" in printed and f"held-out accuracy after {algo}" in printed
    rows = [json.loads(x) for x in (out / algo / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)  # held-out curve, every step here
    assert (out / algo / "curves.png").stat().st_size > 0
    assert (out / algo / "final" / "model" / "config.json").exists()
    assert (out / "sft" / "final" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_demo_compare_runs_the_equal_time_control(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--sft-steps", "3", "--rl-steps", "2", "--out", str(out), "--quiet",
               "--compare"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "after SFT continued for the same" in printed and "or SFT continued as long" in printed
    assert (out / "sft_more" / "log.jsonl").stat().st_size > 0


def test_teacher_forgets_the_carry_only_on_training_problems_with_one():
    train, test = addition_task(700, 300, seed=0, drop_carry=0.5)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    wrong = [r for r in train if r["teacher"] != r["answer"]]
    assert all(r["carry"] and int(r["teacher"]) == int(r["answer"]) - 10 for r in wrong)
    carries = sum(r["carry"] for r in train)
    assert 0.4 < len(wrong) / carries < 0.6
    assert all(r["teacher"] == r["answer"] for r in test)  # held out: scored on the true sum


# RL against SFT continued for as many steps, at the demo's own SFT (2 layers, 800 steps of 128
# rows) and half its RL (40 steps of 16 prompts x 8 samples: 128 sequences a step, as an SFT
# step's 128 rows), on 200 held-out problems. Seeds 0 and 1 were fixed first; four smaller sizes
# tried on them (1 layer with 400 or 800 SFT steps, 500 SFT steps at lr 5e-3, SFT batch 64) each
# left one seed's SFT unconverged (4-56 % held out), where RL beat the control by only 0.5-2
# points. Measured at this size, 2026-12-04 (held-out accuracy after SFT / RL / SFT continued
# 40 steps; RL minus the control):
# seed 0: 70.5 / 86.5 / 76.0 %, +10.5 points (the same on a rerun: the run is deterministic);
# seed 1: 72.0 / 99.0 / 78.5 %, +20.5; seeds 2 and 3, not tested: +20.5 and +19.5. The margin:
# the least of them halved, about two standard errors of one 200-problem accuracy (~3 points).
# ~100 s per seed on 2 idle cores, ~200 s when other work shares them.
RL_OVER_MORE_SFT = 0.05
SIZE = dict(rl_steps=40, n_test=200)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_rl_beats_sft_continued_for_as_many_steps(tmp_path, seed):
    size = DemoSize(**SIZE)
    out = run_demo(seed=seed, out_dir=str(tmp_path / "demo"), progress_bar=False, size=size)
    tok = CharTokenizer("0123456789+=")
    train, test = addition_task(size.n_train, size.n_test, seed, size.drop_carry)
    model, steps = continued_sft(tok, train, size, seed, str(tmp_path / "demo" / "sft"),
                                 str(tmp_path / "sft_more"), steps=size.rl_steps)
    assert steps == size.rl_steps
    more_sft = accuracy(model, tok, test)
    print(f"seed {seed}: SFT {out['acc_sft']:.3f}, RL {out['acc_rl']:.3f}, "
          f"SFT continued {more_sft:.3f}")
    assert out["acc_rl"] - more_sft >= RL_OVER_MORE_SFT, (out, more_sft)
