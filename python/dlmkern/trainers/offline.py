"""The offline trainers' shared owner (SFT and VRPO): a fixed dataset of rows, batch_size rows
drawn with replacement per step, a loss per micro-batch of rows, one optimizer step, held-out
evaluation, logs, curves and checkpoints. A subclass gives the rows (``load_rows``, checked),
the tokens a row packs (``row_tokens``), the loss of some rows (``loss``) and, optionally, a
frozen reference model (``reference``) and per-step metrics (``step_metrics``)."""

from __future__ import annotations

import torch

from dlmkern import distributed
from dlmkern._host import HOST, read_floats
from dlmkern.data import PromptFormat
from dlmkern.data.checks import check_vocabulary
from dlmkern.evaluate import eval_due
from dlmkern.models import DiffusionLM
from dlmkern.models.io import load_config, load_for_run, run_target
from dlmkern.models.lora import apply_lora
from dlmkern.ops import check_device_errors
from dlmkern.trainers.checkpoint import Checkpointing
from dlmkern.trainers.checks import check_output_dir, nonfinite_guard, prepare_output_dir
from dlmkern.trainers.config import to_dict
from dlmkern.trainers.logging import RunLogger
from dlmkern.trainers.optim import MixedPrecisionAdamW, trained
from dlmkern.trainers.plan import micro_batches


class OfflineTrainer(Checkpointing):
    """Built as SFT is (see its docstring): config validated, mistakes in the rows, the
    output directory and the vocabulary refused before any model work, then the model loaded,
    sharded under torchrun, its optimizer, logger and (resume) its checkpoint."""

    name = "offline"          # the progress bar's, the curves' title and the error messages'
    curves = ("loss",)        # what curves.png draws, with eval_accuracy
    config_class = None

    def __init__(self, model, tokenizer, dataset, config, resume_from: str | None = None,
                 device=None, dtype=None, eval_dataset=None, eval_reward="exact"):
        self.cfg = (config or self.config_class()).validate()
        target = run_target(model, device, dtype)  # refused before any work
        torch.manual_seed(self.cfg.seed)
        self.distributed = distributed.init()
        if self.cfg.batch_size < distributed.world():
            raise ValueError(f"config: batch_size {self.cfg.batch_size} is smaller than the "
                             f"{distributed.world()} ranks")
        self.prompt_format = PromptFormat.from_config(self.cfg)
        self.tok = tokenizer
        self.data = self.load_rows(dataset, tokenizer)
        self.eval_fn = None if eval_dataset is None else self._held_out(
            eval_dataset, tokenizer, eval_reward)  # eval_fn(model) -> float (all ranks)
        check_output_dir(self.cfg.output_dir, self.cfg.existing_output_dir, resume_from)
        model_config = model.config if isinstance(model, DiffusionLM) else load_config(model)
        check_vocabulary(tokenizer, model_config)  # ids beyond it: an IndexError in step 0
        lora = getattr(self.cfg, "lora", None)  # SFT's; VRPO has none
        if lora is not None:
            lora.check_model(model_config)
        start_from = prepare_output_dir(self.cfg.output_dir, self.cfg.existing_output_dir,
                                        writer=distributed.rank() == 0, resume_from=resume_from)
        self.model: DiffusionLM = distributed.to_local_device(load_for_run(model, target))
        self.device = next(self.model.parameters()).device
        if lora is not None and lora.enabled:  # adapters, the base frozen (models.lora)
            apply_lora(self.model, lora)
        self.ref_model = self.reference()  # before sharding: a copy of the starting weights
        self.model.gradient_checkpointing = self.cfg.gradient_checkpointing
        if self.distributed:  # FSDP2 before the optimizer sees the parameters
            for m in (self.model, self.ref_model):
                if m is not None:
                    distributed.shard(m)
        self.opt = MixedPrecisionAdamW(trained(self.model), lr=self.cfg.lr,
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

    # ---- what a subclass gives -----------------------------------------------------------------

    def load_rows(self, dataset, tok) -> list[dict]:
        """The rows to train on (a list of dicts or a file / directory, with config.columns),
        refused (a ValueError naming row and column) before any model work when one cannot be
        trained."""
        raise NotImplementedError

    def _held_out(self, eval_dataset, tok, reward):
        raise NotImplementedError

    def row_tokens(self, row) -> int:
        """Tokens one row packs into a forward (micro_batch_tokens)."""
        raise NotImplementedError

    def loss(self, rows, seeds=None, batch_size: int | None = None):
        """These rows' share of the step's loss (a sum over rows / batch_size); None when
        nothing in them is trained (on every rank: they agree)."""
        raise NotImplementedError

    def reference(self):
        """A frozen model the loss compares with (None: none)."""
        return None

    def step_metrics(self) -> dict:
        """Device scalars to log with the step (read with the loss: one host read); called
        once after the step's losses."""
        return {}

    # ---- the step ------------------------------------------------------------------------------

    def row_seeds(self, positions) -> list[int]:
        """Noise seeds of this step's rows at these positions of the global batch."""
        base = (self.cfg.seed * 1000003 + self.step) * 65537
        return [base + j for j in positions]

    def _micro_groups(self, rows) -> list[tuple[list[int], float]]:
        """(row indices, weight) per forward: consecutive rows whose packed tokens fit
        micro_batch_tokens (trainers.plan.micro_batches: the stand-ins that keep ranks in step
        repeat the last group at weight 0)."""
        sizes = [self.row_tokens(r) for r in rows] if self.cfg.micro_batch_tokens > 0 \
            else [0] * len(rows)
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
            loss = self.loss([rows[i] for i in group], [seeds[i] for i in group], bs,
                             weight=w)
            if loss is None:  # nothing trained in this group on any rank (ranks agree)
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
            metrics = self.step_metrics()
            host = read_floats({"loss": local, "grad_norm": gnorm, **metrics})  # one read
            check_device_errors(self.device)  # the kernels' flag (CUDA: bad targets, layouts)
            log.update(loss=distributed.all_sum(host["loss"]), grad_norm=host["grad_norm"])
            log.update({k: distributed.all_sum(host[k]) for k in metrics})
            if nonfinite_guard(self, self.opt, self.name,
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
        self.run_steps(self.name.lower(), self._log_step)
        return self

    def _log_step(self, log: dict) -> None:
        """Every log_every-th step is logged, and any step that skipped, evaluated or ended."""
        if (self.step - 1) % self.cfg.log_every == 0 or "skipped" in log or \
                "eval_accuracy" in log or self.step == self.cfg.total_steps:
            self.logger.log(log)

    def finish_logs(self) -> None:
        """Draws the run's curves (output_dir/curves.png) and closes its logger: at the end of a
        run and when a signal stops it (trainers.preemption)."""
        self.logger.plot((*self.curves, "eval_accuracy"), title=self.name.lower())
        self.logger.close()

    # ---- checkpoints (save / resume: trainers.checkpoint) -------------------------------------

    def _progress(self) -> dict:
        return {"step": self.step, "sample_rng": self.gen.get_state(),
                "nonfinite_skipped": self.nonfinite_skipped}

    def _set_progress(self, meta: dict) -> None:
        self.step = meta["step"]
        self.gen.set_state(meta["sample_rng"])
        self.nonfinite_skipped = meta.get("nonfinite_skipped", 0)
