"""ESPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class ESPOConfig(RLConfig):
    """ESPO, ELBO-based Sequence-level Policy Optimization ("Principled RL for Diffusion LLMs
    Emerges from a Sequence-Level Perspective", Ou et al. 2025, arXiv 2512.03759;
    github.com/ML-GSAI/ESPO). The
    sequence's ELBO (M = 2 Monte Carlo masks, each with its complement: estimator elbo_mc)
    is its log-likelihood; one ratio per sequence exp((ELBO - ELBO_old) / L) clipped at 0.2,
    one advantage per sequence, the loss averaged over sequences (seq_mean); KL to the frozen
    reference beta * 0.5 (ELBO - ELBO_ref)^2 / L (k2 on the sequence ELBO, kl_level: sequence),
    beta = 1e-3 (the paper's GSM8K / math recipes; its base yaml has 1e-2); max_grad_norm 0.2.
    Differs: L is the completion's length up to its EOS (the paper's code divides by the padded
    generation length); a mask masks each token with probability t ~ U(eps, 1) and weighs it by
    1 / (the share it masks), where the paper's code masks exactly k ~ U{0..L} tokens and weighs
    by (L + 1) / k; a copy that masks nothing is dropped; advantages are the group z-score (the
    paper: leave-one-out, unscaled); the masks are drawn once per rollout and reused by every
    ppo_epoch (the paper re-draws them at each of its num_iterations, 8 in its GSM8K recipe;
    ppo_epochs stays 1 here); the reference stays the initial policy (the paper's yaml re-syncs
    it every 64 steps). Block and full-attention models alike (block models: each copy
    masks with one t across the blocks)."""

    algo: ClassVar[str] = "espo"
    estimator: str = _same("estimator", "elbo_mc")
    num_masks: int = _same("num_masks", 2)
    mask_coupling: str = _same("mask_coupling", "complementary")
    token_weights: str = _same("token_weights", "elbo")
    ratio_level: str = _same("ratio_level", "sequence")
    reduction: str = _same("reduction", "seq_mean")
    kl_coef: float = _same("kl_coef", 1e-3)
    kl_kind: str = _same("kl_kind", "quadratic")
    kl_level: str = _same("kl_level", "sequence")
    kl_to: str = _same("kl_to", "ref")
    max_grad_norm: float = _same("max_grad_norm", 0.2)
