"""SFT (SPEC 4.5): block SFT on the [noisy | clean] layout for block-diffusion models and MDLM SFT
for full-attention models. Each sample draws t ~ U(eps, 1), masks each answer token with
probability t, and the loss on masked answer tokens is weighted 1/t and normalised by the answer
length."""

from __future__ import annotations

import torch

from dlmkern import distributed
from dlmkern._host import HOST
from dlmkern.data import load_dataset
from dlmkern.evaluate import HeldOut
from dlmkern.trainers.checks import require_column
from dlmkern.trainers.config import SFTConfig
from dlmkern.trainers.elbo import Packed, masked_token_logprobs, pack_masked
from dlmkern.trainers.offline import OfflineTrainer


class SFT(OfflineTrainer):
    """``SFT(model, tokenizer, dataset, config)``; rows need "prompt" (or "messages": a chat
    ending with the assistant turn gives the answer) and "answer" (text); ``dataset`` may be a
    file or directory (dlmkern.data.load_dataset, with config.columns). Prompts are rendered by
    the config's prompt format, as in RL. The answer is followed by the tokenizer's EOS so the
    model learns where to stop.

    Under torchrun the model is sharded with FSDP2 and each rank trains on its share of every
    step's batch (rows rank, rank + world, ...). Each row's noise comes from a generator seeded by
    (seed, step, position in the batch), so N ranks compute the same step as one process, and
    the loss is normalised by the global batch size.

    Before any model work the trainer applies the ``existing_output_dir`` policy to
    ``output_dir`` and checks that every row has the answer column; a non-finite loss or
    gradient norm stops training (or skips the update: ``on_nonfinite``). ``resume_from``: a
    checkpoint directory to start from (inside output_dir it continues that run whatever the
    policy). ``eval_dataset``: held-out rows (or a file, as ``dataset``) scored with
    ``eval_reward`` (a name of dlmkern.rewards.get_reward or a function; default exact) every
    ``eval_every`` steps on greedy completions as long as the longest answer (dlmkern.evaluate:
    the code of `dlmkern eval`), logged as eval_accuracy. A ``model`` path loads onto
    ``device`` in ``dtype`` (defaults: this rank's device, bfloat16 on CUDA, float32 on CPU;
    models.io.run_target); a module is used as it is."""

    name = "SFT"
    config_class = SFTConfig

    def __init__(self, model, tokenizer, dataset, config: SFTConfig | None = None,
                 answer_key: str = "answer", resume_from: str | None = None, device=None,
                 dtype=None, eval_dataset=None, eval_reward="exact"):
        self.answer_key = answer_key
        super().__init__(model, tokenizer, dataset, config, resume_from=resume_from,
                         device=device, dtype=dtype, eval_dataset=eval_dataset,
                         eval_reward=eval_reward)

    def load_rows(self, dataset, tok) -> list[dict]:
        """Rows without the answer column, or that the prompt format cannot render, refused."""
        rows = load_dataset(dataset, self.cfg.columns)
        require_column(rows, self.answer_key, "SFT")
        self.prompt_format.check(rows, tok, self.answer_key)
        return rows

    def _held_out(self, eval_dataset, tok, reward) -> HeldOut:
        rows = load_dataset(eval_dataset, self.cfg.columns)
        require_column(rows, self.answer_key, "SFT's held-out evaluation")
        return HeldOut.for_sft(rows, tok, reward, self.prompt_format, self.answer_key)

    def encode(self, row) -> tuple[list[int], list[int]]:
        """Prompt ids (the config's prompt format) and answer ids followed by EOS (with a chat
        template: the assistant turn as the template writes it)."""
        fmt = self.prompt_format
        answer = fmt.encode_answer(row, str(row[self.answer_key]), self.tok)
        return fmt.encode(row, self.tok), answer + [self.tok.eos_token_id]

    def batch(self, rows, seeds=None):
        """Packed ids, layout, trained rows, targets and per-row weights 1 / (t * answer_len).
        Row i draws its t and mask from a generator seeded with seeds[i]; the packing is
        trainers.elbo.pack_masked's (shared with VRPO)."""
        seeds = self.row_seeds(range(len(rows))) if seeds is None else seeds
        entries, row_w = [], []
        for r, seed in zip(rows, seeds, strict=True):
            gen = torch.Generator().manual_seed(seed)
            p, a = self.encode(r)
            t = float(self.cfg.min_mask_ratio + (1 - self.cfg.min_mask_ratio) *
                      torch.rand((), generator=gen, device=HOST))
            entries.append((p, a, (torch.rand(len(a), generator=gen, device=HOST) < t).tolist()))
            row_w.append(1.0 / (t * len(a)))
        packed = pack_masked(entries, self.model.config).to(self.device)
        w = torch.tensor(row_w, dtype=torch.float32, device=self.device)[packed.owner]
        return packed.ids, packed.layout, packed.rows, packed.targets, w

    def loss(self, rows, seeds=None, batch_size: int | None = None, weight: float = 1.0):
        """Sum over the rows' masked answer tokens of -log p / (t * answer_len), divided by
        batch_size (default len(rows)); None when no token is masked (on any rank: they agree).
        `weight`: the group's weight in the step (OfflineTrainer's), unused here."""
        ids, lay, sel, tgt, w = self.batch(rows, seeds)
        if distributed.all_sum(sel.numel()) == 0:
            return None
        logp = masked_token_logprobs(self.model, Packed(ids, lay, sel, tgt, None))
        return -(logp * w).sum() / (batch_size or len(rows))

    def row_tokens(self, row) -> int:
        copies = 2 if self.model.config.block_causal else 1  # [noisy | clean]
        return copies * sum(len(x) for x in self.encode(row))
