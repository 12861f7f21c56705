"""`dlmkern compare`: one task (a run file) trained by several algorithms (presets of
dlmkern.trainers.rl_config) with equal rollout budgets, side by side: a table (held-out
accuracy, training reward, wall time, completions and tokens generated, tokens trained) and a
plot of held-out accuracy against wall time, one line per algorithm, the start marked.

Equal budget means every run draws the same prompts per step, completions per prompt
(group_size) and steps, with the same completion length and sampling settings (BUDGET_KEYS,
refused when the presets disagree and the run file does not set them); the run file's other
keys apply to every algorithm, and what is left differs: each preset's own keys. It does not
equalize the completions actually generated (DiPO's dynamic sampling draws more groups until
prompts_per_step groups with a reward spread are kept), the tokens trained (estimators build
different rows) or the wall time: those are measured and reported. The start (the run file's
model) is evaluated once, before any RL, with the held-out settings every run uses."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlmkern.trainers.presets import PRESETS
from dlmkern.trainers.rl_config import RLConfig

if TYPE_CHECKING:
    from dlmkern.runfile import RunFile

# keys that set the rollout budget: the same value for every algorithm of a comparison
BUDGET_KEYS = ("prompts_per_step", "group_size", "total_steps", "max_new_tokens",
               "gen_block_length", "sampling")
# what compare sets in every run (not an algorithm's own keys)
SET_BY_COMPARE = ("seed", "output_dir", "log_every", "eval_every", "progress_bar",
                  "existing_output_dir")
REWARD_WINDOW = 0.1  # the table's reward: the mean over this last share of the steps
LEARNED_SE = 2.0  # "learned": held-out accuracy above the start's by this many standard errors


def default_algos() -> list[str]:
    """compare's algorithms when none are named: every preset whose sampling is the run's (a
    preset whose decoding is the algorithm, JustGRPO's, cannot share the others' budget)."""
    return [a for a, c in PRESETS.items() if not c.own_sampling]


def parse_algos(text: str) -> list[str]:
    """`--algos a,b,c` as preset names, each checked at once (a mistyped one named with the
    closest preset and the list of them)."""
    from dlmkern.trainers.config import did_you_mean

    algos = [a.strip() for a in text.split(",") if a.strip()]
    if not algos:
        raise ValueError(f"--algos: name at least one algorithm ({', '.join(PRESETS)})")
    for a in algos:
        if a in ("sft", "vrpo"):
            raise ValueError(f"--algos: {a} is not an RL algorithm; the run file's model is the "
                             "start every algorithm is compared from")
        if a not in PRESETS:
            raise ValueError(f"--algos: unknown algorithm {a!r}{did_you_mean(a, PRESETS)}; "
                             f"the presets: {', '.join(PRESETS)}")
    dup = next((a for a in algos if algos.count(a) > 1), None)
    if dup:
        raise ValueError(f"--algos: {dup!r} is named twice")
    return algos


@dataclass
class Plan:
    """What a comparison runs: the run file, each algorithm's config (its preset with the run
    file's keys; seed and output_dir set per run), the seeds and where the results go."""

    run: RunFile
    configs: dict[str, RLConfig]
    own_keys: dict[str, dict]  # algo -> the keys its preset sets away from RLConfig's
    seeds: list[int]
    out_dir: str

    def run_config(self, algo: str, seed: int) -> RLConfig:
        return dataclasses.replace(self.configs[algo], seed=seed,
                                   output_dir=os.path.join(self.out_dir, algo, f"seed{seed}"))

    @property
    def budget(self) -> dict:
        cfg = next(iter(self.configs.values()))
        out = {k: getattr(cfg, k) for k in BUDGET_KEYS}
        out["sampling"] = dataclasses.asdict(cfg.sampling)
        out["completions_per_run"] = cfg.total_steps * cfg.prompts_per_step * cfg.group_size
        return out


