"""Run by test_distributed.py under torchrun: one TraceRL step on a tiny model, then the full
parameters and a checkpoint are written to OUT."""

import sys

import torch
from dlmkern import TraceRL, distributed
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers import RLConfig
from dlmkern.trainers.rl import _full_state

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


if __name__ == "__main__":
    out = sys.argv[1]
    tr = make_trainer(out + "/run", use_value_model="value" in sys.argv)
    tr.train_step()
    full = _full_state(tr.model)
    if distributed.rank() == 0:
        torch.save(full, out + "/params.pt")
    tr.save(out + "/ckpt")
