"""The embedded demo (SPEC 7): nothing downloaded. A tiny SDAR-architecture model and a character
tokenizer built in code learn addition (a 2-digit plus a 1-digit number) from a sloppy teacher
who forgets the carry on half the problems that need one. SFT imitates the teacher, mistakes
included, and more SFT on the same data only imitates it better; TraceRL (or DiPO) with a reward
that checks the sum learns to carry. Held-out accuracy is printed after each phase, with a plot of
reward / accuracy per RL step; ``compare=True`` also continues SFT from the same checkpoint for
the wall time RL took (the equal-time control). ``compare_task`` writes the task as a run file
for `dlmkern compare --demo` (every algorithm from the demo's SFT checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass

import torch

from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.run_layout import final_model
from dlmkern.sampling import BlockSampler, SamplingConfig
from dlmkern.trainers import (
    SFT,
    DiPO,
    DiPOConfig,
    SFTConfig,
    TraceRL,
    TraceRLConfig,
    build_config,
)

ALPHABET = "0123456789+="  # the character tokenizer's
SFT_TASK = "demo_task.json"  # beside the SFT run: the seed and sizes it was trained for
DIGITS = 2     # of the first number
B_DIGITS = 1   # of the second
NEW_TOKENS = DIGITS + 2  # the sum, zero-padded to DIGITS + 1 digits, then EOS


@dataclass
class DemoSize:
    """The demo's sizes: model, data, SFT and RL hyper-parameters (fit for ~4 min on 2 cores)."""

    hidden: int = 64
    layers: int = 2
    n_train: int = 700
    n_test: int = 300
    drop_carry: float = 0.5      # share of carry problems whose SFT answer forgets the carry
    sft_steps: int = 800
    sft_batch: int = 128
    sft_lr: float = 3e-3
    rl_steps: int = 80
    prompts_per_step: int = 16
    group_size: int = 8
    rl_lr: float = 3e-4


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def addition_task(n_train: int, n_test: int, seed: int, drop_carry: float):
    """Disjoint train / held-out splits of "a+b=" problems (zero-padded operands and sum). Every
    row has the true sum ("answer", what the reward checks) and the teacher's answer ("teacher",
    what SFT imitates): on a share `drop_carry` of the training problems with a carry from the
    units, the teacher forgot it (17+25=032)."""
    rng = random.Random(seed)
    pairs = set()
    while len(pairs) < n_train + n_test:
        pairs.add((rng.randrange(10 ** DIGITS), rng.randrange(10 ** B_DIGITS)))
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    rows = []
    for i, (a, b) in enumerate(pairs):
        forgot = i < n_train and has_carry(a, b) and rng.random() < drop_carry
        rows.append({"prompt": f"{a:0{DIGITS}d}+{b:0{B_DIGITS}d}=", "answer": _pad(a + b),
                     "teacher": _pad(a + b - 10 * forgot), "carry": has_carry(a, b)})
    return rows[:n_train], rows[n_train:]


def _pad(n: int) -> str:
    return f"{n:0{DIGITS + 1}d}"


