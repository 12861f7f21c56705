"""IGPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.sampling.rules import SamplingConfig
from dlmkern.trainers.rl_config import RLConfig, preset_sampling
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class IGPOConfig(RLConfig):
    """IGPO (Zhao et al. 2025, "Inpainting-Guided Policy Optimization for Diffusion Large
    Language Models", arXiv 2509.10396; code github.com/facebookresearch/igpo): GRPO on d1's
    one-step rows (estimator diffu_grpo), where a group whose completions all fail is re-sampled
    with chunks of the prompt's reference solution inpainted in the response and up to 4 passing
    re-sampled completions replace the group's first ones (dlmkern.trainers.inpaint). The
    inpainted tokens are not the policy's actions: the rows keep them as clean context and never
    train them. Set inpaint_column to the data column holding the solution (here: answer).

    Defaults from the authors' run_igpo.sh / train.yaml: group 8, 256 tokens in blocks of 32
    with 128 denoising steps (16 per block), temperature 1.2, lr 5e-7, weight decay 0.1,
    grad-norm clip 0.2, 4 inner iterations (ppo_epochs), clip 0.2 / 0.2, k3 KL 0.01 to the
    reference, revealed share U[0.2, 0.6] of chunks of 5-10 tokens, at most 4 replacements.
    Works on block and full-attention models (the sampler holds the hints fixed in both).

    What differs (choices where the code and this library part): the released run script sets
    use_gspo (a sequence ratio; the trainer's default is off): this preset keeps GRPO's token
    ratio, the algorithm's name (ratio_level: sequence gives the run's); the code keeps the 20 %
    highest-entropy inpainted tokens in the loss (entropy_clipping_ratio_inpaint), here none is
    trained (they were not sampled); the code stretches the chunks' spacing over the response
    and leaves its last 30 tokens free, here chunks sit at their own offsets; its reference
    model is re-synced every 64 steps, here it stays the initial policy; its d1 rows mask no
    prompt token, here diffu_grpo masks 15 %; LoRA on a 4-bit model there, full weights here; a
    passing group is replaced in order of the re-sampled completions (the code picks at random);
    log-probs are scored under softmax(logits / 1.2), the sampler's policy (the code scores the
    raw logits)."""

    algo: ClassVar[str] = "igpo"
    group_size: int = _same("group_size", 8)
    max_new_tokens: int = _same("max_new_tokens", 256)
    sampling: SamplingConfig = preset_sampling(steps=16, temperature=1.2)
    estimator: str = _same("estimator", "diffu_grpo")
    inpaint_column: str = _same("inpaint_column", "answer")
    lr: float = _same("lr", 5e-7)
    weight_decay: float = _same("weight_decay", 0.1)
    max_grad_norm: float = _same("max_grad_norm", 0.2)
    ppo_epochs: int = _same("ppo_epochs", 4)
    kl_coef: float = _same("kl_coef", 0.01)
    kl_to: str = _same("kl_to", "ref")
