"""The RL config tree and the algorithms as its presets (SPEC 4.7).

``RLConfig`` holds every knob of the RL loop; an algorithm is a subclass whose defaults ARE the
algorithm (TRL's habit): ``TraceRLConfig``, ``DiPOConfig`` and the baselines. An explicit config
overrides a preset field by field (``DiPOConfig(lr=2e-6)`` keeps DiPO's clip and sampling), a
run file's ``algo:`` picks the preset and its ``trainer:`` section overrides it. Sampling is a
nested ``SamplingConfig``. ``validate`` checks every enum, range and combination before any
model is loaded, naming the key; every field carries a one-line help (``dlmkern config ALGO``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from dlmkern.ops.objective import REDUCTIONS
from dlmkern.ops.objective import checks as objective_checks
from dlmkern.rl.estimators import ESTIMATORS
from dlmkern.rl.estimators import get as get_estimator
from dlmkern.sampling.rules import SamplingConfig
from dlmkern.trainers.config import DataConfig, check_all, check_types, policy_checks
from dlmkern.trainers.config import help_field as opt


@dataclass
class RLConfig(DataConfig):
    """The RL loop's settings with neutral defaults (GRPO-style, trace rows, no filter)."""

    algo: ClassVar[str] = "rl"
    # rollout
    prompts_per_step: int = opt(8, "prompts drawn per step (over all ranks)")
    group_size: int = opt(8, "completions sampled per prompt")
    max_new_tokens: int = opt(256, "generated tokens per completion at most")
    gen_block_length: int = opt(32, "full-attention models: semi-autoregressive block length")
    sampling: SamplingConfig = dataclasses.field(
        default_factory=SamplingConfig,
        metadata={"help": "the rollout sampler (sampling.rule, sampling.steps, ...); the loss "
                          "scores its policy, softmax(logits / sampling.temperature): RL takes "
                          "temperature > 0 and no top_k / top_p"})
    # rows and advantages
    estimator: str = opt("trace", "which rows are trained: " + " | ".join(ESTIMATORS))
    shrinkage: int = opt(0, "trace shrinkage s (0: the paper's, 1 for block models, 8 for "
                         "full attention)")
    num_masks: int = opt(2, "estimators blockwise / stratified / block_stratified: noisy "
                         "copies (Monte Carlo samples of the ELBO) per completion")
    use_value_model: bool = opt(False, "train a value model; advantages by GAE over trace steps")
    gamma: float = opt(1.0, "GAE discount over trace steps")
    lam: float = opt(1.0, "GAE lambda over trace steps")
    vf_clip: float = opt(0.2, "value-loss clip around the rollout-time values")
    pass_threshold: float = opt(1.0, "a completion passes when its summed reward is >= this")
    pass_rate_low: float = opt(0.0, "train groups whose mean reward (pass rate, for 0 / 1 "
                               "rewards) is >= this")
    pass_rate_high: float = opt(1.0, "train groups whose mean reward is <= this")
    dynamic_sampling: bool = opt(False, "DAPO: train groups whose rewards differ (0 < pass rate "
                                 "< 1), oversample prompts to fill the step")
    max_oversample_rounds: int = opt(4, "dynamic sampling: extra rollout rounds at most")
    # policy loss: these keys (and sampling.temperature) are the Objective (dlmkern.ops.objective)
    ratio_level: str = opt("token", "importance ratio per: token | block | sequence (GSPO: "
                           "exp of the mean log-ratio) | copy (per noisy copy, its terms "
                           "averaged per sequence: BGPO) | elbo (per sequence, exp of its "
                           "ELBO difference: EBPO) | none (weighted likelihood, wd1); "
                           "all but token run the loss on the reference path")
    ratio_form: str = opt("exp", "exp | tangent (A > 0: ratio 1 + log r, BGPO's lower bound); "
                          "tangent runs the loss on the reference path")
    reduction: str = opt("token_mean", "loss reduction: " + " | ".join(REDUCTIONS))
    loss_normalizer: float = opt(1.0, "reduction=sum: the constant divisor (Dr.GRPO)")
    eps_low: float = opt(0.2, "ratio clip below: 1 - eps_low")
    eps_high: float = opt(0.2, "ratio clip above: 1 + eps_high (clip-higher when > eps_low)")
    dual_clip: float = opt(0.0, "dual-clip constant c > 1 for negative advantages (0: off)")
    kl_coef: float = opt(0.0, "KL coefficient beta (0: no KL term)")
    kl_kind: str = opt("k3", "KL estimator: k1 (logp - target) | k3 (exp(x) - x - 1) | "
                       "quadratic (0.5 (logp - target)^2, ESPO); k1 / quadratic run the loss on "
                       "the reference path")
    kl_to: str = opt("old", "KL target: old (rollout policy) | ref (frozen initial policy)")
    token_weights: str = opt("none", "per-token loss weights: none | elbo (1/t, t the share its "
                             "noisy copy masks) | block_elbo (1/t of its block: block models) | "
                             "step (1 / tokens of its trace step or copy); "
                             "weights run the loss on the reference path")
    likelihood_bound: str = opt("none", "per-sequence likelihood bound replacing the token terms "
                                "(SPG; ratio_level: none, token_weights: elbo): none | elbo | "
                                "sandwich (ELBO for A > 0, EUBO for A <= 0) | mixture (A <= 0: "
                                "mixture_weight * EUBO + (1 - mixture_weight) * ELBO)")
    eubo_beta: float = opt(1.5, "likelihood_bound sandwich / mixture: the EUBO's beta >= 1 (the "
                           "SPG authors: 1.5 GSM8K / MATH, 2.0 Countdown, 1.0 Sudoku)")
    mixture_weight: float = opt(0.5, "likelihood_bound mixture: the EUBO's weight in [0, 1]")
    # optimisation
    lr: float = opt(1e-6, "policy learning rate")
    value_lr: float = opt(5e-6, "value model learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient-norm clip")
    total_steps: int = opt(100, "RL steps of a run")
    num_minibatches: int = opt(1, "optimizer steps per pass over a step's trajectories")
    ppo_epochs: int = opt(1, "passes over them (old log-probs fixed at rollout)")
    micro_batch_tokens: int = opt(0, "packed row tokens per forward, gradients accumulated "
                                  "(0: a mini-batch in one forward)")
    split_copies: bool = opt(False, "with micro_batch_tokens > 0: micro-batches may cut between "
                             "a trajectory's noisy copies (each copy's rows carry their own "
                             "clean context): memory per forward independent of num_masks; "
                             "objectives linear in their copies only (ratio_level: copy, BGPO)")
    gradient_checkpointing: bool = opt(False, "recompute layer activations in backward")
    optimizer_offload: bool = opt(False, "fp32 masters, moments and gradient sums on the host "
                                  "(16 bytes per bf16 parameter off the GPU; slower step)")
    offload_grad_sums: bool = opt(True, "with optimizer_offload: the fp32 gradient sums on the "
                                  "host too (false: on the GPU, 4 bytes per parameter there)")
    # bookkeeping
    seed: int = opt(0, "seeds data order, sampling and masks")
    output_dir: str = opt("runs/rl", "where logs, plots and checkpoints go")
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(2, "periodic checkpoints kept (the oldest deleted; final always kept; "
                         "0: all)")
    save_optimizer: bool = opt(True, "checkpoints hold the optimizer state (fp32 masters and "
                               "moments: ~6x a bf16 model); false: resume starts it fresh")
    log_every: int = opt(1, "JSONL / TensorBoard / W&B row every N steps (and the last step)")
    eval_every: int = opt(0, "held-out accuracy on the run file's eval_dataset (greedy, the "
                          "run's sampling) every N steps and at the last step (0: never)")
    progress_bar: bool = opt(True, "tqdm progress bar (progress lines when not a terminal)")
    existing_output_dir: str = opt("refuse", "output_dir already holding a run: refuse | "
                                   "overwrite | resume")
    on_nonfinite: str = opt("stop", "NaN / inf loss, grad norm or reward: stop | skip it")

    def resolved_shrinkage(self, block_causal: bool) -> int:
        """shrinkage, with 0 read as the paper's default for this kind of model (SPEC 4.3)."""
        return self.shrinkage or (1 if block_causal else 8)

    def validate(self, value_model: bool = False):
        """`value_model`: the trainer has one (given explicitly) even if use_value_model is off."""
        check_types(self)
        valued = self.use_value_model or value_model
        n_blocks = -(-self.max_new_tokens // max(min(self.gen_block_length,
                                                     self.max_new_tokens), 1))
        check_all([
            *_range_checks(self),
            (self.group_size >= 2 or valued,
             "group_size=1 with a group-relative advantage (the group z-score of TraceRL without "
             "a value model, DiPO, the GRPO-style baselines) gives every sample advantage 0: "
             "nothing would train; use group_size >= 2 or use_value_model: true"),
            (not self.sampling.steps_total or self.sampling.steps_total % n_blocks == 0,
             f"sampling.steps_total={self.sampling.steps_total} must split evenly over the "
             f"{n_blocks} blocks of max_new_tokens / gen_block_length (LLaDA's rule)"),
            (not valued or self.estimator not in ESTIMATORS or
             get_estimator(self.estimator).trace_steps,
             f"use_value_model needs estimator: trace (GAE runs over trace steps; "
             f"{self.estimator!r} rows have none)"),
            (not self.dynamic_sampling or (self.pass_rate_low, self.pass_rate_high) == (0.0, 1.0),
             f"dynamic_sampling keeps the groups whose rewards differ by itself: set "
             f"pass_rate_low: 0 and pass_rate_high: 1 (they are {self.pass_rate_low} / "
             f"{self.pass_rate_high}, {type(self).__name__}'s defaults unless you set them), or "
             f"use DiPOConfig"),
            *_scored_sampling(self.sampling),
            *policy_checks(self),
            *objective_checks(self),
            (self.token_weights not in ("elbo", "block_elbo") or
             self.estimator not in ESTIMATORS or not get_estimator(self.estimator).trace_steps,
             f"token_weights={self.token_weights} weights a token by 1/t, t the share of the completion its "
             f"noisy copy masks; estimator={self.estimator} trains only one trace step of each "
             f"copy (t is not that share): use a random-masking estimator (random_mask, "
             f"coupled) or token_weights: step"),
            (not self.split_copies or (self.ratio_level == "copy" and
                                       self.reduction == "seq_mean"),
             f"split_copies trains a trajectory's noisy copies in separate forwards, exact only "
             f"for an objective that is a mean of per-copy terms: ratio_level=copy with "
             f"reduction=seq_mean (got ratio_level={self.ratio_level}, "
             f"reduction={self.reduction}); set split_copies: false"),
            (not (self.ratio_level in ("copy", "elbo") or self.likelihood_bound != "none") or
             self.estimator not in ESTIMATORS or not get_estimator(self.estimator).trace_steps,
             f"ratio_level={self.ratio_level} / likelihood_bound={self.likelihood_bound} group "
             f"tokens by noisy copy, and estimator={self.estimator} rows are trace steps: use "
             f"a random-masking estimator (stratified, blockwise, random_mask, coupled)"),
        ])
        return self


    def check_model(self, model_config) -> None:
        """Settings that only one kind of model takes (its config.json is enough)."""
        if model_config.block_causal and (self.sampling.cfg_scale or self.sampling.steps_total):
            raise ValueError("config: sampling.cfg_scale and sampling.steps_total are LLaDA's "
                             "(full-attention models); this model is block-causal")
        per_block = self.token_weights == "block_elbo" or self.estimator == "block_stratified"
        if not model_config.block_causal and per_block:
            raise ValueError(
                f"config: token_weights={self.token_weights} / estimator={self.estimator} "
                f"estimate a block-diffusion ELBO (each block at its own rate, given the clean "
                f"blocks before it: EBPO); this model is full-attention, its ELBO has one rate "
                f"per copy: use token_weights: elbo with estimator stratified or random_mask "
                f"(e.g. algo: bgpo)")


