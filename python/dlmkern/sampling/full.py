"""Full-attention sampler for LLaDA / Dream (SPEC 3): semi-autoregressive blocks over a
bidirectional model, the same unmasking rules as the block sampler, and an optional prefix
cache (Fast-dLLM style, refreshed at every block).

Blocks count from the end of the prompt (LLaDA's `generate`): the canvas is the prompt followed by
`gen_length` mask tokens, and block b covers canvas positions P + b*block_length onward.
"""

from __future__ import annotations

import torch

from dlmkern.models.transformer import DiffusionLM, KVCache
from dlmkern.ops import layouts
from dlmkern.sampling.block import Trajectory
from dlmkern.sampling.rules import (
    SamplingConfig,
    SequenceDraws,
    choose,
    dream_transfer_count,
    sample_tokens,
    transfer_schedule,
)


class FullSampler:
    """``FullSampler(model, SamplingConfig(...), gen_length=..., block_length=...)``;
    ``generate(prompts, n_samples=1, seed=0)`` -> list of :class:`Trajectory`.

    ``use_cache=False`` runs the whole canvas every step (LLaDA / Dream reference behaviour);
    ``use_cache=True`` caches the k / v of everything before the current block at the start of
    each block and then runs only [current block | later positions] per step."""

    def __init__(self, model: DiffusionLM, config: SamplingConfig | None = None, *,
                 gen_length: int = 64, block_length: int = 32, eos_token_id: int | None = None,
                 use_cache: bool = False):
        if model.config.block_causal:
            raise ValueError("FullSampler is for full-attention models; use BlockSampler")
        if gen_length < 1 or block_length < 1:
            raise ValueError("gen_length and block_length must be >= 1")
        self.model, self.cfg = model, config or SamplingConfig()
        self.gen_length, self.block_length = gen_length, block_length
        self.eos, self.use_cache = eos_token_id, use_cache
        self.mask_id = model.config.mask_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n_samples: int = 1, seed: int = 0,
                 seeds: list[int] | None = None):
        """Like BlockSampler.generate (one generator per sequence)."""
        device = next(self.model.parameters()).device
        prompts = [list(p) for p in prompts for _ in range(n_samples)]
        draws = SequenceDraws(len(prompts), seed, seeds)
        canvases = [p + [self.mask_id] * self.gen_length for p in prompts]
        trajs = [Trajectory(p, [self.mask_id] * self.gen_length, [-1] * self.gen_length,
                            [0.0] * self.gen_length) for p in prompts]
        step = [0] * len(prompts)
        done = [False] * len(prompts)
        n_blocks = (self.gen_length + self.block_length - 1) // self.block_length
        for b in range(n_blocks):
            lo = b * self.block_length
            hi = min(lo + self.block_length, self.gen_length)
            todo = [set() if done[i] else set(range(len(p) + lo, len(p) + hi))
                    for i, p in enumerate(prompts)]
            counts = [transfer_schedule(len(t), self.cfg.steps) for t in todo]
            cache, start = self._refresh_cache(canvases, prompts, lo, device)
            # every draw of the block up front: a fixed count per sequence (static rules finish
            # in `steps` steps, the others unmask at least one position per step)
            n_iter = self.cfg.steps if self.cfg.rule in ("static", "sequential") else hi - lo
            uniforms = (draws.block([bool(t) for t in todo], n_iter, hi - lo, device)
                        if self.cfg.temperature > 0 else None)
            k = 0
            while any(todo):
                logits = self._logits(canvases, cache, start, lo, hi, prompts, device)
                for i, t in enumerate(todo):
                    if not t:
                        continue
                    masked = sorted(t)
                    rows = [pos - len(prompts[i]) - lo for pos in masked]
                    u = None if uniforms is None else uniforms[min(k, n_iter - 1), i, rows]
                    tok, conf, lp, ent = sample_tokens(logits[i][rows], self.cfg, self.mask_id,
                                                       u)
                    if self.cfg.schedule == "dream":
                        n = dream_transfer_count(len(masked), k, self.cfg.steps, self.cfg.eps)
                    else:
                        n = counts[i][k] if k < len(counts[i]) else len(masked)
                    if n == 0 and self.cfg.rule in ("static", "sequential"):
                        continue  # this step unmasks nothing for this sequence (schedule)
                    for j in choose(self.cfg, conf.cpu(), ent.cpu(), n).tolist():
                        pos = masked[j]
                        canvases[i][pos] = int(tok[j])
                        t.discard(pos)
                        g = pos - len(prompts[i])
                        trajs[i].token_ids[g], trajs[i].step_map[g] = int(tok[j]), step[i]
                        trajs[i].logprobs[g] = float(lp[j])
                    step[i] += 1
                k += 1
            for i, p in enumerate(prompts):
                if not done[i] and self.eos is not None and \
                        self.eos in canvases[i][len(p) + lo:len(p) + hi]:
                    done[i] = True
        for t in trajs:
            if self.eos is not None and self.eos in t.token_ids:
                n = t.token_ids.index(self.eos) + 1
                t.token_ids, t.step_map = t.token_ids[:n], t.step_map[:n]
                t.logprobs = t.logprobs[:n]
                t.finish_reason = "eos"
        return trajs

    def _refresh_cache(self, canvases, prompts, lo, device):
        """Prefix cache of everything before the current block (Dream: before the position
        that predicts the block's first token)."""
        if not self.use_cache:
            return None, None
        shift = 1 if self.model.config.logits_shift else 0
        start = [len(p) + lo - shift for p in prompts]
        max_len = max(len(c) for c in canvases)
        cache = KVCache.empty(self.model.config, len(canvases), max_len, device,
                              next(self.model.parameters()).dtype)
        ids = torch.tensor([t for c, s in zip(canvases, start, strict=True) for t in c[:s]],
                           device=device)
        cu = torch.tensor(layouts.offsets(start), dtype=torch.int32, device=device)
        self.model.prefill(ids, cu, cache)
        return cache, start

    def _logits(self, canvases, cache, start, lo, hi, prompts, device):
        """Per sequence, logits [hi - lo, V] of the current block's positions only (the rest of
        the canvas is run through the model but never projected onto the vocabulary)."""
        m = self.model
        if cache is None:
            lens = [len(c) for c in canvases]
            lay = layouts.full(lens).to(device)
            ids = torch.tensor([t for c in canvases for t in c], device=device)
            h = m.prediction_hidden(m(ids, lay), lay.cu_seqlens)
            first = [o + len(p) + lo for o, p in zip(layouts.offsets(lens), prompts, strict=False)]
        else:
            segs = [c[s:] for c, s in zip(canvases, start, strict=True)]
            lens = [len(x) for x in segs]
            ids = torch.tensor([t for x in segs for t in x], device=device)
            pos = torch.tensor([i for s, c in zip(start, canvases, strict=True)
                                for i in range(s, len(c))], device=device)
            cu = torch.tensor(layouts.offsets(lens), dtype=torch.int32, device=device)
            h = m.decode(ids, pos, cu, cache)
            if m.config.logits_shift:  # row r predicts the next position: shift in the segment
                h = m.prediction_hidden(h, cu)
            offs = cu[:-1].tolist()
            first = [o + len(p) + lo - s for o, p, s in zip(offs, prompts, start, strict=True)]
        n = hi - lo
        rows = torch.tensor([f + j for f in first for j in range(n)], device=device)
        return list(m.logits(h[rows]).split(n))
