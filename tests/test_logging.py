"""Output for people: progress lines when stderr is not a terminal, a plot with one panel per
curve and reference marks."""

import matplotlib.image
from dlmkern.trainers.logging import RunLogger, progress


def test_progress_prints_a_line_every_five_percent_off_a_terminal(capsys):
    bar = progress(range(200), True, "sft")  # pytest's stderr is not a TTY
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 20 and all(x.startswith("[sft] ") for x in lines)
    assert lines[0].startswith("[sft] 10/200 ") and lines[-1].startswith("[sft] 200/200 ")
    assert lines[-1].endswith("loss=0.01")
    assert list(progress(range(3), False, "x")) == [0, 1, 2]


def test_plot_has_a_panel_per_curve(tmp_path):
    log = RunLogger(str(tmp_path), {})
    for s in range(6):
        log.log({"step": s, "reward_mean": s / 10, "pass_rate": s / 20,
                 **({"eval_accuracy": 0.3 + s / 50} if s % 2 else {})})
    one = log.plot(("reward_mean",), path=str(tmp_path / "one.png"))
    three = log.plot(("reward_mean", "pass_rate", "eval_accuracy", "missing"),
                     path=str(tmp_path / "three.png"), title="t",
                     marks={"eval_accuracy": (0.3, "after SFT")})
    h1, h3 = (matplotlib.image.imread(p).shape[0] for p in (one, three))
    assert h3 > 2.5 * h1 * 0.8  # three stacked panels, not three lines on one
    assert log.plot(("missing",)) is None