def _scored_sampling(s: SamplingConfig) -> list:
    """The loss scores softmax(logits / temperature) over the whole vocabulary (old, new and
    reference log-probs, as the sampler records its own): sampling that draws from anything
    else would make every ratio off-policy, and the recorded log-probs would not show it."""
    truncated = ("draws from a truncated distribution the loss does not score (it scores "
                 "softmax(logits / temperature) over the whole vocabulary, and so do the "
                 "sampler's recorded log-probs: sampler_logp_gap would not show the mismatch)")
    return [
        (s.temperature > 0,
         f"sampling.temperature={s.temperature:g} is greedy: every completion of a prompt comes "
         f"out the same and no distribution was sampled for the loss to score; RL samples at "
         f"temperature > 0 (the presets use 1.0)"),
        (s.top_k == 0, f"sampling.top_k={s.top_k} {truncated}; set sampling.top_k: 0"),
        (s.top_p == 1.0, f"sampling.top_p={s.top_p:g} {truncated}; set sampling.top_p: 1"),
        (s.cfg_scale == 0, f"sampling.cfg_scale={s.cfg_scale:g} samples from guided logits "
         f"(uncond + (cfg_scale + 1) * (cond - uncond)), while the loss scores the unguided "
         f"policy: every ratio would be off-policy (sampler_logp_gap shows it); set "
         f"sampling.cfg_scale: 0 for RL"),
    ]


