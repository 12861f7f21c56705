"""wd1: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.sampling.rules import SamplingConfig
from dlmkern.trainers.rl_config import RLConfig, preset_sampling
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class WD1Config(RLConfig):
    """wd1 (Tang, Dolga, Yoon, Bogunovic 2025, "wd1: Weighted Policy Optimization for Reasoning
    in Diffusion Language Models", arXiv 2507.08838; code github.com/xiaohangt/wd1, trainer
    ``wll_d1_neg``): a ratio-free weighted likelihood. Each completion's log-likelihood (d1's
    one-step estimate: estimator diffu_grpo, the response all [MASK], the prompt masked at 15 %)
    is weighted by w+ - w-, w+ = softmax over the group of psi * A, w- = softmax of -psi * A,
    A = r - mean(r): loss = sum over the step's groups of -sum_i (w+_i - w-_i) sum_t log p_it,
    divided by loss_normalizer = prompts_per_step (the authors' code: a sum over each
    completion's tokens and the group's completions, averaged over the 8 groups of an optimizer
    step: 6 per device x 4 devices x 2 accumulation steps / 6).

    Defaults from the authors' wd1/train.yaml and run/wll_NP_gsm8k.sh: group 6, 256 tokens in
    blocks of 32 with 128 denoising steps (16 per block), sampling temperature 0.9, lr 3e-6,
    weight decay 0.1, grad-norm clip 0.2, 12 inner iterations (ppo_epochs), no KL term (the
    main method's trainer loads no reference; beta is unused there). psi = 1 (the code's
    softmax(A); the paper's psi is a free inverse temperature). Works on block and full-attention
    models (the estimator's rows exist for both).

    What differs: the authors train LoRA adapters on a 4-bit model (here: the full weights);
    their 12 iterations each draw a fresh prompt mask (here the rows, and so the mask, are built
    once per step and every epoch reuses them); the paper's reference-policy variant
    (``wll_d1_neg_ref``) and wd1++ (step-wise weights) are not this preset; the paper leaves the
    normaliser of the sum open and this takes the code's mean over groups; the log-likelihood is
    scored under softmax(logits / 0.9), the policy the sampler drew from (this library's rule;
    the authors' code scores the raw logits)."""

    algo: ClassVar[str] = "wd1"
    group_size: int = _same("group_size", 6)
    max_new_tokens: int = _same("max_new_tokens", 256)
    sampling: SamplingConfig = preset_sampling(steps=16, temperature=0.9)
    estimator: str = _same("estimator", "diffu_grpo")
    advantage: str = _same("advantage", "wd1")
    ratio_level: str = _same("ratio_level", "none")
    reduction: str = _same("reduction", "sum")
    loss_normalizer: float = _same("loss_normalizer", 8.0)
    lr: float = _same("lr", 3e-6)
    weight_decay: float = _same("weight_decay", 0.1)
    max_grad_norm: float = _same("max_grad_norm", 0.2)
    ppo_epochs: int = _same("ppo_epochs", 12)
