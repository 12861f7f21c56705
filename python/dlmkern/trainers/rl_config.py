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

from dlmkern.models.lora import LoRAConfig
from dlmkern.ops.objective import REDUCTIONS
from dlmkern.ops.objective import checks as objective_checks
from dlmkern.rl.advantages import ADVANTAGES
from dlmkern.rl.estimators import ESTIMATORS
from dlmkern.rl.estimators import get as get_estimator
from dlmkern.rl.estimators import readers as estimator_readers
from dlmkern.sampling.rules import SamplingConfig
from dlmkern.trainers.config import LORA_HELP, DataConfig, check_all, check_types, policy_checks
from dlmkern.trainers.config import help_field as opt


@dataclass
class RLConfig(DataConfig):
    """The RL loop's settings with neutral defaults (GRPO-style, trace rows, no filter)."""

    algo: ClassVar[str] = "rl"
    # its sampling is the algorithm (JustGRPO decodes one token per step): its rollout budget
    # cannot equal the others', so `dlmkern compare` runs it only when named
    own_sampling: ClassVar[bool] = False
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
    num_masks: int = opt(1, "estimators elbo_mc / blockwise / stratified / block_stratified: "
                         "noisy copies (Monte Carlo samples of the ELBO) per completion")
    mask_coupling: str = opt("independent", "estimator elbo_mc: independent masks | "
                             "complementary (each mask and its complement, 2 copies per mask)")
    quadrature_nodes: int = opt(3, "estimator quadrature: Gauss-Legendre nodes t_k (one copy "
                                "masking round(t_k n) tokens each)")
    shrinkage: int = opt(0, "trace shrinkage s (0: the paper's, 1 for block models, 8 for "
                         "full attention)")
    advantage: str = opt("zscore", "per-completion advantage from the group's rewards: zscore "
                         "((r - mean) / std, GRPO) | wd1 (wd1's weights softmax(wd1_psi * A) - "
                         "softmax(-wd1_psi * A), A = r - mean; needs ratio_level: none) | mdpo "
                         "(step-level: the completion decoded at every sampler step is "
                         "rewarded, MDPO; needs estimator: mdpo, full-attention models)")
    wd1_psi: float = opt(1.0, "advantage=wd1: the softmax's inverse temperature psi")
    tree_depth: int = opt(0, "d-TreeRPO tree rollouts: levels of the tree (its branch steps "
                          "cut the step budget into tree_depth equal segments; 0: off, plain "
                          "group_size samples); needs estimator: tree and advantage: tree")
    tree_roots: int = opt(4, "tree rollouts: children of the root (the paper's "
                          "num_tree_samples)")
    tree_branching: int = opt(4, "tree rollouts: children of every inner node below the root "
                              "(the paper's T)")
    mdpo_train_steps: int = opt(0, "advantage=mdpo: train the steps of largest summed "
                                "|advantage| over the batch, this many (0: every step)")
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
    inpaint_column: str = opt("", "IGPO: the data column holding each prompt's reference "
                              "solution; a group whose completions all fail (reward < "
                              "pass_threshold) is re-sampled with chunks of it inpainted (fixed, "
                              "never trained) and passing ones replace failed ones ('': off)")
    inpaint_replacements: int = opt(4, "IGPO: passing inpainted completions that replace an "
                                    "all-fail group's first completions, at most")
    inpaint_share_low: float = opt(0.2, "IGPO: share of the solution's chunks revealed, drawn "
                                   "uniformly in [low, high] per re-sampled completion")
    inpaint_share_high: float = opt(0.6, "IGPO: see inpaint_share_low")
    inpaint_chunk_min: int = opt(5, "IGPO: the solution is cut into chunks of min..max tokens")
    inpaint_chunk_max: int = opt(10, "IGPO: see inpaint_chunk_min")
    # policy loss: these keys (and sampling.temperature) are the Objective (dlmkern.ops.objective)
    ratio_level: str = opt("token", "importance ratio per: token | block | sequence (GSPO: "
                           "exp of the mean log-ratio) | copy (per noisy copy, its terms "
                           "averaged per sequence: BGPO) | elbo (per sequence, exp of its "
                           "ELBO difference: EBPO) | none (weighted likelihood, wd1); "
                           "copy and elbo run the loss on the reference path")
    ratio_form: str = opt("exp", "exp | tangent (A > 0: ratio 1 + log r, BGPO's lower bound); "
                          "tangent runs the loss on the reference path")
    reduction: str = opt("token_mean", "loss reduction: " + " | ".join(REDUCTIONS))
    loss_normalizer: float = opt(1.0, "reduction=sum: the constant divisor (Dr.GRPO)")
    eps_low: float = opt(0.2, "ratio clip below: 1 - eps_low")
    eps_high: float = opt(0.2, "ratio clip above: 1 + eps_high (clip-higher when > eps_low)")
    dual_clip: float = opt(0.0, "dual-clip constant c > 1 for negative advantages (0: off)")
    kl_coef: float = opt(0.0, "KL coefficient beta (0: no KL term)")
    kl_kind: str = opt("k3", "KL estimator: k1 (logp - target) | k3 (exp(x) - x - 1) | "
                       "quadratic (0.5 (logp - target)^2, ESPO)")
    kl_to: str = opt("old", "KL target: old (rollout policy) | ref (frozen initial policy)")
    kl_level: str = opt("token", "KL per: token | sequence (the kind of the sequence's weighted "
                        "log-ratio sum, over its weight sum: ESPO); sequence runs the loss on "
                        "the reference path")
    token_weights: str = opt("none", "per-token loss weights: none | elbo (w/t, t the share its "
                             "noisy copy masks, w its ELBO weight: 1, or elbo_mc's 1/M, "
                             "quadrature's w_k) | block_elbo (1/t of its block: block "
                             "models) | step (1 / tokens of its trace step or copy) | "
                             "transition (step, rescaled to mean 1 per trajectory: with "
                             "reduction seq_mean, each step weighs as one in its trajectory's "
                             "mean, CJ-GRPO) | mdpo (n / |M_k| times the token's rollout "
                             "probability exp(old logp): MDPO's lambda_t and confidence; "
                             "estimator mdpo)")
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
    lora: LoRAConfig = dataclasses.field(
        default_factory=LoRAConfig,
        metadata={"help": LORA_HELP + "; kl_to: ref is the model with its adapters disabled"})
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

    def tree_factors(self) -> tuple[int, ...]:
        """Children per node at each depth of a tree rollout (() when tree_depth is 0)."""
        return (self.tree_roots, *[self.tree_branching] * (self.tree_depth - 1)) \
            if self.tree_depth > 0 else ()

    def tree_spec(self, block_size: int | None = None):
        """The tree of tree rollouts (dlmkern.sampling.tree.TreeSpec), None when tree_depth is 0:
        tree_roots children at the root, tree_branching below, branch steps k * S / tree_depth
        (k = 1..depth-1) of the step budget S = steps per block x blocks of max_new_tokens
        (blocks of `block_size` for block models, of gen_block_length for full attention)."""
        if self.tree_depth <= 0:
            return None
        from dlmkern.sampling.tree import TreeSpec

        width = block_size or max(min(self.gen_block_length, self.max_new_tokens), 1)
        n_blocks = -(-self.max_new_tokens // width)
        steps = self.sampling.steps if block_size else self.sampling.per_block(n_blocks).steps
        D = self.tree_depth
        return TreeSpec(self.tree_factors(), tuple(steps * n_blocks * k // D for k in range(1, D)))

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
            *_advantage_checks(self, valued),
            *_tree_checks(self),
            *_inpaint_checks(self),
            *_scored_sampling(self.sampling),
            *_estimator_checks(self),
            *policy_checks(self),
            *objective_checks(self),
            *self.lora.checks(),
            (self.token_weights not in ("elbo", "block_elbo") or
             self.estimator not in ESTIMATORS or not get_estimator(self.estimator).trace_steps,
             f"token_weights={self.token_weights} weights a token by 1/t, t the share of the "
             f"completion its noisy copy masks; estimator={self.estimator} trains only one "
             f"trace step of each copy (t is not that share): use a random-masking estimator "
             f"(random_mask, coupled) or token_weights: step"),
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
        self.lora.check_model(model_config)
        if model_config.block_causal and (self.sampling.cfg_scale or self.sampling.steps_total):
            raise ValueError("config: sampling.cfg_scale and sampling.steps_total are LLaDA's "
                             "(full-attention models); this model is block-causal")
        if model_config.block_causal and (self.advantage == "mdpo" or self.estimator == "mdpo"):
            raise ValueError(
                f"config: advantage={self.advantage} / estimator={self.estimator} reward the "
                f"completion decoded from every sampler step's state (MDPO); a block-causal "
                f"model's state at a step holds no later blocks (they are generated after it), "
                f"so that completion would stop at the current block: use a full-attention "
                f"model (LLaDA / Dream)")
        per_block = self.token_weights == "block_elbo" or self.estimator == "block_stratified"
        if not model_config.block_causal and per_block:
            raise ValueError(
                f"config: token_weights={self.token_weights} / estimator={self.estimator} "
                f"estimate a block-diffusion ELBO (each block at its own rate, given the clean "
                f"blocks before it: EBPO); this model is full-attention, its ELBO has one rate "
                f"per copy: use token_weights: elbo with estimator stratified or random_mask "
                f"(e.g. algo: bgpo)")


# RLConfig keys that only estimators read (dlmkern.rl.estimators.from_config passes each to the
# estimators with a field of that name)
ESTIMATOR_KEYS = ("num_masks", "mask_coupling", "quadrature_nodes")


def _estimator_checks(c: RLConfig) -> list:
    """An estimator option set away from its default for an estimator that does not read it does
    nothing: refuse it, naming both keys; the options' own ranges."""
    defaults = {f.name: f.default for f in dataclasses.fields(RLConfig)}
    out = []
    for k in ESTIMATOR_KEYS:
        readers = estimator_readers(k)
        out.append((getattr(c, k) == defaults[k] or c.estimator in readers or
                    c.estimator not in ESTIMATORS,
                    f"{k}={getattr(c, k)} is an option of estimator {' / '.join(readers)}, and "
                    f"estimator={c.estimator} does not read it: set estimator: {readers[0]}, or "
                    f"{k}: {defaults[k]}"))
    return out + [
        (c.num_masks >= 1, "num_masks must be >= 1"),
        (c.mask_coupling in ("independent", "complementary"),
         f"mask_coupling must be independent or complementary, got {c.mask_coupling!r}"),
        (1 <= c.quadrature_nodes <= 64, "quadrature_nodes must lie in [1, 64]"),
        (c.estimator != "quadrature" or c.token_weights == "elbo",
         f"estimator=quadrature's copies are quadrature nodes, meaningful only with their ELBO "
         f"weights w_k / t_k; token_weights={c.token_weights} drops them: set token_weights: "
         f"elbo"),
    ]


def _advantage_checks(c: RLConfig, valued: bool) -> list:
    """wd1's weights are the weights of a weighted likelihood (no ratio), over the group."""
    return [
        (c.advantage in ADVANTAGES,
         f"advantage must be one of {', '.join(ADVANTAGES)}, got {c.advantage!r}"),
        (c.wd1_psi > 0, f"wd1_psi must be > 0, got {c.wd1_psi}"),
        (c.advantage != "wd1" or c.ratio_level == "none",
         f"advantage=wd1 weights each completion's log-likelihood (wd1 has no importance "
         f"ratio); ratio_level={c.ratio_level} would clip a ratio times those weights: set "
         f"ratio_level: none"),
        (c.advantage != "wd1" or not valued,
         "advantage=wd1 is a group weight, and use_value_model replaces the group advantages by "
         "GAE over trace steps: use one or the other"),
        *_step_advantage_checks(c),
    ]


def _step_advantage_checks(c: RLConfig) -> list:
    """MDPO's step-level advantages index the rows of its own estimator by sampler step (a value
    model is refused by the estimator check: its GAE needs trace rows)."""
    mdpo = c.advantage == "mdpo"
    return [
        (mdpo == (c.estimator == "mdpo"),
         f"advantage=mdpo (one advantage per sampler step) and estimator=mdpo (one noisy copy "
         f"per sampler step, trained on that step's decoded completion) go together; got "
         f"advantage={c.advantage} and estimator={c.estimator}: set both to mdpo or neither"),
        (not mdpo or not c.inpaint_column,
         f"advantage=mdpo and inpaint_column={c.inpaint_column!r} (IGPO's re-sampling with "
         f"hints): its step rewards would mix hinted and plain steps; set inpaint_column: ''"),
        (c.mdpo_train_steps >= 0, "mdpo_train_steps must be >= 0 (0: every step)"),
        (mdpo or c.mdpo_train_steps == 0,
         f"mdpo_train_steps={c.mdpo_train_steps} selects sampler steps of advantage=mdpo, and "
         f"advantage={c.advantage} has none: set advantage: mdpo, or mdpo_train_steps: 0"),
        (c.token_weights != "mdpo" or c.estimator == "mdpo",
         f"token_weights=mdpo is MDPO's n / |M_k| times the token's probability, |M_k| the "
         f"positions masked at step k, all trained by estimator=mdpo only; estimator="
         f"{c.estimator} trains other tokens: set estimator: mdpo or another token_weights"),
    ]


def _tree_checks(c: RLConfig) -> list:
    """Tree rollouts (d-TreeRPO) come with their segments and their local advantages (a value
    model is refused by the estimator check: tree rows have no trace steps)."""
    on = c.tree_depth > 0
    leaves = c.tree_roots * c.tree_branching ** max(c.tree_depth - 1, 0)
    n_blocks = -(-c.max_new_tokens // max(min(c.gen_block_length, c.max_new_tokens), 1))
    steps = (c.sampling.steps_total or c.sampling.steps * n_blocks)
    return [
        (c.tree_depth >= 0 and c.tree_roots >= 2 and c.tree_branching >= 2,
         f"need tree_depth >= 0, tree_roots >= 2 and tree_branching >= 2 (a node's local "
         f"advantage compares it with its siblings), got {c.tree_depth}, {c.tree_roots} and "
         f"{c.tree_branching}"),
        (on == (c.estimator == "tree"),
         f"estimator={c.estimator} with tree_depth={c.tree_depth}: tree rollouts train their "
         f"segments (estimator: tree), and estimator tree needs tree rollouts (tree_depth > 0)"),
        (on == (c.advantage == "tree"),
         f"advantage={c.advantage} with tree_depth={c.tree_depth}: tree rollouts take the tree's "
         f"local advantages (advantage: tree), and advantage tree needs tree_depth > 0"),
        (not on or c.group_size == leaves,
         f"group_size={c.group_size} must be the tree's leaf count tree_roots x tree_branching^"
         f"(tree_depth - 1) = {c.tree_roots} x {c.tree_branching}^{c.tree_depth - 1} = {leaves}"),
        (not on or c.sampling.rule in ("static", "sequential"),
         f"tree_depth={c.tree_depth} branches at fixed steps of a fixed schedule; "
         f"sampling.rule={c.sampling.rule} takes as many steps as it needs: use sampling.rule: "
         f"static"),
        (not on or steps >= c.tree_depth,
         f"tree_depth={c.tree_depth} needs at least as many sampler steps (sampling.steps x "
         f"blocks = {steps})"),
        (not on or not c.inpaint_column, f"tree_depth={c.tree_depth} with inpaint_column="
         f"{c.inpaint_column!r}: IGPO's re-sampling does not keep a tree: use one or the other"),
    ]


def _inpaint_checks(c: RLConfig) -> list:
    return [
        (0 <= c.inpaint_share_low <= c.inpaint_share_high <= 1,
         f"need 0 <= inpaint_share_low <= inpaint_share_high <= 1, got "
         f"{c.inpaint_share_low} and {c.inpaint_share_high}"),
        (1 <= c.inpaint_chunk_min <= c.inpaint_chunk_max,
         f"need 1 <= inpaint_chunk_min <= inpaint_chunk_max, got {c.inpaint_chunk_min} and "
         f"{c.inpaint_chunk_max}"),
        (c.inpaint_replacements >= 0, "inpaint_replacements must be >= 0"),
        (not c.inpaint_column or c.inpaint_replacements <= c.group_size,
         f"inpaint_replacements={c.inpaint_replacements} must be <= group_size="
         f"{c.group_size} (it replaces completions of one group)"),
    ]


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


def preset_default(name: str, default):
    """A preset's new default for RLConfig field `name` (its help is kept)."""
    help_ = {f.name: f.metadata for f in dataclasses.fields(RLConfig)}[name]
    return dataclasses.field(default=default, metadata=help_)


def preset_sampling(**settings):
    """A preset's default sampling: SamplingConfig(**settings) (the field's help is kept)."""
    help_ = {f.name: f.metadata for f in dataclasses.fields(RLConfig)}["sampling"]
    return dataclasses.field(default_factory=lambda: SamplingConfig(**settings), metadata=help_)
