"""MDPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.sampling.rules import SamplingConfig
from dlmkern.trainers.rl_config import RLConfig, preset_sampling
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class MDPOConfig(RLConfig):
    """MDPO, Masked Diffusion Policy Optimization ("MDPO: Overcoming the Training-Inference
    Divide of Masked Diffusion Language Models", He et al. 2025, arXiv 2508.13148; the authors'
    code github.com/autonomousvision/mdpo, src/open_r1/mdpo/mdpo_trainer.py; its DARE port
    yjyddq/DARE: verl/trainer/ppo/mdpo_algos.py, verl/workers/actor/llada_dp_actor_mdpo.py,
    verl/workers/rollout/mdpo_llada_rollout.py, recipe/llada/run_mdpo_llada_8b_instruct.sh).
    The rollout records, at every sampler step k, the completion decoded from that step's state
    (committed tokens plus the step's predictions at the still-masked positions) and rewards it
    (one reward call per step and completion). Step-level advantages (advantage: mdpo): score_k =
    (r_k - r_{k-1}) + 1 + mean(r_{k+1..}) (the last step: + r_K), z-scored per step over the
    prompt's group; the 16 steps of largest summed |advantage| over the batch train
    (mdpo_train_steps). Step k's noisy copy is the sampler's state at step k; every masked
    position is trained on the step's prediction there (estimator: mdpo), with the clipped
    token ratio (eps 0.2), its step's advantage, and the weight lambda_k * c (token_weights:
    mdpo): lambda_k = n / |M_k| (n generated tokens, |M_k| of them masked at step k) and c the
    rollout policy's probability of the predicted token; the loss is the token mean over the
    batch. The defaults are DARE's LLaDA recipe: 8 completions per prompt, 16 prompts, lr 5e-7,
    weight decay 0.01, 2 tokens per step (sampling.steps=16 for 32-token blocks), temperature
    0.6, low-confidence remasking (rule static, confidence prob), no KL (use_kl_loss false; a
    quadratic KL when on: kl_kind quadratic). The authors' demo config differs (4 completions,
    lr 1e-5, temperature 0.1, 128 steps over 512 tokens in ONE 512-token block, z-score eps
    1e-4; the same 16 trained steps, eps 0.2 and beta 0): set them to reproduce it
    (gen_block_length = max_new_tokens).
    Full-attention models only (LLaDA / Dream): a block model's state at step k holds no later
    blocks (check_model refuses it). Differs: later blocks' still-masked positions are predicted
    by argmax (DARE draws them at the sampling temperature; the current block uses the
    sampler's own draw); positions after EOS are context, never trained (DARE trains the whole
    canvas) and n / |M_k| counts generated tokens up to EOS (DARE: the padded response length
    over the masked canvas positions); c is exp(old log-prob) at the sampling temperature (the
    same policy as the rollout's, on-policy; DARE records the sampler's), and the loss scores
    the policy at the sampling temperature (DARE's actor scores logits at temperature 1); a
    completion that stopped at EOS keeps its last step's reward for the steps it did not run;
    the top-k steps are chosen per rollout call on each rank (DARE: per batch); the token mean
    runs over the mini-batch (DARE: per micro-batch, rescaled); with kl_coef > 0 the token
    weight lambda_k * c weighs the KL term too (both codes weigh it by c only)."""

    algo: ClassVar[str] = "mdpo"
    # its rollout is the algorithm: a reward call per step and completion, the whole response
    # projected at every step, full-attention models only (the demo's is a block model), so
    # `dlmkern compare` runs it only when named
    own_sampling: ClassVar[bool] = True
    prompts_per_step: int = _same("prompts_per_step", 16)
    group_size: int = _same("group_size", 8)
    sampling: SamplingConfig = preset_sampling(rule="static", steps=16, temperature=0.6)
    advantage: str = _same("advantage", "mdpo")
    mdpo_train_steps: int = _same("mdpo_train_steps", 16)
    estimator: str = _same("estimator", "mdpo")
    token_weights: str = _same("token_weights", "mdpo")
    eps_low: float = _same("eps_low", 0.2)
    eps_high: float = _same("eps_high", 0.2)
    kl_kind: str = _same("kl_kind", "quadratic")
    lr: float = _same("lr", 5e-7)
    weight_decay: float = _same("weight_decay", 0.01)
