"""CJ-GRPO: the preset, and the check the trace-replay presets share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.config import check_all
from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


def replays_each_step(c: RLConfig) -> list:
    """The trace-replay presets score each token given the sampler's own state at its step:
    trace rows, every step its own row (no shrinkage merges steps)."""
    return [
        (c.estimator == "trace",
         f"{c.algo} scores each token given the sampler's state at its step (trace rows): "
         f"estimator={c.estimator} does not replay the trajectory; set estimator: trace"),
        (c.shrinkage == 1,
         f"{c.algo} replays every sampler step as its own row: shrinkage={c.shrinkage} "
         f"{'(the paper default, 8 on full attention) ' if c.shrinkage == 0 else ''}merges "
         f"steps, so a token is scored in a state the sampler never saw; set shrinkage: 1 "
         f"with estimator=trace"),
    ]


@dataclass
class CJGRPOConfig(RLConfig):
    """CJ-GRPO: "Taming Masked Diffusion Language Models via Consistency Trajectory Reinforcement
    Learning with Fewer Decoding Step" (Yang et al. 2025, arXiv 2509.23924; code
    github.com/yjyddq/EOSER-ASS-RL; DARE's llada_dp_actor_cj_grpo.py). Each token is scored
    given the intermediate state the sampler unmasked it from (trace rows, shrinkage 1: every
    step its own row), one token ratio each (DARE's collapse_cj_step_log_probs picks each
    token's log-prob from its own step), the GRPO clip 0.2, group z-score advantages. The
    reduction is the paper's Eq. 11 (as DARE's tests/test_cj_grpo_paper_exact.py writes it):
    a token mean per transition (a trace step: one step of one block), a mean over a
    completion's transitions, a mean over completions: token_weights=transition with
    reduction=seq_mean. lr 5e-7 and weight decay 0.01 as DARE's recipes.

    Differs: DARE's LLaDA actor averages each step's tokens over the whole micro-batch, then
    over steps (not per completion), and its verl loss adds a dual clip c = 3 (here 0, as Eq.
    11). Sampling stays the run's (compare's budget): DARE's LLaDA math recipe decodes two
    tokens per step (sampling.steps=16 for 32-token blocks) at temperature 0.6. The paper's EOS
    Early Rejection decoding and Ascending Step-Size schedule are not included (the sampler's
    rules are dlmkern's: sampling.rule / schedule). Block (SDAR) and full-attention (LLaDA /
    Dream) models."""

    algo: ClassVar[str] = "cj_grpo"
    shrinkage: int = _same("shrinkage", 1)
    token_weights: str = _same("token_weights", "transition")
    reduction: str = _same("reduction", "seq_mean")
    lr: float = _same("lr", 5e-7)
    weight_decay: float = _same("weight_decay", 0.01)

    def validate(self, value_model: bool = False):
        super().validate(value_model)
        check_all(replays_each_step(self))
        return self
