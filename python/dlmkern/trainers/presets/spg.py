"""SPG: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class SPGConfig(RLConfig):
    """SPG, Sandwiched Policy Gradient (Wang et al. 2025, "SPG: Sandwiched Policy Gradient for
    Masked Diffusion Language Models"; code github.com/facebookresearch/SPG).
    A sequence with A > 0 trains a lower bound of its log-likelihood (the ELBO), one with A <= 0
    an upper bound (the EUBO, Renyi order eubo_beta), so both push the true likelihood the way
    the advantage asks; the default is the paper's best variant, the mixture (A <= 0: 0.5 EUBO
    + 0.5 ELBO, beta 1.5, its GSM8K / MATH setting). Likelihoods are estimated from num_masks = 2
    block-wise noisy copies (estimator blockwise: clean blocks, one block at a random rate,
    later blocks masked). No importance ratio, no clip, no KL (the authors' code refuses one).

    Bounds are per-token averages as in the authors' code (the ELBO: mean over copies of the
    mean masked-token log-prob; the EUBO: (1/beta) * mean over positions of log mean over copies
    of p^beta / t). What differs: the authors weight each sequence's term by its length
    (sum_s L_s (-A_s v_s) / sum_s L_s); dlmkern's seq_mean takes the plain mean over sequences
    (the same for equal-length completions); their masks are redrawn for each of num_iterations
    = 4 updates per rollout, here one update per rollout (ppo_epochs 1); their clean context is
    also masked at 15 % (not here); the EUBO's inner mean is computed in log space (theirs
    drops a position whose p^beta underflows to 0). Works on block and full-attention models
    (blocks: the model's, or gen_block_length)."""

    algo: ClassVar[str] = "spg"
    estimator: str = _same("estimator", "blockwise")
    num_masks: int = _same("num_masks", 2)
    group_size: int = _same("group_size", 6)
    ratio_level: str = _same("ratio_level", "none")
    token_weights: str = _same("token_weights", "elbo")
    likelihood_bound: str = _same("likelihood_bound", "mixture")
    reduction: str = _same("reduction", "seq_mean")