def exact_match(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


@torch.no_grad()
def accuracy(model, tok, rows, split: bool = False):
    """Held-out exact-match accuracy, greedy decoding; split: also on the problems without and
    with a carry."""
    sampler = BlockSampler(model.eval(), SamplingConfig(rule="static", steps=2, temperature=0),
                           max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id)
    trajs = sampler.generate([tok.encode(r["prompt"]) for r in rows])
    ok = exact_match(None, [t.text(tok) for t in trajs], [r["answer"] for r in rows])
    if not split:
        return sum(ok) / len(rows)
    parts = [[o for o, r in zip(ok, rows, strict=True) if r["carry"] == c] for c in (False, True)]
    return sum(ok) / len(rows), *(sum(p) / max(len(p), 1) for p in parts)


def _report(what: str, acc) -> str:
    return (f"[demo] held-out accuracy {what}: {100 * acc[0]:.1f} % ({100 * acc[1]:.0f} % of the "
            f"problems without a carry, {100 * acc[2]:.0f} % of those with one)")


def build_model(tok, size: DemoSize) -> DiffusionLM:
    cfg = tiny_config("sdar", vocab_size=tok.vocab_size, hidden_size=size.hidden,
                      intermediate_size=3 * size.hidden, num_layers=size.layers, num_heads=4,
                      num_kv_heads=2, head_dim=size.hidden // 4, block_size=4,
                      mask_token_id=tok.mask_token_id, max_position_embeddings=32)
    return DiffusionLM(cfg)


def sft_config(size: DemoSize, seed: int, out_dir: str, progress_bar: bool, steps: int):
    return SFTConfig(batch_size=size.sft_batch, lr=size.sft_lr, total_steps=steps, seed=seed,
                     output_dir=out_dir, existing_output_dir="overwrite",  # a demo re-runs afresh
                     progress_bar=progress_bar, log_every=max(1, steps // 20))


def rl_keys(size: DemoSize) -> dict:
    """The demo's RL settings over any preset (run_rl's, and the trainer: section of the run file
    `dlmkern compare --demo` writes). pass_rate_low / high 0 / 1: every group trains (one or
    seven right of eight carry signal too); TraceRL's preset filters [0.2, 0.8], the others'
    are already 0 / 1."""
    return {"prompts_per_step": size.prompts_per_step, "group_size": size.group_size,
            "max_new_tokens": NEW_TOKENS, "sampling": {"steps": 2, "temperature": 1.0},
            "lr": size.rl_lr, "total_steps": size.rl_steps,
            "eval_every": max(1, size.rl_steps // 5), "pass_rate_low": 0.0,
            "pass_rate_high": 1.0}


def train_sft(tok, train, size: DemoSize, seed: int, sft_dir: str, progress_bar: bool):
    """The SFT phase: a fresh model imitates the teacher; sft_dir/demo_task.json records the
    seed and sizes, so `dlmkern compare --demo` reuses the checkpoint only for the same task."""
    torch.manual_seed(seed)
    model = build_model(tok, size)
    SFT(model, tok, train, sft_config(size, seed, sft_dir, progress_bar, size.sft_steps),
        answer_key="teacher").train()
    with open(os.path.join(sft_dir, SFT_TASK), "w") as f:
        json.dump({"seed": seed, "size": dataclasses.asdict(size)}, f)
    return model


def compare_task(out_dir: str = "runs/demo", seed: int = 0, progress_bar: bool = True,
                 size: DemoSize | None = None) -> str:
    """The demo's task as a run file for `dlmkern compare --demo`: the training and held-out
    rows written to out_dir/task/, the demo's SFT model (out_dir/sft, trained here unless a
    demo of this seed and these sizes left it) as every algorithm's start, and the demo's RL
    settings (rl_keys) as the trainer: section. Returns the run file's path."""
    import yaml

    torch.set_num_threads(1)  # as the demo (run_demo)
    size, tok = size or DemoSize(), CharTokenizer(ALPHABET)
    train, test = addition_task(size.n_train, size.n_test, seed, size.drop_carry)
    task = os.path.abspath(os.path.join(out_dir, "task"))
    os.makedirs(task, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(task, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    sft_dir = os.path.abspath(os.path.join(out_dir, "sft"))
    if not _sft_done(sft_dir, seed, size):
        print(f"[demo] SFT for {size.sft_steps} steps on the teacher's answers: the start every "
              f"algorithm is compared from ({sft_dir})", flush=True)
        t0 = time.perf_counter()
        train_sft(tok, train, size, seed, sft_dir, progress_bar)
        print(f"[demo] SFT took {time.perf_counter() - t0:.0f} s", flush=True)
    run_file = os.path.join(os.path.abspath(out_dir), "compare.yaml")
    with open(run_file, "w") as f:
        yaml.safe_dump({"algo": "tracerl", "model": final_model(sft_dir),
                        "dataset": os.path.join(task, "train.jsonl"),
                        "eval_dataset": os.path.join(task, "test.jsonl"), "reward": "exact",
                        "trainer": {**rl_keys(size), "existing_output_dir": "overwrite"}},
                       f, sort_keys=False)
    return run_file


def _sft_done(sft_dir: str, seed: int, size: DemoSize) -> bool:
    """Whether sft_dir holds the final model of train_sft for this seed and these sizes."""
    marker = os.path.join(sft_dir, SFT_TASK)
    if not (os.path.isfile(marker) and os.path.isdir(final_model(sft_dir))):
        return False
    with open(marker) as f:
        return json.load(f) == {"seed": seed, "size": dataclasses.asdict(size)}


def timed_accuracy(tok, test):
    """(held_out(model) -> accuracy on `test`, [seconds spent in it so far]): a run's held-out
    curve, its time kept apart so the run's own wall time can leave it out."""
    spent = [0.0]

    def held_out(m):
        t = time.perf_counter()
        acc = accuracy(m, tok, test)
        spent[0] += time.perf_counter() - t
        return acc

    return held_out, spent


def run_rl(model, tok, train, test, algo: str, size: DemoSize, seed: int, out_dir: str,
           progress_bar: bool, acc_sft: float) -> float:
    """RL from the SFT model (in place); returns its wall time without the held-out evaluations
    that draw the curve."""
    preset, trainer_cls = (DiPOConfig, DiPO) if algo == "dipo" else (TraceRLConfig, TraceRL)
    rl_cfg = build_config(preset, {**rl_keys(size), "seed": seed, "output_dir": out_dir,
                                   "progress_bar": progress_bar,
                                   "existing_output_dir": "overwrite"})
    trainer = trainer_cls(model, tok, train, exact_match, rl_cfg)
    held_out, eval_time = timed_accuracy(tok, test)
    trainer.eval_fn = held_out  # the held-out curve in the plot
    trainer.plot_marks = {"eval_accuracy": (acc_sft, "after SFT (the RL start)")}
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0 - eval_time[0]


def continued_sft(tok, train, size: DemoSize, seed: int, sft_dir: str, out_dir: str,
                  seconds: float | None = None, steps: int | None = None
                  ) -> tuple[DiffusionLM, int]:
    """The control: SFT resumed from its final checkpoint (weights, optimizer, data order) on
    the same data, for `seconds` of wall time (the demo's equal-time control) or `steps` more
    steps (tests/test_demo.py's equal-steps control, independent of the machine's load)."""
    if (seconds is None) == (steps is None):
        raise ValueError("continued_sft: give seconds or steps")
    model = build_model(tok, size)
    trainer = SFT(model, tok, train, sft_config(size, seed, out_dir, False, 10 ** 9),
                  answer_key="teacher", resume_from=os.path.join(sft_dir, "final"))
    start, t0 = trainer.step, time.perf_counter()
    while (time.perf_counter() - t0 < seconds) if steps is None else \
            (trainer.step - start < steps):
        trainer.logger.log(trainer.train_step())
    trainer.logger.close()
    return model, trainer.step - start


def run_demo(algo: str = "tracerl", seed: int = 0, sft_steps: int | None = None,
             rl_steps: int | None = None, out_dir: str = "runs/demo", progress_bar: bool = True,
             compare: bool = False, size: DemoSize | None = None) -> dict:
    """SFT on the teacher's answers, then RL with the exact-match reward; `compare`: also the
    equal-time SFT control. Returns the held-out accuracies and timings."""
    t0 = time.time()
    size = size or DemoSize()
    size.sft_steps = size.sft_steps if sft_steps is None else sft_steps
    size.rl_steps = size.rl_steps if rl_steps is None else rl_steps
    # one thread: on this tiny model a second one gains little, and on cores shared with other
    # work two threads ran an SFT step 6x slower than one (measured on 2 cores)
    torch.set_num_threads(1)
    tok = CharTokenizer(ALPHABET)
    train, test = addition_task(size.n_train, size.n_test, seed, size.drop_carry)
    wrong = sum(r["teacher"] != r["answer"] for r in train)
    print(f"[demo] {len(train)} training problems a+b (a: 2 digits, b: 1) answered by a teacher "
          f"who forgets the carry half the time ({wrong} wrong answers); SFT imitates the teacher "
          f"for {size.sft_steps} steps, then {algo} learns from a reward that checks the sum")
    sft_dir = os.path.join(out_dir, "sft")
    model = train_sft(tok, train, size, seed, sft_dir, progress_bar)
    acc_sft = accuracy(model, tok, test, split=True)
    print(_report(f"after SFT ({len(test)} problems)", acc_sft))
    run = os.path.join(out_dir, algo)
    rl_time = run_rl(model, tok, train, test, algo, size, seed, run, progress_bar, acc_sft[0])
    acc_rl = accuracy(model, tok, test, split=True)
    print(_report(f"after {algo}", acc_rl) + f"; {100 * (acc_rl[0] - acc_sft[0]):+.1f} points, "
          f"RL took {rl_time:.0f} s")
    out = {"acc_sft": acc_sft[0], "acc_rl": acc_rl[0], "rl_seconds": rl_time}
    if compare:
        out["acc_sft_more"] = _control(tok, train, test, size, seed, out_dir, rl_time)
        print(f"[demo] held-out accuracy: after SFT {100 * acc_sft[0]:.1f} %, then {algo} "
              f"{100 * acc_rl[0]:.1f} %, or SFT continued as long "
              f"{100 * out['acc_sft_more']:.1f} %")
    out["seconds"] = time.time() - t0
    model_dir = final_model(run)  # the trainer's export, with the tokenizer: train's layout
    print(f"[demo] done in {out['seconds']:.0f} s. Files: {run}/log.jsonl (one row per step), "
          f"{run}/curves.png (reward, pass rate, held-out accuracy), {model_dir} (the trained "
          "model + tokenizer)")
    print(f"[demo] sample from it: dlmkern sample --model {model_dir} --prompt "
          f"\"{test[0]['prompt']}\" --max-new-tokens {NEW_TOKENS}")
    return out


def _control(tok, train, test, size: DemoSize, seed: int, out_dir: str, seconds: float) -> float:
    """Held-out accuracy of the equal-time control (SFT continued instead of RL)."""
    model, steps = continued_sft(tok, train, size, seed, os.path.join(out_dir, "sft"),
                                 os.path.join(out_dir, "sft_more"), seconds)
    acc = accuracy(model, tok, test, split=True)
    print(_report(f"after SFT continued for the same {seconds:.0f} s ({steps} more steps)", acc))
    return acc[0]
