"""The baselines: random masking, coupled-GRPO (DiffuCoder) and diffu-GRPO (d1), each
its estimator with the neutral GRPO-style defaults of RLConfig (not tuned to their papers' runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class RandomMaskConfig(RLConfig):
    """Random-masking RL, the plain baseline (no paper of its own): one noisy copy per
    completion, each token masked with probability t ~ U(eps, 1) and the masked ones trained;
    GRPO advantages, clipped token ratio 0.2, token mean."""

    algo: ClassVar[str] = "random_mask"
    estimator: str = _same("estimator", "random_mask")


@dataclass
class CoupledGRPOConfig(RLConfig):
    """Coupled-GRPO (Gong et al. 2025, "DiffuCoder: Understanding and Improving Masked Diffusion
    Models for Code Generation", arXiv 2506.20639; code github.com/apple/ml-diffucoder): two
    complementary masks per completion at one rate t, so every completion token is trained exactly
    once across the pair; GRPO advantages, clipped token ratio 0.2, token mean. What differs:
    the rate is t ~ U(eps, 1) (DiffuCoder's code draws t ~ U(0.2, 0.8)); the code (as DARE runs
    it, _forward_process_coupled_grpo) also scores a third, fully masked copy and combines a
    token's log-probs over the copies with the mask probabilities t / 1 - t as weights, here each
    token's log-prob is its one masked copy's (estimator coupled); no KL term."""

    algo: ClassVar[str] = "coupled_grpo"
    estimator: str = _same("estimator", "coupled")


@dataclass
class DiffuGRPOConfig(RLConfig):
    """diffu-GRPO (Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large Language Models via
    Reinforcement Learning", arXiv 2504.12216; code github.com/dllm-reasoning/d1): the one-step
    log-probability estimate, the whole completion masked and the prompt masked at random
    (15 %); GRPO advantages, clipped token ratio 0.2, token mean (DARE's d1 recipe). What
    differs from d1's own trainer: no KL term (d1: beta 0.04) and one update per rollout
    (ppo_epochs 1; d1 takes 12 inner iterations, each with a fresh prompt mask)."""

    algo: ClassVar[str] = "diffu_grpo"
    estimator: str = _same("estimator", "diffu_grpo")
