"""The embedded demo (SPEC 7): nothing downloaded. A tiny SDAR-architecture model and a character
tokenizer built in code learn multi-digit addition: SFT first, then TraceRL (or DiPO), with
held-out accuracy printed after each phase and a plot of reward / accuracy per RL step."""

from __future__ import annotations

import os
import random
import time

import torch

from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.sampling import BlockSampler, SamplingConfig
from dlmkern.trainers import SFT, DiPO, RLConfig, SFTConfig, TraceRL


def addition_task(digits: int, n_train: int, n_test: int, seed: int):
    """Disjoint train / held-out splits of "a+b=" -> "a+b" problems."""
    rng = random.Random(seed)
    hi = 10 ** digits
    pairs = set()
    while len(pairs) < n_train + n_test:
        pairs.add((rng.randrange(hi), rng.randrange(hi)))
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in sorted(pairs)]
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def exact_match(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


@torch.no_grad()
def accuracy(model, tok, rows, max_new_tokens: int) -> float:
    sampler = BlockSampler(model.eval(), SamplingConfig(rule="static", steps=2, temperature=0),
                           max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    trajs = sampler.generate([tok.encode(r["prompt"]) for r in rows])
    comps = [t.text(tok) for t in trajs]
    return sum(exact_match(None, comps, [r["answer"] for r in rows])) / len(rows)


def run_demo(algo: str = "tracerl", seed: int = 0, digits: int = 2, sft_steps: int = 1500,
             rl_steps: int = 150, out_dir: str = "runs/demo", progress_bar: bool = True) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = CharTokenizer("0123456789+=")
    train, test = addition_task(digits, n_train=2000, n_test=200, seed=seed)
    cfg = tiny_config("sdar", vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=384,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                      mask_token_id=tok.mask_token_id, max_position_embeddings=64)
    model = DiffusionLM(cfg)
    new_tokens = digits + 2  # digits + carry + EOS
    print(f"[demo] SFT {sft_steps} steps on {len(train)} problems of {digits}-digit addition")
    SFT(model, tok, train, SFTConfig(batch_size=64, lr=2e-3, total_steps=sft_steps, seed=seed,
                                     output_dir=os.path.join(out_dir, "sft"),
                                     existing_output_dir="overwrite",  # a demo re-runs afresh
                                     progress_bar=progress_bar, log_every=50)).train()
    acc_sft = accuracy(model, tok, test, new_tokens)
    print(f"[demo] held-out accuracy after SFT: {100 * acc_sft:.1f} %")
    rl_cfg = RLConfig(prompts_per_step=16, group_size=8, max_new_tokens=new_tokens,
                      steps_per_block=2, temperature=1.0, lr=5e-4, total_steps=rl_steps,
                      seed=seed, output_dir=os.path.join(out_dir, algo), progress_bar=progress_bar,
                      eps_high=0.28 if algo == "dipo" else 0.2,
                      dynamic_sampling=algo == "dipo", pass_rate_low=0.0, pass_rate_high=1.0,
                      eval_every=max(1, rl_steps // 6), existing_output_dir="overwrite")
    trainer = (DiPO if algo == "dipo" else TraceRL)(model, tok, train, exact_match, rl_cfg)
    trainer.eval_fn = lambda m: accuracy(m, tok, test, new_tokens)  # held-out curve in the plot
    trainer.plot_marks = {"eval_accuracy": (acc_sft, "after SFT (the RL start)")}
    trainer.train()
    model.save_pretrained(os.path.join(out_dir, algo, "model"))
    tok.save_pretrained(os.path.join(out_dir, algo, "model"))  # a self-contained directory
    acc_rl = accuracy(model, tok, test, new_tokens)
    print(f"[demo] held-out accuracy after {algo}: {100 * acc_rl:.1f} % "
          f"({100 * (acc_rl - acc_sft):+.1f} points) in {time.time() - t0:.0f} s")
    run = os.path.join(out_dir, algo)
    print(f"[demo] files: {run}/log.jsonl (one row per step), {run}/curves.png (reward, pass "
          f"rate, held-out accuracy), {run}/model (the trained model + tokenizer)")
    print(f"[demo] sample from it: dlmkern sample --model {run}/model --prompt "
          f"\"{test[0]['prompt']}\" --max-new-tokens {new_tokens}")
    return {"acc_sft": acc_sft, "acc_rl": acc_rl, "seconds": time.time() - t0}
