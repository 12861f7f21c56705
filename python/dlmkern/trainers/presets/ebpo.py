"""EBPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class EBPOConfig(RLConfig):
    """EBPO, ELBO-based Block-level Policy Optimization (Bie et al. 2026, "LLaDA2.1: Speeding Up
    Text Diffusion via Token Editing", arXiv 2602.08676, its RL section, eq. 4-5; models
    github.com/inclusionAI/LLaDA2.X; the implementation followed: DARE, github.com/yjyddq/DARE,
    compute_policy_loss_ebpo / _forward_process_ebpo / ebpo_actor_mixin.py). One importance
    ratio per sequence, exp(ELBO - ELBO_old), where the ELBO is the block-diffusion one: each
    of num_masks = 16 noisy copies masks every block at its own stratified rate t_b (estimator
    block_stratified) and the ELBO is the mean over copies of sum_j log p_j / t_b(j)
    (token_weights block_elbo, ratio_level elbo); the ratio is clipped once per sequence (eps
    0.2, no dual clip), the loss is the mean over sequences of -min(r A, clip(r) A).

    Block models only: a full-attention model is refused at config time (check_model: its ELBO
    has one rate per copy; BGPO is the closest preset). What differs: DARE's actor replays
    the MC copies one forward each with the ratio's gradient held fixed (constant memory);
    here a pass holds every copy of its trajectories (same loss and gradient, more memory);
    a KL term (off, as in the report's runs) would be per token, not DARE's sequence-level
    ELBO KL."""

    algo: ClassVar[str] = "ebpo"
    estimator: str = _same("estimator", "block_stratified")
    num_masks: int = _same("num_masks", 16)
    ratio_level: str = _same("ratio_level", "elbo")
    token_weights: str = _same("token_weights", "block_elbo")
    reduction: str = _same("reduction", "seq_mean")
    lr: float = _same("lr", 5e-7)
