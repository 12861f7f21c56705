"""Run logging: JSONL always; TensorBoard and Weights & Biases when installed; tqdm bars; a PNG
plot of reward / pass-rate / held-out accuracy curves at the end of a run."""

from __future__ import annotations

import json
import math
import os
import sys


def progress(it, enabled: bool, desc: str):
    """tqdm bars on a terminal; elsewhere (a log file, CI) a plain line every ~5 % of the run,
    instead of thousands of carriage-return updates. A range of steps counts from its start: a
    resumed run's range(step, total_steps) shows step / total_steps."""
    if not enabled:
        return it
    if not sys.stderr.isatty():
        return _Lines(it, desc)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Lines(it, desc)
    if isinstance(it, range) and it.step == 1:
        return tqdm(it, desc=desc, dynamic_ncols=True, initial=it.start, total=it.stop)
    return tqdm(it, desc=desc, dynamic_ncols=True)


def show_step(bar, log: dict) -> None:
    """A training step's numbers on its progress bar: reward, loss and the latest held-out
    accuracy (logged every eval_every steps; shown until the next one)."""
    if not hasattr(bar, "set_postfix"):
        return
    if isinstance(log.get("eval_accuracy"), (int, float)):
        bar.held_out = format(log["eval_accuracy"], ".3f")
    shown = {name: format(log[key], fmt) for key, name, fmt in (("reward_mean", "reward", ".3f"),
                                                                ("loss", "loss", ".4g"))
             if isinstance(log.get(key), (int, float))}
    if getattr(bar, "held_out", None) is not None:
        shown["held_out"] = bar.held_out
    if shown:
        bar.set_postfix(**shown)


class _Lines:
    """Progress as a line every `every` fraction of the items, with elapsed time and the last
    postfix (same set_postfix surface as tqdm)."""

    def __init__(self, it, desc: str, every: float = 0.05):
        self.it, self.desc, self.postfix = it, desc, ""
        self.start = it.start if isinstance(it, range) and it.step == 1 else 0
        self.total = (self.start + len(it)) if hasattr(it, "__len__") else None
        self.every = max(1, round((self.total or 20) * every))

    def set_postfix(self, **kw):
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def __iter__(self):
        import time

        t0 = time.perf_counter()
        n = 0
        for n, x in enumerate(self.it, self.start + 1):  # noqa: B007 - read after the loop
            yield x
            if n % self.every == 0 or n == self.total:
                of = f"/{self.total}" if self.total else ""
                print(f"[{self.desc}] {n}{of} {time.perf_counter() - t0:.0f}s {self.postfix}"
                      .rstrip(), file=sys.stderr, flush=True)


LABELS = {"reward_mean": "mean reward", "pass_rate": "training pass rate",
          "eval_accuracy": "held-out accuracy", "loss": "loss"}


def _series(rows: list[dict], keys) -> dict:
    """{label: [(step, value)]} of the keys with values; a curve equal to an earlier one (the
    pass rate of a 0 / 1 reward is its mean) shares that one's panel and label."""
    out: dict = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows
               if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        same = next((key for key, v in out.items() if v[1] == pts), None)
        if same is not None:
            out[same] = (f"{out[same][0]} = {LABELS.get(k, k)}", pts)
        elif pts:
            out[k] = (LABELS.get(k, k), pts)
    return out


class RunLogger:
    def __init__(self, out_dir: str, config: dict, enabled: bool = True):
        self.enabled = enabled  # one writer per run: rank 0 of a distributed job
        self.out_dir = out_dir
        self.rows = []
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "log.jsonl")
        if os.path.isfile(self.path):  # a resumed run: its curves continue the earlier rows
            with open(self.path) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        if os.environ.get("DLMKERN_TENSORBOARD", "1") != "0":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb

                self.wandb = wandb.init(project=os.environ["WANDB_PROJECT"], config=config)
            except Exception:  # noqa: BLE001 - wandb is optional
                self.wandb = None

    def log(self, row: dict):
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row.get("step", len(self.rows))
        scalars = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def truncate(self, step: int):
        """Drops the rows of steps >= step (a run resumed from a checkpoint at `step` logs them
        again)."""
        keep = [r for r in self.rows if not (isinstance(r.get("step"), int) and r["step"] >= step)]
        if len(keep) == len(self.rows):
            return
        self.rows = keep
        if self.enabled:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)

    def warn(self, msg: str):
        if self.enabled:
            print(f"[dlmkern] {msg}", file=sys.stderr)

    def plot(self, keys=("reward_mean", "pass_rate"), path: str | None = None,
             title: str = "", marks: dict | None = None) -> str | None:
        """PNG with one panel per key that has values, against the step (None if matplotlib is
        missing). marks: {key: (value, label)} drawn as a dashed line in that key's panel, e.g.
        the held-out accuracy the run started from."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        series = _series(self.rows, keys)
        if not series:
            return None
        path = path or os.path.join(self.out_dir, "curves.png")
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.4 * len(series) + 0.6),
                                 sharex=True, squeeze=False)
        for ax, (k, (name, pts)) in zip(axes[:, 0], series.items(), strict=True):
            ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 40 else None, label=name)
            if marks and k in marks:
                value, label = marks[k]
                ax.axhline(value, linestyle="--", color="gray", label=label)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        axes[-1, 0].set_xlabel("training step")
        fig.suptitle(title or os.path.basename(os.path.normpath(self.out_dir)))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
