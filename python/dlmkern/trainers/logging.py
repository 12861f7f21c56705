"""Run logging: JSONL always; TensorBoard and Weights & Biases when installed; tqdm bars; a PNG
plot of reward / accuracy curves at the end of a run."""

from __future__ import annotations

import json
import math
import os
import sys


def progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, dynamic_ncols=True)


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

    def plot(self, keys=("reward_mean", "accuracy"), path: str | None = None) -> str | None:
        """PNG of the given keys per step (None if matplotlib is missing)."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        path = path or os.path.join(self.out_dir, "curves.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            pts = [(r["step"], r[k]) for r in self.rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=k)
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
