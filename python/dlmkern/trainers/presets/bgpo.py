"""BGPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class BGPOConfig(RLConfig):
    """BGPO, Boundary-Guided Policy Optimization (Lin, Zhang, Hou, Li 2025, "Boundary-Guided
    Policy Optimization for Memory-efficient RL of Diffusion Large Language Models", arXiv
    2510.11683; code github.com/THU-KEG/BGPO, and DARE's compute_policy_loss_bgpo). The
    ELBO-based PPO objective A * exp(ELBO - ELBO_old) is replaced by a lower bound that is a
    sum of one term per Monte Carlo sample: for A > 0 the tangent 1 + (l_m - l_old_m) (ratio_form
    tangent), for A <= 0 exp(l_m - l_old_m) (Jensen), each clipped, dual-clipped (c = 3) and
    averaged over the num_masks = 16 copies of estimator stratified (evenly spread mask counts,
    the authors' forward process). On-policy its value and gradient equal the ELBO objective's.
    l_m is the copy's ELBO sample divided by the completion's length, i.e. the copy's mean
    masked-token log-prob (ratio_level copy).

    What differs: the authors divide l_m by the padded response length and weight each sequence
    by its length in a token mean; here l_m uses the completion's own length and seq_mean takes
    the plain mean over sequences (the same when completions have one length); their
    A > 0 ratio is exp(log(1 + x)) (NaN when 1 + x <= 0), here 1 + x. Their update runs one
    forward per MC sample (constant memory); here, with micro_batch_tokens > 0, split_copies
    lets micro-batches cut between copies (each copy's rows hold their own clean context), so a
    forward's memory does not grow with num_masks; with micro_batch_tokens 0 a mini-batch is one
    forward of every copy (block models then share one clean stream per trajectory). Works on
    block and full-attention models."""

    algo: ClassVar[str] = "bgpo"
    estimator: str = _same("estimator", "stratified")
    num_masks: int = _same("num_masks", 16)
    ratio_level: str = _same("ratio_level", "copy")
    ratio_form: str = _same("ratio_form", "tangent")
    dual_clip: float = _same("dual_clip", 3.0)
    reduction: str = _same("reduction", "seq_mean")
    lr: float = _same("lr", 5e-7)
    split_copies: bool = _same("split_copies", True)
