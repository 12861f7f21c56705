"""Run by test_distributed.py under torchrun: one TraceRL (or SFT) step on a tiny model, then the
full parameters and a checkpoint are written to OUT."""

import sys

import torch
from dlmkern import SFT, TraceRL, distributed
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers import RLConfig, SFTConfig
from dlmkern.trainers.checkpoint import full_state

TOK = CharTokenizer()
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def reward(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def make_trainer(out_dir, **kw):
    torch.manual_seed(0)
    model = DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                                    mask_token_id=TOK.mask_token_id))
    cfg = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=8, total_steps=1,
                   output_dir=out_dir, progress_bar=False, lr=1e-3, max_grad_norm=100.0,
                   temperature=1.0, **kw)
    return TraceRL(model, TOK, DATA, reward, cfg)


def make_sft(out_dir):
    torch.manual_seed(0)
    model = DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                                    mask_token_id=TOK.mask_token_id))
    cfg = SFTConfig(batch_size=6, lr=1e-3, total_steps=1, output_dir=out_dir,
                    progress_bar=False, max_grad_norm=100.0)
    return SFT(model, TOK, DATA, cfg)


if __name__ == "__main__":
    out = sys.argv[1]
    if "sft" in sys.argv:
        tr = make_sft(out + "/run")
    else:
        extra = {"num_minibatches": 2, "ppo_epochs": 2} if "minibatch" in sys.argv else {}
        tr = make_trainer(out + "/run", use_value_model="value" in sys.argv, **extra)
    tr.train_step()
    full = full_state(tr.model)
    if distributed.rank() == 0:
        torch.save(full, out + "/params.pt")
    tr.save(out + "/ckpt")
