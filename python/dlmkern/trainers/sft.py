"""SFT (SPEC 4.5): block SFT on the [noisy | clean] layout for block-diffusion models and MDLM SFT
for full-attention models. Each sample draws t ~ U(eps, 1), masks each answer token with
probability t, and the loss on masked answer tokens is weighted 1/t and normalised by the answer
length."""

from __future__ import annotations

import os

import torch

from dlmkern.data import load_dataset
from dlmkern.models import DiffusionLM, load
from dlmkern.ops import layouts, masked_logprobs
from dlmkern.trainers.config import SFTConfig, to_dict
from dlmkern.trainers.logging import RunLogger, progress


class SFT:
    """``SFT(model, tokenizer, dataset, config)``; rows need "prompt" and "answer" (text). The
    answer is followed by the tokenizer's EOS so the model learns where to stop."""

    def __init__(self, model, tokenizer, dataset, config: SFTConfig | None = None,
                 answer_key: str = "answer"):
        self.cfg = (config or SFTConfig()).validate()
        torch.manual_seed(self.cfg.seed)
        self.model: DiffusionLM = load(model) if isinstance(model, str) else model
        self.tok = tokenizer
        self.data = load_dataset(dataset)
        self.answer_key = answer_key
        self.device = next(self.model.parameters()).device
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr,
                                     weight_decay=self.cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.step = 0
        self.logger = RunLogger(self.cfg.output_dir, to_dict(self.cfg))

    def batch(self, rows):
        """Packed ids, layout, trained rows, targets and per-row weights 1 / (t * answer_len)."""
        c = self.model.config
        ids, rows_idx, targets, weights, prompt_lens, lens = [], [], [], [], [], []
        offset = 0
        for r in rows:
            p = self.tok.encode(r["prompt"])
            a = self.tok.encode(str(r[self.answer_key])) + [self.tok.eos_token_id]
            seq = p + a
            t = float(self.cfg.min_mask_ratio + (1 - self.cfg.min_mask_ratio) *
                      torch.rand((), generator=self.gen))
            masked = torch.rand(len(a), generator=self.gen) < t
            noisy = p + [c.mask_token_id if m else x for x, m in zip(a, masked.tolist(),
                                                                     strict=True)]
            for j in masked.nonzero().flatten().tolist():
                rows_idx.append(offset + len(p) + j)  # the noisy copy comes first
                targets.append(a[j])
                weights.append(1.0 / (t * len(a)))
            if c.block_causal:
                ids += noisy + seq      # [noisy | clean]
                offset += 2 * len(seq)
            else:
                ids += noisy
                offset += len(seq)
            prompt_lens.append(len(p))
            lens.append(len(seq))
        lay = layouts.bd3(lens, c.block_size) if c.block_causal else layouts.full(lens)
        dev = self.device
        return (torch.tensor(ids, device=dev), lay.to(dev), torch.tensor(rows_idx, device=dev),
                torch.tensor(targets, device=dev), torch.tensor(weights, device=dev))

    def loss(self, rows):
        ids, lay, sel, tgt, w = self.batch(rows)
        if sel.numel() == 0:
            return None
        h = self.model(ids, lay)
        h = self.model.prediction_hidden(h, lay.cu_seqlens)
        full_t = torch.zeros(ids.numel(), dtype=torch.long, device=ids.device)
        full_t[sel] = tgt
        logp = masked_logprobs(h, self.model.lm_head.weight, full_t, rows=sel)
        return -(logp * w).sum() / len(rows)

    def train(self):
        self.model.train()
        for _ in progress(range(self.step, self.cfg.total_steps), self.cfg.progress_bar, "sft"):
            idx = torch.randint(0, len(self.data), (self.cfg.batch_size,), generator=self.gen)
            loss = self.loss([self.data[i] for i in idx.tolist()])
            if loss is not None:
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
                self.opt.step()
            if self.step % self.cfg.log_every == 0:
                self.logger.log({"step": self.step,
                                 "loss": loss.item() if loss is not None else None})
            self.step += 1
        self.model.save_pretrained(os.path.join(self.cfg.output_dir, "final"))
        self.logger.close()
        return self
