"""SFT (SPEC 4.5): block SFT on the [noisy | clean] layout for block-diffusion models and MDLM SFT
for full-attention models. Each sample draws t ~ U(eps, 1), masks each answer token with
probability t, and the loss on masked answer tokens is weighted 1/t and normalised by the answer
length."""

from __future__ import annotations

import torch

from dlmkern import distributed
from dlmkern._host import HOST, read_floats
from dlmkern.data import PromptFormat, load_dataset
from dlmkern.data.checks import check_vocabulary
from dlmkern.evaluate import HeldOut, eval_due
from dlmkern.models import DiffusionLM
from dlmkern.models.io import load_config, load_for_run, run_target
from dlmkern.ops import check_device_errors
from dlmkern.trainers.checkpoint import Checkpointing
from dlmkern.trainers.checks import (
    check_output_dir,
    nonfinite_guard,
    prepare_output_dir,
    require_column,
)
from dlmkern.trainers.config import SFTConfig, to_dict
from dlmkern.trainers.elbo import Packed, masked_token_logprobs, pack_masked
from dlmkern.trainers.logging import RunLogger
from dlmkern.trainers.optim import MixedPrecisionAdamW
from dlmkern.trainers.plan import micro_batches


class SFT(Checkpointing):
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

    def __init__(self, model, tokenizer, dataset, config: SFTConfig | None = None,
                 answer_key: str = "answer", resume_from: str | None = None, device=None,
                 dtype=None, eval_dataset=None, eval_reward="exact"):
        self.cfg = (config or SFTConfig()).validate()
        target = run_target(model, device, dtype)  # refused before any work
        torch.manual_seed(self.cfg.seed)
        self.distributed = distributed.init()
        if self.cfg.batch_size < distributed.world():
            raise ValueError(f"config: batch_size {self.cfg.batch_size} is smaller than the "
                             f"{distributed.world()} ranks")
        # mistakes refused before any model work: rows without the answer column, a previous
        # run in output_dir (then, only then, "overwrite" deletes it)
        self.data = load_dataset(dataset, self.cfg.columns)
        self.answer_key = answer_key
        require_column(self.data, answer_key, "SFT")
        self.prompt_format = PromptFormat.from_config(self.cfg)
        self.prompt_format.check(self.data, tokenizer, answer_key)
        self.eval_fn = None if eval_dataset is None else self._held_out(
            eval_dataset, tokenizer, eval_reward)  # eval_fn(model) -> float (all ranks)
        check_output_dir(self.cfg.output_dir, self.cfg.existing_output_dir, resume_from)
        check_vocabulary(tokenizer, model.config if isinstance(model, DiffusionLM) else
                         load_config(model))  # ids beyond it: an IndexError in step 0
        start_from = prepare_output_dir(self.cfg.output_dir, self.cfg.existing_output_dir,
                                        writer=distributed.rank() == 0, resume_from=resume_from)
        self.model: DiffusionLM = distributed.to_local_device(load_for_run(model, target))
        self.tok = tokenizer
        self.device = next(self.model.parameters()).device
        self.model.gradient_checkpointing = self.cfg.gradient_checkpointing
        if self.distributed:  # FSDP2 before the optimizer sees the parameters
            distributed.shard(self.model)
        self.opt = MixedPrecisionAdamW(self.model.parameters(), lr=self.cfg.lr,
                                       weight_decay=self.cfg.weight_decay,
                                       offload=self.cfg.optimizer_offload,
                                       offload_grad_sums=self.cfg.offload_grad_sums)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)  # which rows each step trains
        self.step = 0
        self.nonfinite_skipped = 0  # updates dropped for a non-finite value (on_nonfinite: skip)
        self.logger = RunLogger(self.cfg.output_dir, to_dict(self.cfg),
                                enabled=distributed.rank() == 0)
        if start_from is not None:  # resume_from, or existing_output_dir: resume
            self.resume(start_from)
            self.logger.warn(f"resumed from {start_from} (step {self.step})")

    def _held_out(self, eval_dataset, tok, reward) -> HeldOut:
        rows = load_dataset(eval_dataset, self.cfg.columns)
        require_column(rows, self.answer_key, "SFT's held-out evaluation")
        return HeldOut.for_sft(rows, tok, reward, self.prompt_format, self.answer_key)

    def row_seeds(self, positions) -> list[int]:
        """Noise seeds of this step's rows at these positions of the global batch."""
        base = (self.cfg.seed * 1000003 + self.step) * 65537
        return [base + j for j in positions]

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

    def loss(self, rows, seeds=None, batch_size: int | None = None):
        """Sum over the rows' masked answer tokens of -log p / (t * answer_len), divided by
        batch_size (default len(rows)); None when no token is masked (on any rank: they agree)."""
        ids, lay, sel, tgt, w = self.batch(rows, seeds)
        if distributed.all_sum(sel.numel()) == 0:
            return None
        logp = masked_token_logprobs(self.model, Packed(ids, lay, sel, tgt, None))
        return -(logp * w).sum() / (batch_size or len(rows))

    def _micro_groups(self, rows) -> list[tuple[list[int], float]]:
        """(row indices, weight) per forward: consecutive rows whose packed tokens fit
        micro_batch_tokens (trainers.plan.micro_batches: the stand-ins that keep ranks in step
        repeat the last group at weight 0)."""
        copies = 2 if self.model.config.block_causal else 1  # [noisy | clean]
        sizes = [copies * sum(len(x) for x in self.encode(r)) for r in rows] \
            if self.cfg.micro_batch_tokens > 0 else [0] * len(rows)
        out = []
        for g in micro_batches(sizes, self.cfg.micro_batch_tokens):
            out.append((g, 1.0) if g is not None else (out[-1][0], 0.0))
        return out

    def train_step(self) -> dict:
        """One optimizer step on batch_size rows drawn with replacement (this rank's share)."""
        self.model.train()
        bs, rank, world = self.cfg.batch_size, distributed.rank(), distributed.world()
        idx = torch.randint(0, len(self.data), (bs,), generator=self.gen, device=HOST).tolist()
        mine = list(range(rank, bs, world))
        rows, seeds = [self.data[idx[j]] for j in mine], self.row_seeds(mine)
        log = {"step": self.step, "loss": None}
        self.opt.zero_grad(set_to_none=True)
        local, trained = 0.0, False
        for group, w in self._micro_groups(rows):
            # the loss of a group is its share of the global mean (sums over rows / bs)
            loss = self.loss([rows[i] for i in group], [seeds[i] for i in group], bs)
            if loss is None:  # no masked token in this group on any rank (ranks agree)
                continue
            trained = True
            local = local + loss.detach() * w  # to host once, after the loop
            # FSDP averages gradients over ranks: scale the local share by world.
            (loss * world if w == 1.0 else loss * (world * w)).backward()
            self.opt.stash_grads()  # bf16 gradients summed in fp32 (no-op for fp32 models)
        self.opt.unstash_grads()
        if trained:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            # to host before the optimizer step: a non-finite loss or gradient norm never reaches
            # the weights (both are global: every rank decides the same)
            host = read_floats({"loss": local, "grad_norm": gnorm})  # one read
            check_device_errors(self.device)  # the kernels' flag (CUDA: bad targets, layouts)
            log.update(loss=distributed.all_sum(host["loss"]), grad_norm=host["grad_norm"])
            if nonfinite_guard(self, self.opt, "SFT",
                               {"loss": log["loss"], "grad_norm": log["grad_norm"]}):
                self.opt.step()
            else:
                log["skipped"] = "non-finite loss or grad_norm; no update"
        log["nonfinite_skipped"] = self.nonfinite_skipped
        if self.eval_fn is not None and eval_due(self.step, self.cfg.eval_every,
                                                 self.cfg.total_steps):
            with distributed.gathered(self.model):  # full weights, as for sampling
                log["eval_accuracy"] = float(self.eval_fn(self.model))
        self.step += 1
        return log

    def train(self):
        """Runs until config.total_steps, saving every save_every steps and at the end
        (output_dir/final: checkpoint, with the Hugging Face model in final/model); on Ctrl-C,
        SIGTERM or SIGUSR1 it stops with a checkpoint (Checkpointing.run_steps)."""
        self.run_steps("sft", self._log_step)
        return self

    def _log_step(self, log: dict) -> None:
        """Every log_every-th step is logged, and any step that skipped, evaluated or ended."""
        if (self.step - 1) % self.cfg.log_every == 0 or "skipped" in log or \
                "eval_accuracy" in log or self.step == self.cfg.total_steps:
            self.logger.log(log)

    def finish_logs(self) -> None:
        """Draws the run's curves (output_dir/curves.png) and closes its logger: at the end of a
        run and when a signal stops it (trainers.preemption)."""
        self.logger.plot(("loss", "eval_accuracy"), title="sft")
        self.logger.close()

    # ---- checkpoints (save / resume: trainers.checkpoint) -------------------------------------

    def _progress(self) -> dict:
        return {"step": self.step, "sample_rng": self.gen.get_state(),
                "nonfinite_skipped": self.nonfinite_skipped}

    def _set_progress(self, meta: dict) -> None:
        self.step = meta["step"]
        self.gen.set_state(meta["sample_rng"])
        self.nonfinite_skipped = meta.get("nonfinite_skipped", 0)
