"""VRPO: DPO on ELBO estimates for masked / block diffusion models, with the variance reduction
of "LLaDA 1.5: Variance-Reduced Preference Optimization for Large Language Diffusion Models"
(Zhu et al., 2025; code: ML-GSAI/LLaDA-1.5; the trainer read: DARE, yjyddq/DARE, verl/trainer/
dpo/llada_fsdp_dpo_trainer.py, verl/workers/actor/llada_dp_actor_vrpo.py, `compute_dpo_loss`
and `_forward_process_vrpo` in verl/trainer/ppo/dllm_core_algos.py, recipe/llada/
run_vrpo_llada_8b_instruct.sh).

Loss per pair (prompt x, chosen y_w, rejected y_l), averaged over the batch:

    -log sigmoid(beta * ((B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))))

with B(y) the ELBO estimate of log p(y | x): over n samples i, sum over the masked tokens of
log p(y_j | masked y, x) / t_i, averaged over i. VRPO's three variance reductions:
(1) a budget of n samples per completion (``elbo_samples``); (2) all of it on timesteps: n
timesteps, one mask each (the paper's optimal allocation), the n timesteps stratified (k ~
U{1..L}, x_i = k + i L / n rounded and wrapped into 1..L tokens masked, t_i = x_i / L: LLaDA's
discrete estimator, as DARE's _forward_process_vrpo draws it); (3) antithetic sampling: the
policy's and the reference's ELBO of a completion use the same timesteps and masks (one packed
batch, two forwards).

Block-diffusion models (SDAR) score each block with the earlier blocks clean ([noisy | clean],
trainers.elbo, as SFT); full-attention models (LLaDA / Dream) the noisy sequence. The
reference is the starting policy, copied once and frozen (checkpointed with the run).

Where this differs from DARE: DARE divides each ELBO by the padded response length (a constant
of its data: 512 tokens, i.e. beta / 512 in the paper's terms); here the ELBO is the paper's,
unnormalised, so beta means what the paper's does. Defaults from DARE's recipe: beta 0.2, lr
5e-7, weight decay 0.01, mc_num = n_l = 4 ELBO samples, batch 64 pairs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from dlmkern.data import load_dataset
from dlmkern.data.checks import check_characters
from dlmkern.data.preferences import COMPLETIONS, load_preferences
from dlmkern.evaluate import HeldOut
from dlmkern.trainers.checks import require_column
from dlmkern.trainers.config import OfflineConfig, check_all, opt
from dlmkern.trainers.elbo import masked_token_logprobs, pack_masked, stratified_masks
from dlmkern.trainers.offline import OfflineTrainer


@dataclass
class VRPOConfig(OfflineConfig):
    """VRPO (LLaDA 1.5): DPO on ELBO estimates with n timesteps of one mask each and the
    policy's and reference's ELBO on the same masks; rows: prompt / chosen / rejected."""

    algo: ClassVar[str] = "vrpo"
    batch_size: int = opt(64, "preference pairs per step (over all ranks)")
    lr: float = opt(5e-7, "learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    total_steps: int = opt(200, "VRPO steps of a run")
    output_dir: str = opt("runs/vrpo", "where logs, plots and checkpoints go")
    beta: float = opt(0.2, "DPO temperature on the ELBO differences")
    elbo_samples: int = opt(4, "ELBO budget n per completion: n stratified timesteps, one mask "
                            "each, shared by the policy and the reference")

    def validate(self):
        check_all([(self.beta > 0, "beta must be > 0"),
                   (self.elbo_samples >= 1, "elbo_samples must be >= 1"),
                   *self.offline_checks()])
        return self


class VRPO(OfflineTrainer):
    """``VRPO(model, tokenizer, dataset, config)``: offline preference optimisation (see the
    module docstring). Rows: "prompt" (or "messages") and "chosen" / "rejected" completions
    (dlmkern.data.preferences); each completion is followed by the tokenizer's EOS, as SFT's
    answers. Everything else (batches, micro-batches, ranks, checkpoints, resume, logs, curves,
    ``eval_dataset`` scored on its "answer" column with ``eval_reward``) is SFT's
    (trainers.offline). Logged: loss, margin (mean beta-free chosen-minus-rejected ELBO-ratio
    difference), reward_accuracy (share of pairs with a positive margin)."""

    name = "VRPO"
    config_class = VRPOConfig
    curves = ("loss", "margin", "reward_accuracy")

    def __init__(self, model, tokenizer, dataset, config: VRPOConfig | None = None,
                 resume_from: str | None = None, device=None, dtype=None, eval_dataset=None,
                 eval_reward="exact"):
        if config is not None and not isinstance(config, VRPOConfig):
            raise TypeError(f"VRPO takes a VRPOConfig, got {type(config).__name__}")
        self._stats = []
        super().__init__(model, tokenizer, dataset, config, resume_from=resume_from,
                         device=device, dtype=dtype, eval_dataset=eval_dataset,
                         eval_reward=eval_reward)

    def load_rows(self, dataset, tok) -> list[dict]:
        rows = load_preferences(dataset, self.cfg.columns)
        where = dataset if isinstance(dataset, str) else "dataset"
        try:
            self.prompt_format.check(rows, tok, "chosen")
            check_characters(rows, tok, self.prompt_format, "rejected")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return rows

    def _held_out(self, eval_dataset, tok, reward) -> HeldOut:
        rows = load_dataset(eval_dataset, self.cfg.columns)
        require_column(rows, "answer", "VRPO's held-out evaluation")
        return HeldOut.for_sft(rows, tok, reward, self.prompt_format, "answer")

    def reference(self):
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    def encode(self, row) -> tuple[list[int], list[list[int]]]:
        """Prompt ids and the chosen and rejected completion ids, each followed by EOS."""
        fmt, eos = self.prompt_format, self.tok.eos_token_id
        return fmt.encode(row, self.tok), [fmt.encode_answer(row, row[c], self.tok) + [eos]
                                           for c in COMPLETIONS]

    def row_tokens(self, row) -> int:
        p, (c, r) = self.encode(row)
        copies = 2 if self.model.config.block_causal else 1  # [noisy | clean]
        return copies * self.cfg.elbo_samples * (2 * len(p) + len(c) + len(r))

    def noised(self, rows, seeds):
        """The ELBO samples of the rows: (prompt, completion, mask) entries, their weights
        1 / (t n) and which ELBO each adds to (2 i: row i's chosen, 2 i + 1: its rejected).
        Row i draws from a generator seeded with seeds[i]: chosen's masks, then rejected's."""
        entries, weights, elbo_of = [], [], []
        n = self.cfg.elbo_samples
        for i, (row, seed) in enumerate(zip(rows, seeds, strict=True)):
            gen = torch.Generator().manual_seed(seed)
            p, completions = self.encode(row)
            for c, a in enumerate(completions):
                for masked, inv_t in stratified_masks(len(a), n, gen):
                    entries.append((p, a, masked))
                    weights.append(inv_t / n)
                    elbo_of.append(2 * i + c)
        return entries, weights, elbo_of

    def elbos(self, rows, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy ELBOs, reference ELBOs), each [len(rows), 2] (chosen, rejected), on the same
        masks (antithetic); the reference's without gradient."""
        entries, weights, elbo_of = self.noised(rows, seeds)
        packed = pack_masked(entries, self.model.config).to(self.device)
        w = torch.tensor(weights, dtype=torch.float32, device=self.device)[packed.owner]
        g = torch.tensor(elbo_of, dtype=torch.long, device=self.device)[packed.owner]

        def elbo(model):
            logp = masked_token_logprobs(model, packed)
            out = torch.zeros(2 * len(rows), dtype=logp.dtype, device=logp.device)
            return out.index_add(0, g, logp * w).view(len(rows), 2)

        with torch.no_grad():
            ref = elbo(self.ref_model)
        return elbo(self.model), ref

    def loss(self, rows, seeds=None, batch_size: int | None = None, weight: float = 1.0):
        """Sum over the rows of -log sigmoid(beta * margin), divided by batch_size (default
        len(rows)); margin = (B_pi - B_ref)(chosen) - (B_pi - B_ref)(rejected). `weight`: the
        group's weight in the step (0 for a rank's stand-in group), for the logged metrics."""
        seeds = self.row_seeds(range(len(rows))) if seeds is None else seeds
        bs = batch_size or len(rows)
        pi, ref = self.elbos(rows, seeds)
        d = pi - ref
        margin = d[:, 0] - d[:, 1]
        m = margin.detach()
        self._stats.append((weight / bs) * torch.stack([m.sum(), (m > 0).float().sum()]))
        return -F.logsigmoid(self.cfg.beta * margin).sum() / bs

    def step_metrics(self) -> dict:
        s, self._stats = sum(self._stats), []
        return {"margin": s[0], "reward_accuracy": s[1]}
