"""The policy objective as data (SPEC 4.9): one frozen value, built once from the config, handed
whole from the update to the loss op, to its reference and (field by field, in one mapping) to the
fused kernel's arguments.

An ``Objective`` says what the per-token policy loss is:

- ``ratio_level``: the importance ratio of each token. ``token``: exp(logp - old_logp) (PPO /
  GRPO). ``sequence``: exp(mean over the sequence's trained tokens of (logp - old_logp)), one
  ratio and one clip decision per sequence, normalised by its length as GSPO and ESPO do (the
  gradient is GSPO-token's: equal to GSPO's when a sequence's tokens share one advantage).
  ``block``: the same per (sequence, block) group (block ids passed with the tokens). ``copy``
  (BGPO): the same per (sequence, noisy copy), clipped once per copy, and the sequence's
  policy term is the mean over its copies of their clipped terms (every token of the sequence
  carries it; copy ids passed with the tokens). ``elbo`` (EBPO): one ratio per sequence,
  exp of the difference of its Monte Carlo ELBOs, (1/M) sum over its M copies' tokens of
  w * (logp - old_logp) with w = 1/t the token weight (token_weights elbo / block_elbo, read
  as the ELBO's weights, not multiplied onto the loss), clipped once; every token carries the
  sequence's term. ``none``: no ratio and no clip: a weighted likelihood, loss = -A * logp
  (wd1).
- ``ratio_form``: ``exp`` (r = exp(log r)) or ``tangent``: for A > 0, r = 1 + log r, the
  tangent of exp at 1 and a lower bound of it (BGPO; A <= 0 keeps exp).
- ``eps_low`` / ``eps_high``: the ratio clip [1 - eps_low, 1 + eps_high]; ``dual_clip``: c > 1
  bounds the loss of negative advantages by -c * A (0: off).
- ``kl_kind`` / ``kl_coef`` / ``kl_to``: the KL penalty per token, x = target - logp: ``k1`` =
  -x (= logp - target), ``k3`` = exp(x) - x - 1 (x clamped to [-20, 20]), ``quadratic`` =
  0.5 * x^2 (ESPO); against the frozen reference policy (``ref``) or the rollout policy
  (``old``). The update picks the target's log-probs by ``kl_to``; the op sees them as
  ``ref_logp``. ``kl_level``: ``token`` applies the kind to each token's x; ``sequence`` to the
  sequence's x summed over its tokens (each weighted by its token weight) and divides by the
  sum of its weights: kind(S * xbar) / S with xbar the weighted mean of x and S the weight sum,
  one KL per sequence (ESPO's k2 on the ELBO difference, divided by the length: the ELBO
  weights of a sequence sum to its length).
- ``token_weights``: per-token weights multiplying the token's policy loss (pg and KL). ``elbo``:
  1 / t with t the share of the completion its noisy copy masks (random-masking estimators);
  ``block_elbo``: 1 / t_b with t_b the share of the token's block its noisy copy masks (a
  block-diffusion ELBO, one rate per block: EBPO); ``step``: 1 / (tokens trained at that trace
  step, or in that noisy copy), so each step weighs
  as one (TraceRL's per-step normalisation); ``mdpo``: ``elbo``'s n / |M_k| (MDPO's lambda_t)
  times the rollout policy's probability of the token, exp(old logp) (MDPO's confidence weight,
  no gradient); ``none``. Under a sequence / block ratio the
  weights also weigh the group's mean log-ratio, and each token's weight is divided by its
  group's mean weight (mean 1 in the group): with ELBO weights the log-ratio is then the
  ELBO difference / the length and a seq_mean reduction gives exactly one clipped term per
  sequence (ESPO). ``transition``: the step weight times the trajectory's trained tokens / its
  steps (weights average 1 over a trajectory), so under ``reduction=seq_mean`` a trajectory's
  loss is the mean over its steps of each step's token mean (CJ-GRPO's per-transition mean, its
  Eq. 11).
- ``reduction`` / ``loss_normalizer``: token_mean, seq_mean, or sum / loss_normalizer (Dr.GRPO).
- ``temperature``: the sampler's; old, new and reference log-probs are all scored at it (the
  update's log-prob call reads it from here; the loss op receives log-probs already tempered).
- ``likelihood_bound`` (SPG, ``ratio_level=none`` and ``token_weights=elbo`` only): the policy
  term of a sequence is -A times a bound of its log-likelihood computed from ALL its trained
  tokens over its noisy copies (the op then needs each token's copy and position), every token
  of the sequence carrying that one value. ``none``: each token's own term (above). ``elbo``:
  the per-token ELBO (1/M) sum_m (1/|S_m|) sum_{j in S_m} logp_mj over its M copies. ``sandwich``:
  the ELBO for A > 0, for A <= 0 the EUBO (1/beta) mean_{j in J} log((1/M) sum_{m: j in S_m}
  p_mj^beta / t_m), J the positions masked in some copy, t_m = 1 / the copy's elbo weight,
  beta = ``eubo_beta``. ``mixture``: A <= 0 take ``mixture_weight`` * EUBO + (1 -
  mixture_weight) * ELBO.

The names of the fields are the config keys (``temperature`` is ``sampling.temperature``).
The reference backend implements every objective; the fused CPU / CUDA kernel has the arithmetic
of the settings in ``FUSED`` (today every one above; ``Objective.fused``), and
``Objective.path_note`` says, once, when a run's settings take the reference path instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from dlmkern._host import on_host

RATIO_LEVELS = ("token", "block", "sequence", "copy", "elbo", "none")
RATIO_FORMS = ("exp", "tangent")
KL_KINDS = ("k1", "k3", "quadratic")
KL_LEVELS = ("token", "sequence")
KL_TARGETS = ("old", "ref")
TOKEN_WEIGHTS = ("none", "elbo", "block_elbo", "step", "transition", "mdpo")
REDUCTIONS = ("token_mean", "seq_mean", "sum")
LIKELIHOOD_BOUNDS = ("none", "elbo", "sandwich", "mixture")

# What the fused kernel's arithmetic (csrc/include/dlmkern/policy_value_loss.h) covers. A setting
# added to the Objective runs on the reference path until the header has its case and it is
# listed here.
FUSED = {"ratio_level": ("token", "block", "sequence", "none"), "kl_kind": KL_KINDS,
         "kl_level": ("token",), "token_weights": TOKEN_WEIGHTS}


@dataclass(frozen=True)
class Objective:
    """The per-token policy objective (module docstring). Built by ``from_config`` in a trainer,
    or directly; every instance is valid (enums and combinations are checked on construction)."""

    ratio_level: str = "token"
    ratio_form: str = "exp"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 0.0
    kl_kind: str = "k3"
    kl_coef: float = 0.0
    kl_to: str = "old"
    kl_level: str = "token"
    token_weights: str = "none"
    reduction: str = "token_mean"
    loss_normalizer: float = 1.0
    likelihood_bound: str = "none"
    eubo_beta: float = 1.5
    mixture_weight: float = 0.5
    temperature: float = 1.0

    def __post_init__(self):
        bad = [msg for ok, msg in (*checks(self), *_numbers(self)) if not ok]
        if bad:
            raise ValueError(f"dlmkern.Objective: {bad[0]}")

    @classmethod
    def from_config(cls, cfg) -> Objective:
        """The objective of an RLConfig (its keys of the same names; sampling.temperature)."""
        keys = {f.name for f in dataclasses.fields(cls)} - {"temperature"}
        return cls(**{k: getattr(cfg, k) for k in keys}, temperature=cfg.sampling.temperature)

    @property
    def has_ratio(self) -> bool:
        return self.ratio_level != "none"

    @property
    def weighted(self) -> bool:
        """The loss multiplies each token by a weight (the op then needs ``weights``)."""
        return self.token_weights != "none"

    @property
    def over_copies(self) -> bool:
        """The loss groups tokens by noisy copy (copy ratio or likelihood bound): the op then
        needs ``copy_ids`` (and ``positions`` for a bound)."""
        return self.ratio_level in ("copy", "elbo") or self.bounded

    @property
    def bounded(self) -> bool:
        """The policy term is a per-sequence likelihood bound (the op then needs ``copy_ids``
        and ``positions``)."""
        return self.likelihood_bound != "none"

    def unfused(self, kl_term: bool | None = None) -> list[str]:
        """The settings (``key=value``) the fused kernel's arithmetic lacks; empty: it runs
        this objective. The KL kind counts when there is a KL term: ``kl_term`` (the op: a
        ``ref_logp`` was given), by default when kl_coef > 0 (a trainer passes one only then)."""
        kl_term = self.kl_coef > 0 if kl_term is None else kl_term
        out = []
        if self.ratio_level not in FUSED["ratio_level"]:
            out.append(f"ratio_level={self.ratio_level}")
        if kl_term and self.kl_kind not in FUSED["kl_kind"]:
            out.append(f"kl_kind={self.kl_kind}")
        if kl_term and self.kl_level not in FUSED["kl_level"]:
            out.append(f"kl_level={self.kl_level}")
        if self.token_weights not in FUSED["token_weights"]:
            out.append(f"token_weights={self.token_weights}")
        if self.ratio_form != "exp":
            out.append(f"ratio_form={self.ratio_form}")
        if self.bounded:
            out.append(f"likelihood_bound={self.likelihood_bound}")
        return out

    def fused(self, kl_term: bool | None = None) -> bool:
        """Whether the native (CPU / CUDA) op computes this objective (``kl_term``: as for
        ``unfused``); otherwise the loss runs on the reference path (plain torch) whatever the
        backend."""
        return not self.unfused(kl_term)

    def path_note(self) -> str | None:
        """One line for the run's log when the loss runs on the reference path; None when the
        fused kernel covers the objective."""
        gaps = self.unfused()
        if not gaps:
            return None
        return (f"objective: {', '.join(gaps)} {'is' if len(gaps) == 1 else 'are'} not in the "
                "fused policy_value_loss kernel's arithmetic: the policy loss runs on the "
                "reference path (plain torch: the same loss, more memory and time)")


def checks(o) -> list[tuple[bool, str]]:
    """(ok, message) for the objective's enums and combinations, each naming its config keys.
    `o`: an Objective or an RLConfig (the same names)."""
    return [
        (o.ratio_level in RATIO_LEVELS,
         f"ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {o.ratio_level!r}"),
        (o.kl_kind in KL_KINDS, f"kl_kind must be one of {', '.join(KL_KINDS)}, got "
                                f"{o.kl_kind!r}"),
        (o.kl_to in KL_TARGETS, "kl_to must be 'old' or 'ref'"),
        (o.kl_level in KL_LEVELS, f"kl_level must be one of {', '.join(KL_LEVELS)}, got "
                                  f"{o.kl_level!r}"),
        (o.token_weights in TOKEN_WEIGHTS,
         f"token_weights must be one of {', '.join(TOKEN_WEIGHTS)}, got {o.token_weights!r}"),
        (o.reduction in REDUCTIONS, "reduction must be token_mean, seq_mean or sum"),
        (o.ratio_level != "none" or not o.dual_clip,
         f"dual_clip={o.dual_clip:g} bounds a ratio's loss, and ratio_level=none has no ratio "
         "(a weighted likelihood): set dual_clip: 0 or pick a ratio_level"),
        (o.ratio_form in RATIO_FORMS,
         f"ratio_form must be one of {', '.join(RATIO_FORMS)}, got {o.ratio_form!r}"),
        (o.ratio_form == "exp" or o.ratio_level != "none",
         f"ratio_form={o.ratio_form} shapes a ratio, and ratio_level=none has none: set "
         f"ratio_form: exp or pick a ratio_level"),
        (o.ratio_level != "elbo" or o.token_weights in ("elbo", "block_elbo"),
         f"ratio_level=elbo is the ratio of the sequence's ELBOs, which weigh each token by 1/t "
         f"(token_weights elbo or block_elbo), and token_weights={o.token_weights}: set "
         f"token_weights: elbo (or block_elbo) or another ratio_level"),
        (o.ratio_level != "copy" or o.token_weights == "none",
         f"ratio_level=copy gives every token of a sequence the mean of its copies' terms; "
         f"token_weights={o.token_weights} would weigh that sequence value token by token: set "
         f"token_weights: none or another ratio_level"),
        (o.likelihood_bound in LIKELIHOOD_BOUNDS,
         f"likelihood_bound must be one of {', '.join(LIKELIHOOD_BOUNDS)}, got "
         f"{o.likelihood_bound!r}"),
        (o.likelihood_bound == "none" or o.ratio_level == "none",
         f"likelihood_bound={o.likelihood_bound} trains a bound of each sequence's likelihood "
         f"(SPG, no importance ratio) and ratio_level={o.ratio_level} clips a ratio: set "
         f"ratio_level: none or likelihood_bound: none"),
        (o.likelihood_bound == "none" or o.token_weights == "elbo",
         f"likelihood_bound={o.likelihood_bound} reads each noisy copy's mask rate t from the "
         f"elbo token weights (1/t), and token_weights={o.token_weights}: set token_weights: "
         f"elbo or likelihood_bound: none"),
    ]


def _numbers(o: Objective) -> list[tuple[bool, str]]:
    """The numeric ranges (the config checks them first, under its own messages; these name the
    op's arguments as the kernel's own checks do)."""
    finite = math.isfinite
    return [
        (o.eps_low >= 0 and o.eps_high >= 0 and finite(o.eps_low) and finite(o.eps_high),
         f"`eps_low` and `eps_high` must be finite and >= 0, got {o.eps_low}, {o.eps_high}"),
        (o.dual_clip == 0 or o.dual_clip > 1,
         f"`dual_clip` must be > 1 (or 0: off), got {o.dual_clip}"),
        (finite(o.kl_coef), f"`kl_coef` must be finite, got {o.kl_coef}"),
        (o.reduction != "sum" or (o.loss_normalizer > 0 and finite(o.loss_normalizer)),
         f"the sum's divisor `normalizer` must be a finite number > 0 (loss_normalizer), got "
         f"{o.loss_normalizer}"),
        (o.eubo_beta > 0 and finite(o.eubo_beta),
         f"`eubo_beta` must be a finite number > 0, got {o.eubo_beta}"),
        (0 <= o.mixture_weight <= 1, f"`mixture_weight` must lie in [0, 1], got "
                                     f"{o.mixture_weight}"),
        (o.temperature > 0 and finite(o.temperature),
         f"`temperature` must be a finite number > 0, got {o.temperature}"),
    ]


def call_objective(objective: Objective | None, *, eps_low=None, eps_high=None, dual_clip=None,
                   kl_coef=None, reduction=None, normalizer=None) -> Objective:
    """The objective of a policy_value_loss call: `objective`, or the one its loose keywords make
    (token ratio, k3 KL, no weights; the Objective's defaults for keywords not given). Both:
    TypeError, naming the keywords."""
    given = {"eps_low": eps_low, "eps_high": eps_high, "kl_coef": kl_coef,
             "reduction": reduction, "loss_normalizer": normalizer,
             "dual_clip": None if dual_clip is None else float(dual_clip)}
    given = {k: v for k, v in given.items() if v is not None}
    if objective is None:
        return Objective(**given)
    if given:
        names = sorted("normalizer" if k == "loss_normalizer" else k for k in given)
        raise TypeError(f"dlmkern.policy_value_loss: pass the policy settings in `objective` or "
                        f"as keywords, not both (got `objective` and {', '.join(names)})")
    if not isinstance(objective, Objective):
        raise TypeError(f"dlmkern.policy_value_loss: `objective` must be a dlmkern.ops.Objective, "
                        f"got {type(objective).__name__}")
    return objective


# ---- the per-token inputs an objective reads from the rows -------------------------------------


def token_weights(kind: str, traj: torch.Tensor, step: torch.Tensor,
                  gen_lengths: torch.Tensor,
                  copy_weight: torch.Tensor | None = None, *, blocks: torch.Tensor | None = None,
                  block_lengths: torch.Tensor | None = None,
                  old_logp: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per trained token, its weight under ``token_weights=kind`` (None for ``none``). Tokens are
    grouped by (trajectory, Rows.step): a trace step's tokens, or one noisy copy's. ``step``:
    1 / (the group's size). ``elbo``: w / t with t = the group's size / the trajectory's
    generated length (``gen_lengths[traj]``): the share its noisy copy masks, and w the copy's
    weight in the ELBO estimate (``copy_weight``, Rows.copy_weight: a quadrature weight, 1/M of
    M Monte Carlo copies; None: 1), so that sum(weight * logp) over a trajectory's tokens is its
    ELBO estimate. ``block_elbo``: groups also by block (``blocks``, per token), t = the group's
    size / the block's generated tokens (``block_lengths``, per token). ``transition``: (the
    trajectory's tokens here) / (its groups here * the group's size): every group of a
    trajectory carries the same total weight, and the weights average 1 over the trajectory.
    ``mdpo``: ``elbo``'s weight times exp(old_logp) (per token, the rollout policy's log-prob)."""
    if kind == "none":
        return None
    if kind == "mdpo":
        if old_logp is None:
            raise ValueError("token_weights=mdpo needs old_logp (the rollout policy's log-probs)")
        # the groups are host bookkeeping (real tensors even while dlmkern.plan fakes the rest)
        w = on_host(token_weights)("elbo", traj, step, gen_lengths).to(old_logp.device)
        return w * old_logp.detach().float().exp()
    key = traj * (int(step.max()) + 1 if step.numel() else 1) + step
    if kind == "block_elbo":
        key = key * (int(blocks.max()) + 1 if blocks.numel() else 1) + blocks
    uniq, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    size = counts[inverse].to(torch.float32)
    if kind == "step":
        return 1.0 / size
    if kind == "elbo":
        w = gen_lengths[traj].to(torch.float32) / size
        return w if copy_weight is None else w * copy_weight.to(w)
    if kind == "transition":
        n_traj = int(traj.max()) + 1 if traj.numel() else 0
        span = int(step.max()) + 1 if step.numel() else 1
        steps_of = torch.bincount(torch.div(uniq, span, rounding_mode="floor"), minlength=n_traj)
        tokens_of = torch.bincount(traj, minlength=n_traj)
        return tokens_of[traj].to(torch.float32) / (steps_of[traj].to(torch.float32) * size)
    if kind == "block_elbo":
        return block_lengths.to(torch.float32) / size
    raise ValueError(f"token_weights must be one of {', '.join(TOKEN_WEIGHTS)}, got {kind!r}")


def response_blocks(gen_index: torch.Tensor, prompt_len: torch.Tensor,
                    block_size: int | None, gen_block_length: int) -> torch.Tensor:
    """Per trained token, the block that holds it (``ratio_level=block``): block models, the
    absolute block of its position (prompt_len + gen_index) // block_size, as the sampler and the
    rows align blocks; full-attention models, the sampler's semi-autoregressive block
    gen_index // gen_block_length."""
    if block_size is None:
        return gen_index // gen_block_length
    return (prompt_len + gen_index) // block_size


def response_block_lengths(gen_index: torch.Tensor, prompt_len: torch.Tensor,
                           gen_len: torch.Tensor, block_size: int | None,
                           gen_block_length: int) -> torch.Tensor:
    """Per trained token, how many generated tokens its block (``response_blocks``) holds."""
    blk = response_blocks(gen_index, prompt_len, block_size, gen_block_length)
    if block_size is None:
        return torch.minimum((blk + 1) * gen_block_length, gen_len) - blk * gen_block_length
    return (torch.minimum((blk + 1) * block_size, prompt_len + gen_len)
            - torch.maximum(blk * block_size, prompt_len))
