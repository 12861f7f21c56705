"""JustGRPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.sampling.rules import SamplingConfig
from dlmkern.trainers.config import check_all
from dlmkern.trainers.presets.cj_grpo import replays_each_step
from dlmkern.trainers.rl_config import RLConfig, preset_sampling
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class JustGRPOConfig(RLConfig):
    """JustGRPO: "The Flexibility Trap: Why Arbitrary Order Limits Reasoning Potential in
    Diffusion Language Models" (Ni et al. 2026, arXiv 2601.15165; code
    github.com/LeapLabTHU/JustGRPO; DARE's llada_dp_actor_justgrpo.py). The dLLM generates left
    to right, one token per step (sampling.rule sequential), so trace rows with shrinkage 1 score
    each token given exactly its prefix and [MASK] after it: the exact autoregressive-order
    likelihood, trained with plain GRPO (token ratio, clip 0.2, group z-score advantages,
    token-mean loss; lr 5e-7, weight decay 0.01: DARE's recipe).

    One token per step: block models need sampling.steps == the model's block size (checked
    against the model's config); full-attention models (the paper's LLaDA, whose code uses
    block_length 1 and steps = gen_length) need steps per block (sampling.steps, or
    sampling.steps_total / blocks) >= the block length (min(gen_block_length, max_new_tokens));
    the preset's sampling.steps=32 matches gen_block_length 32. Other rules, the dream schedule,
    shrinkage or estimators are refused at config time.

    Differs: the authors' code sums each token's loss over the whole fixed canvas (EOS padding
    included) / (gen_length x samples); here completions end at their EOS (after-EOS positions
    are context only) and the loss is DARE's token mean; DARE's verl loss adds a dual clip c = 3
    (here 0, as the paper's GRPO). Sampling temperature stays 1.0 (DARE's recipe: 0.6)."""

    algo: ClassVar[str] = "justgrpo"
    own_sampling: ClassVar[bool] = True
    shrinkage: int = _same("shrinkage", 1)
    sampling: SamplingConfig = preset_sampling(rule="sequential", steps=32)
    lr: float = _same("lr", 5e-7)
    weight_decay: float = _same("weight_decay", 0.01)

    def validate(self, value_model: bool = False):
        super().validate(value_model)
        s = self.sampling
        check_all([*replays_each_step(self),
                   (s.rule == "sequential",
                    f"justgrpo's likelihood is exact only in autoregressive order: "
                    f"sampling.rule={s.rule} unmasks out of position order; set sampling.rule: "
                    f"sequential (with one token per step: sampling.steps)"),
                   (s.schedule == "even",
                    f"justgrpo needs one token per step: sampling.schedule={s.schedule} can "
                    f"unmask several at once with sampling.rule=sequential; set "
                    f"sampling.schedule: even")])
        return self

    def check_model(self, model_config) -> None:
        super().check_model(model_config)
        s = self.sampling
        if model_config.block_causal:
            B = model_config.block_size
            if s.steps != B:
                raise ValueError(
                    f"config: justgrpo decodes one token per step: sampling.steps={s.steps} must "
                    f"equal the model's block_size={B} (fewer steps unmask several tokens at "
                    f"once, so the likelihood is no longer autoregressive; more only repeat "
                    f"forwards that unmask nothing)")
            return
        length = min(self.gen_block_length, self.max_new_tokens)
        n_blocks = -(-self.max_new_tokens // length)
        per_block = s.steps_total // n_blocks if s.steps_total else s.steps
        if per_block < length:
            key = (f"sampling.steps_total={s.steps_total} ({per_block} per block)"
                   if s.steps_total else f"sampling.steps={s.steps}")
            raise ValueError(
                f"config: justgrpo decodes one token per step: {key} must be >= the block "
                f"length min(gen_block_length, max_new_tokens)={length}, or a step unmasks "
                f"several tokens and the likelihood is no longer autoregressive")