def _range_checks(c: RLConfig) -> list:
    return [
        (c.log_every >= 1, "log_every must be >= 1"),
        (c.group_size >= 1, "group_size must be >= 1"),
        (c.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
        (c.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
        (c.gen_block_length >= 1, "gen_block_length must be >= 1"),
        (c.estimator in ESTIMATORS, f"estimator must be one of {', '.join(ESTIMATORS)}, got "
                                    f"{c.estimator!r}"),
        (c.shrinkage >= 0, "shrinkage must be >= 1 (or 0: the paper's default)"),
        (c.num_minibatches >= 1, "num_minibatches must be >= 1"),
        (c.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
        (c.micro_batch_tokens >= 0, "micro_batch_tokens must be >= 0"),
        (c.max_oversample_rounds >= 0, "max_oversample_rounds must be >= 0"),
        (0 <= c.pass_rate_low <= c.pass_rate_high <= 1,
         "need 0 <= pass_rate_low <= pass_rate_high <= 1"),
        (0 <= c.eps_low < 1 and c.eps_high >= 0, "need 0 <= eps_low < 1 and eps_high >= 0"),
        (c.dual_clip == 0 or c.dual_clip > 1, "dual_clip must be 0 (off) or > 1"),
        (c.kl_coef >= 0, "kl_coef must be >= 0"),
        (c.num_masks >= 1, "num_masks must be >= 1"),
        (c.eubo_beta >= 1 and c.eubo_beta < float("inf"),
         "eubo_beta must be a finite number >= 1 (the EUBO is an upper bound for beta >= 1)"),
        (0 <= c.mixture_weight <= 1, "mixture_weight must lie in [0, 1]"),
        (0 <= c.gamma <= 1 and 0 <= c.lam <= 1, "gamma and lam must lie in [0, 1]"),
        (c.vf_clip > 0, "vf_clip must be > 0"),
        (c.loss_normalizer > 0, "loss_normalizer must be > 0"),
        (c.lr > 0 and c.value_lr > 0, "lr and value_lr must be > 0"),
        (c.weight_decay >= 0, "weight_decay must be >= 0"),
        (c.max_grad_norm > 0, "max_grad_norm must be > 0"),
        (c.total_steps >= 0, "total_steps must be >= 0"),
        (c.save_every >= 0 and c.eval_every >= 0, "save_every and eval_every must be >= 0"),
        (c.keep_last >= 0, "keep_last must be >= 0 (0: keep every checkpoint)"),
    ]


def _same(name: str, default):
    """A preset's new default for RLConfig field `name` (its help is kept)."""
    help_ = {f.name: f.metadata for f in dataclasses.fields(RLConfig)}[name]
    return dataclasses.field(default=default, metadata=help_)


@dataclass
class TraceRLConfig(RLConfig):
    """TraceRL: trace rows with shrinkage, groups with pass rate in [0.2, 0.8] (the
    paper's code), clipped surrogate eps 0.2, optional value model (GAE over trace steps)."""

    algo: ClassVar[str] = "tracerl"
    pass_rate_low: float = _same("pass_rate_low", 0.2)
    pass_rate_high: float = _same("pass_rate_high", 0.8)


@dataclass
class DiPOConfig(RLConfig):
    """DiPO: group z-score, clip-higher [0.8, 1.28], KL to a frozen reference (loaded
    only when kl_coef > 0), DAPO dynamic sampling with oversampling, token-mean loss."""

    algo: ClassVar[str] = "dipo"
    eps_high: float = _same("eps_high", 0.28)
    kl_to: str = _same("kl_to", "ref")
    dynamic_sampling: bool = _same("dynamic_sampling", True)


# The baselines (SPEC 4.5): their estimator, otherwise the neutral GRPO-style defaults above
# (not tuned to their papers' runs).
@dataclass
class RandomMaskConfig(RLConfig):
    """Random-masking RL: one noisy copy per completion at t ~ U(eps, 1), GRPO advantages."""

    algo: ClassVar[str] = "random_mask"
    estimator: str = _same("estimator", "random_mask")


@dataclass
class CoupledGRPOConfig(RLConfig):
    """Coupled-GRPO (DiffuCoder): two complementary masks per completion, GRPO advantages."""

    algo: ClassVar[str] = "coupled_grpo"
    estimator: str = _same("estimator", "coupled")


@dataclass
class DiffuGRPOConfig(RLConfig):
    """diffu-GRPO (d1): the whole completion masked, the prompt masked at random (15 %)."""

    algo: ClassVar[str] = "diffu_grpo"
    estimator: str = _same("estimator", "diffu_grpo")


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
    group_size: int = _same("group_size", 6)
    ratio_level: str = _same("ratio_level", "none")
    token_weights: str = _same("token_weights", "elbo")
    likelihood_bound: str = _same("likelihood_bound", "mixture")
    reduction: str = _same("reduction", "seq_mean")


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


# the run file's `algo:` -> its preset (one line per algorithm)
PRESETS: dict[str, type[RLConfig]] = {
    c.algo: c for c in (TraceRLConfig, DiPOConfig, RandomMaskConfig, CoupledGRPOConfig,
                        DiffuGRPOConfig, SPGConfig, BGPOConfig, EBPOConfig)
}
