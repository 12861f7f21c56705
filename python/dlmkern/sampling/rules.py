"""Token choice and unmasking rules shared by the samplers (SPEC 3).

Every rule sees, for the still-masked positions of one block (in position order), the sampled
token, its confidence and the entropy of its distribution, and returns which positions to unmask
at this step. Equal confidences break ties by the lower position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

RULES = ("static", "dynamic", "entropy_bounded", "sequential")
CONFIDENCES = ("prob", "margin", "neg_entropy")


def _help(default, text: str):
    """A dataclass field with its one-line help (printed by `dlmkern config`)."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclass
class SamplingConfig:
    rule: str = _help("static", "unmasking rule: static | dynamic | entropy_bounded | sequential")
    steps: int = _help(4, "denoising steps per block (static / sequential schedules)")
    threshold: float = _help(0.9, "dynamic: unmask every token whose confidence exceeds this")
    entropy_bound: float = _help(1.0, "entropy_bounded: cumulative entropy budget per step")
    temperature: float = _help(1.0, "sampling temperature (0: greedy)")
    top_k: int = _help(0, "keep the k most likely tokens before sampling (0: off)")
    top_p: float = _help(1.0, "nucleus sampling mass (1: off)")
    confidence: str = _help("prob", "what ranks positions: prob | margin (top1 - top2) | "
                            "neg_entropy")
    schedule: str = _help("even", "static counts per step: even (LLaDA) | dream (Dream's "
                          "timesteps)")
    eps: float = _help(1e-3, "Dream's final timestep")
    # logits = uncond + (cfg_scale + 1) * (cond - uncond), uncond = the prompt masked
    cfg_scale: float = _help(0.0, "LLaDA classifier-free guidance, full-attention models (0: off)")
    steps_total: int = _help(0, "LLaDA's `steps` over ALL blocks, split evenly (0: `steps` per "
                             "block, SDAR's convention)")
    max_seqs: int = _help(0, "sequences generated at a time, each chunk with its own KV cache "
                          "(0: all at once; `dlmkern train` sets it from its memory plan)")

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown unmasking rule {self.rule!r}; expected one of {RULES}")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"unknown confidence {self.confidence!r}; expected {CONFIDENCES}")
        if self.schedule not in ("even", "dream"):
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'even' or 'dream'")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        if self.cfg_scale < 0 or self.steps_total < 0 or self.max_seqs < 0:
            raise ValueError(f"cfg_scale, steps_total and max_seqs must be >= 0, got "
                             f"{self.cfg_scale}, {self.steps_total} and {self.max_seqs}")

    def per_block(self, n_blocks: int) -> SamplingConfig:
        """This config with `steps` per block: LLaDA's steps_total split over n_blocks blocks."""
        if not self.steps_total:
            return self
        if self.steps_total % n_blocks:
            raise ValueError(f"steps_total={self.steps_total} must split evenly over the "
                             f"{n_blocks} blocks of the generation (LLaDA's rule)")
        return dataclasses.replace(self, steps=self.steps_total // n_blocks, steps_total=0)


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many tokens each of `steps` steps unmasks so that `masked` tokens are done: an even
    split, the remainder going to the first steps (LLaDA's schedule)."""
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def dream_transfer_count(masked_now: int, step: int, steps: int, eps: float) -> int:
    """Dream's count for step `step`: with timesteps linspace(1, eps, steps + 1),
    int(masked_now * (1 - s / t)), everything left at the last step."""
    if step >= steps - 1:
        return masked_now
    t = 1 + (eps - 1) * step / steps
    s = 1 + (eps - 1) * (step + 1) / steps
    return int(masked_now * (1 - s / t))


class SequenceDraws:
    """The samplers' one source of randomness: a CPU generator per sequence (seeded
    ``seed * 1000003 + index``, or ``seeds[index]``), from which each block takes a fixed number
    of uniforms, so a sequence's tokens do not depend on which other sequences share the batch
    (or the rank). Draws are made on the host and moved to the model's device in one copy: no
    generator ever has to match a device."""

    def __init__(self, n: int, seed: int = 0, seeds: list[int] | None = None):
        self.gens = [torch.Generator(device="cpu").manual_seed(s)
                     for s in sequence_seeds(n, seed, seeds)]

    def block(self, live: list[bool], n_iter: int, width: int, device,
              steps: list[list[int]] | None = None) -> torch.Tensor:
        """Uniforms in (0, 1] of shape [n_iter, len(live), width] on ``device``: fresh draws for
        the first len(self.gens) rows that are live, ones elsewhere (rows past the real
        sequences are padding). `steps` (each iteration's global step) is read by the tree
        draws only (dlmkern.sampling.tree.TreeDraws)."""
        out = torch.ones(n_iter, len(live), width, device="cpu")
        for i, (g, on) in enumerate(zip(self.gens, live, strict=False)):
            if on:
                out[:, i] = 1.0 - torch.rand(n_iter, width, generator=g, device="cpu")
        return out.to(device, non_blocking=True)


def sequence_seeds(n: int, seed: int = 0, seeds: list[int] | None = None) -> list[int]:
    """Each sequence's generator seed (SequenceDraws): `seeds`, else seed * 1000003 + index."""
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} sequences")
    return list(seeds) if seeds is not None else [seed * 1000003 + i for i in range(n)]


def in_chunks(generate_chunk, prompts: list[list[int]], n_samples: int, seed: int,
              seeds: list[int] | None, max_seqs: int, planned=None,
              inpaint: list[dict[int, int] | None] | None = None) -> list:
    """A sampler's generate over (prompt, sample) sequences, at most `max_seqs` at a time (0:
    all): `generate_chunk(prompts, seeds, inpaint)` runs one chunk (its own cache). Each
    sequence keeps its own seed, so the tokens do not depend on the chunking. While dlmkern.plan
    runs, only the first chunk runs: `planned(prompt)` gives the others' worst-case
    trajectories. `inpaint`: per sequence, {response index: token} held fixed (IGPO), or None."""
    from dlmkern._host import planning

    flat = [list(p) for p in prompts for _ in range(n_samples)]
    sd = sequence_seeds(len(flat), seed, seeds)
    given = check_inpaint(inpaint, len(flat))
    step = max_seqs or max(len(flat), 1)
    out = []
    for lo in range(0, len(flat), step):
        if lo and planning() is not None:
            out += [planned(p) for p in flat[lo:]]
            break
        out += generate_chunk(flat[lo:lo + step], sd[lo:lo + step], given[lo:lo + step])
    return out


def check_inpaint(inpaint, n: int) -> list[dict[int, int]]:
    """The sequences' fixed response tokens ({response index: token}, {} for none): a sampler
    writes them into the response before the first step and never masks nor resamples them;
    the trajectory lists them in Trajectory.inpainted."""
    if inpaint is None:
        return [{} for _ in range(n)]
    if len(inpaint) != n:
        raise ValueError(f"inpaint: one entry per (prompt, sample) sequence, {n}; got "
                         f"{len(inpaint)}")
    out = [dict(x or {}) for x in inpaint]
    if any(int(r) < 0 for x in out for r in x):
        raise ValueError("inpaint: response indices must be >= 0")
    return out


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig, mask_token_id: int,
                  uniforms: torch.Tensor | None):
    """logits [n, V] -> (token [n], confidence [n], logprob [n], entropy [n]).

    Confidences are read where the upstream generate functions read them: from
    softmax(logits / temperature) (no division at temperature 0) after top-k / top-p, over the
    FULL vocabulary, mask token included, so the same logits rank the same positions as upstream:
    the chosen token's probability, top-1 minus top-2, or the negative entropy (the entropy is
    that distribution's too). Only the choice of token leaves the mask out: it is drawn from the
    same distribution without the mask (where the filters kept nothing but the mask, from the
    filters applied to the other tokens), so the mask is never produced. ``logprob`` is the
    token's log-probability under softmax(logits / temperature), unfiltered: the policy's
    probability, what the trainer computes. Sampling inverts the CDF at a uniform draw
    (``uniforms`` [n] in (0, 1], any device; see :class:`SequenceDraws`); greedy when
    temperature == 0 (``uniforms`` may then be None). Rows are processed in chunks so that the
    step's fp32 temporaries never exceed two [n, V] buffers (tests/test_rollout_memory.py)."""
    if cfg.temperature > 0:
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != logits.shape[:1]:
            got = getattr(uniforms, "shape", uniforms)
            raise ValueError(f"sample_tokens: temperature {cfg.temperature} needs `uniforms`, a "
                             f"tensor of {logits.shape[0]} draws (see SequenceDraws), got {got}")
        uniforms = uniforms.to(logits.device)
    n = logits.shape[0]
    if n == 0:
        return _sample_rows(logits, cfg, mask_token_id, uniforms)
    rows = max(1, -(-n * _RULE_BUFFERS // _PEAK_BUFFERS))
    parts = [_sample_rows(lg, cfg, mask_token_id, None if uniforms is None else uniforms[lo:])
             for lo, lg in zip(range(0, n, rows), logits.split(rows), strict=True)]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(x) for x in zip(*parts, strict=True))


# The rule step's peak fp32 temporaries, in [rows, V] buffers (measured: 7 at temperature > 0,
# 13.25 with top-k and top-p): sample_tokens takes rows in chunks that keep it under 2 of the
# whole step's buffers (at 8192 rows x 151936 vocabulary, one buffer is 5 GB).
_PEAK_BUFFERS, _RULE_BUFFERS = 14, 2


def _sample_rows(logits, cfg: SamplingConfig, mask_token_id: int, uniforms):
    """sample_tokens on a chunk of rows (`uniforms`: the draws from the chunk's first row on)."""
    tempered = logits.float()
    if cfg.temperature > 0:
        tempered = tempered / cfg.temperature
    z = _top_k_top_p(tempered, cfg)
    logp = torch.log_softmax(z, dim=-1)
    probs = logp.exp()
    choice = z.clone()
    choice[:, mask_token_id] = float("-inf")
    if cfg.top_k > 0 or cfg.top_p < 1.0:  # rows where the filters kept only the mask
        others = tempered.clone()
        others[:, mask_token_id] = float("-inf")
        empty = torch.isneginf(choice).all(-1, keepdim=True)
        choice = torch.where(empty, _top_k_top_p(others, cfg), choice)
    if cfg.temperature == 0:
        token = torch.argmax(choice, dim=-1)
    else:
        cdf = choice.softmax(-1).cumsum(-1)
        u = uniforms[: cdf.shape[0]].to(cdf.dtype)[:, None] * cdf[:, -1:]
        # the first token whose CDF reaches u: never a zero-probability token since u > 0
        token = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    tok_logp = torch.log_softmax(tempered, -1).gather(-1, token[:, None]).squeeze(-1)
    entropy = -(probs * logp.nan_to_num(0.0, neginf=0.0)).sum(-1)
    if cfg.confidence == "prob":
        conf = probs.gather(-1, token[:, None]).squeeze(-1)
    elif cfg.confidence == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    else:
        conf = -entropy
    return token, conf, tok_logp, entropy


def _top_k_top_p(z: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Logits outside the top-k / the smallest prefix reaching top-p set to -inf."""
    if cfg.top_k > 0:
        kth = torch.topk(z, min(cfg.top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_l, idx = torch.sort(z, dim=-1, descending=True)
        p = sorted_l.softmax(-1)
        drop = p.cumsum(-1) - p >= cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, idx, sorted_l)
    return z


def choose_batch(cfg: SamplingConfig, conf: torch.Tensor, entropy: torch.Tensor,
                 masked: torch.Tensor, n_static: torch.Tensor) -> torch.Tensor:
    """Vectorised rule over sequences: conf / entropy / masked [S, B] (positions of each block in
    order), n_static [S] (static / sequential counts). Returns the bool [S, B] of positions to
    unmask; every sequence with a masked position unmasks at least one. No host sync."""
    S, B = masked.shape
    ar = torch.arange(B, device=masked.device).expand(S, B)
    n_masked = masked.sum(1, keepdim=True)
    k = torch.minimum(n_static.to(masked.device)[:, None].clamp(min=1), n_masked)
    if cfg.rule == "sequential":
        rank_pos = masked.long().cumsum(1) - 1
        return masked & (rank_pos < k)
    if cfg.rule == "entropy_bounded":
        key = torch.where(masked, entropy, torch.full_like(entropy, float("inf")))
        order = torch.sort(key, dim=1, stable=True).indices
        sorted_e = torch.where(masked.gather(1, order), key.gather(1, order),
                               torch.zeros_like(key))
        take = ((sorted_e.cumsum(1) <= cfg.entropy_bound) | (ar == 0)) & masked.gather(1, order)
        return torch.zeros_like(masked).scatter(1, order, take)
    # rank by confidence, descending; the stable sort keeps lower positions first on ties
    key = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    order = torch.sort(-key, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, ar)
    if cfg.rule == "static":
        return masked & (rank < k)
    return masked & ((conf > cfg.threshold) | (rank == 0))  # dynamic


def choose(cfg: SamplingConfig, conf: torch.Tensor, entropy: torch.Tensor,
           n_static: int) -> torch.Tensor:
    """Indices (into the masked positions, ascending position order) to unmask at this step."""
    n = conf.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=conf.device)
    sel = choose_batch(cfg, conf[None], entropy[None],
                       torch.ones(1, n, dtype=torch.bool, device=conf.device),
                       torch.tensor([n_static], device=conf.device))[0]
    return sel.nonzero().flatten()