def plan(run_file: str, overrides: list[str], algos: list[str], seeds: int, out_dir: str,
         progress_bar: bool = True) -> Plan:
    """Every algorithm's config from the run file, checked before any work: the run file's
    paths and keys (under each preset), held-out rows to score, equal budgets, and every run's
    output directory."""
    from dlmkern.runfile import parse_run, read_run
    from dlmkern.trainers.checks import check_output_dir

    if seeds < 1:
        raise ValueError("--seeds must be >= 1")
    configs, own = {}, {}
    run = None
    for a in algos:
        try:
            run, cfg = parse_run(run_file, [*overrides, f"algo={a}"])
            given = read_run(run_file, [*overrides, f"algo={a}"])[2]
        except ValueError as e:
            raise ValueError(f"{a}: {e}") from None
        configs[a], own[a] = cfg, _own_keys(cfg, given)
    if run.eval_dataset is None:
        raise ValueError(f"{run_file}: compare scores held-out rows: set eval_dataset (same "
                         "formats and columns as dataset)")
    _check_equal_budgets(configs)
    first = next(iter(configs.values()))
    if first.existing_output_dir == "resume":
        raise ValueError("compare measures each run's wall time from its start: "
                         "existing_output_dir: resume would time part of a run; use overwrite "
                         "or another --out")
    every = first.eval_every or max(1, first.total_steps // 5)
    for a, cfg in configs.items():
        configs[a] = dataclasses.replace(cfg, log_every=1, eval_every=every,
                                         progress_bar=progress_bar).validate()
    out = Plan(run, configs, own, [first.seed + k for k in range(seeds)], out_dir)
    for a in algos:
        for s in out.seeds:
            cfg = out.run_config(a, s)
            check_output_dir(cfg.output_dir, cfg.existing_output_dir)
    return out


def _own_keys(cfg: RLConfig, given: set) -> dict:
    """The keys this preset sets away from RLConfig's defaults that the run file left alone,
    and its estimator: what makes it this algorithm in the comparison."""
    neutral = RLConfig()
    out = {"estimator": cfg.estimator}
    for f in dataclasses.fields(cfg):
        if f.name in given or f.name in SET_BY_COMPARE or f.name in BUDGET_KEYS:
            continue
        v = getattr(cfg, f.name)
        if v != getattr(neutral, f.name):  # a nested section (lora) as its keys: JSON
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def _check_equal_budgets(configs: dict[str, RLConfig]) -> None:
    for key in (*BUDGET_KEYS, "eval_every"):
        values = {a: getattr(c, key) for a, c in configs.items()}
        if len({repr(v) for v in values.values()}) > 1:
            shown = ", ".join(f"{a}: {v}" for a, v in values.items())
            raise ValueError(f"compare: {key} differs between the presets ({shown}); the "
                             f"budget is equal only when it is one value: set {key} in the run "
                             "file's trainer: section (or as key=value)")


@dataclass
class Start:
    """The run file's model, evaluated once before any RL: every run starts from it."""

    model: str
    accuracy: float
    rows: int
    seconds: float

    @property
    def stderr(self) -> float:
        """The binomial standard error of its accuracy over the held-out rows (an accuracy of 0
        or 1 read as one row away from it: not a bar of 0)."""
        n = max(self.rows, 1)
        p = min(max(self.accuracy, 1 / n), 1 - 1 / n) if n > 1 else 0.5
        return math.sqrt(p * (1 - p) / n)


@dataclass
class RunResult:
    """One algorithm on one seed: what the table and the plot read."""

    algo: str
    seed: int
    accuracy: float  # held-out, at the last step
    curve: list  # [(RL seconds without the evaluations, step, held-out accuracy)]
    rl_seconds: float  # wall time of the run's steps, held-out evaluations left out
    eval_seconds: float
    reward: float  # the mean training reward over the last REWARD_WINDOW of the steps
    completions: int  # generated (dynamic sampling: every round's)
    tokens_generated: int
    tokens_trained: int
    row_tokens: int  # the packed tokens the update's forwards processed (estimators differ)
    steps: int


class _Clocked:
    """A trainer's held-out eval_fn, timed: when each point was taken in RL wall time, the
    evaluations' own time left out."""

    def __init__(self, eval_fn):
        self.eval_fn, self.t0, self.eval_seconds, self.at = eval_fn, None, 0.0, []

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_seconds

    def __call__(self, model) -> float:
        self.at.append(self.elapsed())
        t = time.perf_counter()
        acc = self.eval_fn(model)
        self.eval_seconds += time.perf_counter() - t
        return acc


def evaluate_start(p: Plan, tok, eval_rows: list[dict], reward) -> Start:
    """The held-out accuracy of the run file's model, scored as every run scores its own
    (dlmkern.evaluate.HeldOut with the shared sampling and lengths)."""
    from dlmkern.data import PromptFormat
    from dlmkern.evaluate import HeldOut
    from dlmkern.models.io import load_for_run, run_target

    cfg = next(iter(p.configs.values()))
    held_out = HeldOut.for_rl(eval_rows, tok, reward, cfg, PromptFormat.from_config(cfg))
    model = load_for_run(p.run.model, run_target(p.run.model, None, p.run.dtype))
    t = time.perf_counter()
    acc = float(held_out(model))
    return Start(p.run.model, acc, len(eval_rows), time.perf_counter() - t)


def run_one(p: Plan, algo: str, seed: int, tok, data, reward, eval_rows) -> RunResult:
    """One RL run from the start model; its log gives the counts, the clock the times."""
    from dlmkern.trainers import RLTrainer

    cfg = p.run_config(algo, seed)
    trainer = RLTrainer(p.run.model, tok, data, reward, cfg, dtype=p.run.dtype,
                        eval_dataset=eval_rows)
    clock = _Clocked(trainer.eval_fn)
    trainer.eval_fn = clock
    clock.start()
    trainer.train()
    rl_seconds = clock.elapsed()
    rows = [r for r in trainer.logger.rows if isinstance(r.get("step"), int)]
    evals = [r for r in rows if "eval_accuracy" in r]
    curve = [(t, r["step"] + 1, r["eval_accuracy"])
             for t, r in zip(clock.at, evals, strict=True)]
    window = max(1, round(len(rows) * REWARD_WINDOW))
    rewards = [r["reward_mean"] for r in rows[-window:] if "reward_mean" in r]
    return RunResult(algo, seed, evals[-1]["eval_accuracy"], curve, rl_seconds,
                     clock.eval_seconds, statistics.fmean(rewards) if rewards else float("nan"),
                     sum(r.get("sampled_groups", 0) for r in rows) * cfg.group_size,
                     sum(r.get("sampled_tokens", 0) for r in rows),
                     sum(r.get("train_tokens", 0) for r in rows),
                     sum(r.get("row_tokens", 0) for r in rows), len(rows))


def compare(run_file: str, overrides: list[str], algos: list[str], seeds: int = 1,
            out_dir: str = "runs/compare", progress_bar: bool = True) -> dict:
    """Runs every algorithm on every seed from the run file's model and writes table.md,
    table.json and compare.png in out_dir. Returns what table.json holds."""
    from dlmkern.data import load_dataset
    from dlmkern.data.checks import check_vocabulary
    from dlmkern.models.io import load_config
    from dlmkern.run_layout import find_model
    from dlmkern.runfile import check_train_inputs

    t0, load0 = time.time(), _load()
    p = plan(run_file, overrides, algos, seeds, out_dir, progress_bar)
    run = p.run
    if run.tokenizer is None:
        run.model = find_model(run.model, "model")
    tok = _tokenizer(run.tokenizer or run.model)
    first = next(iter(p.configs.values()))
    data, reward = check_train_inputs(run, first, tok)
    run.model = find_model(run.model, "model")
    check_vocabulary(tok, load_config(run.model))
    eval_rows = load_dataset(run.eval_dataset, first.columns)
    start = evaluate_start(p, tok, eval_rows, reward)
    print(f"[compare] the start ({run.model}): held-out accuracy {100 * start.accuracy:.1f} % "
          f"on {start.rows} rows; {len(algos)} algorithms x {len(p.seeds)} seeds, "
          f"{p.budget['completions_per_run']} completions each (dynamic sampling: more)",
          flush=True)
    results = []
    for a in algos:
        for s in p.seeds:
            r = run_one(p, a, s, tok, data, reward, eval_rows)
            results.append(r)
            print(f"[compare] {a} seed {s}: held-out {100 * r.accuracy:.1f} % "
                  f"({100 * (r.accuracy - start.accuracy):+.1f} points) in {r.rl_seconds:.0f} s",
                  flush=True)
    table = _table(p, start, results)
    table["machine"] = {"load_avg_1min_start": load0, "load_avg_1min_end": _load(),
                        "torch_threads": _threads(), "seconds_total": time.time() - t0}
    write(table, out_dir)
    return table


def _tokenizer(spec: str):
    from dlmkern.cli import make_tokenizer  # the one reading of a run file's tokenizer key

    return make_tokenizer(spec)


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _table(p: Plan, start: Start, results: list[RunResult]) -> dict:
    """The summary per algorithm (means over seeds, each seed kept) and the raw runs."""
    bar = LEARNED_SE * start.stderr
    algos = {}
    for a in p.configs:
        rs = [r for r in results if r.algo == a]
        learned = sum(r.accuracy - start.accuracy > bar for r in rs)

        def mean(key, rs=rs):
            return statistics.fmean(getattr(r, key) for r in rs)

        algos[a] = {"accuracy": mean("accuracy"), "per_seed": [r.accuracy for r in rs],
                    "delta": mean("accuracy") - start.accuracy,
                    "learned_seeds": learned, "seeds": len(rs), "reward": mean("reward"),
                    "rl_seconds": mean("rl_seconds"),
                    "rl_seconds_per_seed": [r.rl_seconds for r in rs],
                    "completions": mean("completions"),
                    "tokens_generated": mean("tokens_generated"),
                    "tokens_trained": mean("tokens_trained"), "own_keys": p.own_keys[a]}
    return {"start": dataclasses.asdict(start), "budget": p.budget,
            "learned_bar_points": 100 * bar, "algorithms": algos,
            "runs": [dataclasses.asdict(r) for r in results]}


COLUMNS = ("algorithm", "held-out accuracy", "per seed", "vs start", "learned",
           "reward", "RL wall time", "completions", "tokens generated",
           "tokens trained")


def markdown(table: dict) -> str:
    """table.md: the budget, one row per algorithm (means over seeds), what each algorithm sets,
    and what equal budget does and does not equalize."""
    s, b = table["start"], table["budget"]
    lines = [f"Start: {s['model']}, held-out accuracy {100 * s['accuracy']:.1f} % "
             f"({s['rows']} rows, evaluated once). Budget per run: {b['total_steps']} steps x "
             f"{b['prompts_per_step']} prompts x {b['group_size']} completions = "
             f"{b['completions_per_run']} completions of at most {b['max_new_tokens']} tokens "
             f"(sampling: {_sampling(b['sampling'])}).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for a, r in table["algorithms"].items():
        per_seed = " / ".join(f"{100 * x:.1f}" for x in r["per_seed"])
        times = " / ".join(f"{x:.0f}" for x in r["rl_seconds_per_seed"])
        learned = "yes" if r["learned_seeds"] == r["seeds"] else \
            "no" if r["learned_seeds"] == 0 else "partly"
        lines.append(f"| {a} | {100 * r['accuracy']:.1f} % | {per_seed} | "
                     f"{100 * r['delta']:+.1f} points | {learned} ({r['learned_seeds']}/"
                     f"{r['seeds']}) | {r['reward']:.3f} | {r['rl_seconds']:.0f} s ({times}) | "
                     f"{r['completions']:.0f} | {r['tokens_generated']:.0f} | "
                     f"{r['tokens_trained']:.0f} |")
    lines += ["", "Each algorithm's own keys (its preset's, away from RLConfig's defaults; the "
              "run file's keys apply to all):"]
    lines += [f"- {a}: " + ", ".join(f"{k}={v}" for k, v in r["own_keys"].items())
              for a, r in table["algorithms"].items()]
    lines += ["", f"learned: the seeds whose held-out accuracy ended above the start's by "
              f"more than {LEARNED_SE:g} standard errors of it "
              f"({table['learned_bar_points']:.1f} points); yes: every seed, no: none. Equal "
              "budget: the same steps, prompts per step, completions per prompt, completion "
              "length and sampling. Not equalized, so reported: completions generated (dynamic "
              "sampling draws more groups per step), tokens generated and trained (estimators "
              "train different tokens and rows) and the wall time (the held-out evaluations "
              "left out). reward: the mean training reward over the last "
              f"{100 * REWARD_WINDOW:g} % of the steps."]
    m = table.get("machine")
    if m:
        lines.append(f"Machine: torch threads {m['torch_threads']}, 1-minute load average "
                     f"{_fmt(m['load_avg_1min_start'])} at the start, "
                     f"{_fmt(m['load_avg_1min_end'])} at the end; {m['seconds_total']:.0f} s "
                     "in all.")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.1f}"


def _sampling(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items()
                     if k in ("rule", "steps", "temperature", "threshold"))


def write(table: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    text = markdown(table)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    png = plot(table, os.path.join(out_dir, "compare.png"))
    print(text + f"[compare] files: {out_dir}/table.md, table.json"
          + (", compare.png" if png else " (no plot: matplotlib is missing)"), flush=True)


def plot(table: dict, path: str) -> str | None:
    """Held-out accuracy against RL wall time: one line per algorithm (the seeds' mean at each
    evaluation; each seed faint), all starting at the start's accuracy, which is marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    start = table["start"]["accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, a in enumerate(table["algorithms"]):
        color = f"C{i}"
        curves = [[(0.0, start)] + [(t, acc) for t, _, acc in r["curve"]]
                  for r in table["runs"] if r["algo"] == a]
        for c in curves if len(curves) > 1 else []:
            ax.plot(*zip(*c, strict=True), color=color, alpha=0.25, linewidth=0.8)
        n = min(len(c) for c in curves)
        mean = [(statistics.fmean(c[k][0] for c in curves),
                 statistics.fmean(c[k][1] for c in curves)) for k in range(n)]
        ax.plot(*zip(*mean, strict=True), color=color, marker=".", label=a)
    ax.axhline(start, linestyle="--", color="gray", linewidth=0.8)
    ax.plot([0], [start], marker="*", markersize=12, color="black", linestyle="none",
            label=f"start (SFT): {100 * start:.1f} %")
    ax.set_xlabel("RL wall time, s (held-out evaluations left out)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    seeds = max(r["seeds"] for r in table["algorithms"].values())
    ax.set_title(f"held-out accuracy against wall time ({seeds} seed{'s' * (seeds > 1)}: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

