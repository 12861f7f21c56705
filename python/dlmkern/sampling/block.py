"""Block-diffusion sampler for SDAR / TraDo with a KV cache (SPEC 3).

Prompts are prefilled block-causally (whole blocks only); then, block by block, the current block
of every sequence is denoised against the cache with decode_attention and its clean k / v are
committed. Blocks are aligned to absolute positions, exactly as the trainer aligns them: a prompt
ending mid-block starts the first generated block mid-block (its prompt tail is part of the block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dlmkern.models.transformer import DiffusionLM, KVCache
from dlmkern.ops import layouts
from dlmkern.sampling.rules import SamplingConfig, choose, sample_tokens, transfer_schedule


def sequence_generators(n: int, seed: int, seeds: list[int] | None, device):
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} sequences")
    return [torch.Generator(device=device).manual_seed(
        seeds[i] if seeds is not None else seed * 1000003 + i) for i in range(n)]


@dataclass
class Trajectory:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # generated tokens (never re-tokenized)
    step_map: list[int] = field(default_factory=list)    # global denoising step of each token
    logprobs: list[float] = field(default_factory=list)  # sampler log-prob of each chosen token
    finish_reason: str = "length"                         # "eos" or "length"


@dataclass
class _Seq:
    traj: Trajectory
    tokens: list[int]      # prompt + generated so far
    limit: int             # prompt length + max_new_tokens
    step: int = 0          # next global step id
    done: bool = False


class BlockSampler:
    """``BlockSampler(model, SamplingConfig(...), max_new_tokens=..., eos_token_id=...)``;
    ``generate(prompts, n_samples=1, seed=0)`` returns one :class:`Trajectory` per sample.
    ``use_cache=False`` recomputes the whole sequence block-causally at every step (the
    reference the cached path must match, and the uncached baseline of the benchmark)."""

    def __init__(self, model: DiffusionLM, config: SamplingConfig | None = None, *,
                 max_new_tokens: int = 64, eos_token_id: int | None = None,
                 use_cache: bool = True):
        if not model.config.block_causal:
            raise ValueError("BlockSampler needs a block-diffusion (SDAR) model; use FullSampler")
        self.model, self.cfg = model, config or SamplingConfig()
        self.max_new_tokens, self.eos, self.use_cache = max_new_tokens, eos_token_id, use_cache
        self.B = model.config.block_size
        self.mask_id = model.config.mask_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n_samples: int = 1, seed: int = 0,
                 seeds: list[int] | None = None):
        """One trajectory per (prompt, sample). Each sequence draws from its own generator
        (seeded `seed * 1000003 + index`, or `seeds[index]`), so a sequence's tokens do not
        depend on which other sequences share the batch (or the rank)."""
        device = next(self.model.parameters()).device
        seqs = [_Seq(Trajectory(list(p)), list(p), len(p) + self.max_new_tokens)
                for p in prompts for _ in range(n_samples)]
        gens = sequence_generators(len(seqs), seed, seeds, device)
        cache = None
        if self.use_cache:
            max_len = max(s.limit for s in seqs) + self.B
            dtype = next(self.model.parameters()).dtype
            cache = KVCache.empty(self.model.config, len(seqs), max_len, device, dtype)
            starts = [(len(s.tokens) // self.B) * self.B for s in seqs]
            ids = torch.tensor([t for s, n in zip(seqs, starts, strict=True) for t in s.tokens[:n]],
                               dtype=torch.long, device=device)
            cu = torch.tensor([0, *torch.tensor(starts).cumsum(0).tolist()], dtype=torch.int32,
                              device=device)
            self.model.prefill(ids, cu, cache)
        while not all(s.done for s in seqs):
            self._block(seqs, cache, gens, device)
        return [s.traj for s in seqs]

    def _block(self, seqs, cache, gens, device):
        B = self.B
        # Current block of each sequence: [start, end) with start = the first ungenerated block's
        # start (done sequences keep an empty block so cache rows stay aligned).
        spans = []
        for s in seqs:
            start = (len(s.tokens) // B) * B
            end = min(start + B, s.limit)
            spans.append((start, end) if not s.done else (start, start))
        for s, (_, end) in zip(seqs, spans, strict=True):
            s.tokens.extend([self.mask_id] * (end - len(s.tokens)))
        # Generated positions only: a prompt tail in the block is never re-sampled.
        todo = [set(range(max(a, len(s.traj.prompt_ids)), e))
                for s, (a, e) in zip(seqs, spans, strict=True)]
        schedules = [transfer_schedule(len(t), self.cfg.steps) for t in todo]
        step_in_block = 0
        while True:
            masked = [sorted(t) for t in todo]
            if not any(masked):
                break
            logits = self._block_logits(seqs, spans, cache, device)
            for j, s in enumerate(seqs):
                if not masked[j]:
                    continue
                a, _ = spans[j]
                rows = torch.tensor([i - a for i in masked[j]], device=device)
                rows = rows + self._offset(spans, j)
                tok, conf, lp, ent = sample_tokens(logits[rows], self.cfg, self.mask_id, gens[j])
                sched = schedules[j]
                n_static = sched[step_in_block] if step_in_block < len(sched) else len(masked[j])
                for k in choose(self.cfg, conf.cpu(), ent.cpu(), n_static).tolist():
                    pos = masked[j][k]
                    s.tokens[pos] = int(tok[k])
                    todo[j].discard(pos)
                    self._record(s, pos, float(lp[k]))
                s.step += 1
            step_in_block += 1
        if cache is not None:
            ids, pos, cu = self._pack(seqs, spans, device)
            self.model.decode(ids, pos, cu, cache, commit=True)
        for s, (a, e) in zip(seqs, spans, strict=True):
            if s.done:
                continue
            gen_part = s.tokens[max(a, len(s.traj.prompt_ids)):e]
            if self.eos is not None and self.eos in gen_part:
                s.done, s.traj.finish_reason = True, "eos"
            elif e >= s.limit:
                s.done = True
        for s in seqs:  # generated tokens, cut after the first EOS
            if s.done and s.traj.finish_reason == "eos":
                n = s.traj.token_ids.index(self.eos) + 1 if self.eos in s.traj.token_ids else None
                if n is not None:
                    s.traj.token_ids, s.traj.step_map, s.traj.logprobs = (
                        s.traj.token_ids[:n], s.traj.step_map[:n], s.traj.logprobs[:n])

    def _record(self, s: _Seq, pos: int, logprob: float):
        i = pos - len(s.traj.prompt_ids)
        t = s.traj
        while len(t.token_ids) <= i:
            t.token_ids.append(self.mask_id)
            t.step_map.append(-1)
            t.logprobs.append(0.0)
        t.token_ids[i], t.step_map[i], t.logprobs[i] = s.tokens[pos], s.step, logprob

    @staticmethod
    def _offset(spans, j):
        return sum(e - a for a, e in spans[:j])

    def _pack(self, seqs, spans, device):
        ids = [t for s, (a, e) in zip(seqs, spans, strict=True) for t in s.tokens[a:e]]
        pos = [i for a, e in spans for i in range(a, e)]
        cu = [0]
        for a, e in spans:
            cu.append(cu[-1] + e - a)
        return (torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(pos, dtype=torch.long, device=device),
                torch.tensor(cu, dtype=torch.int32, device=device))

    def _block_logits(self, seqs, spans, cache, device):
        """Logits [sum of block lengths, V] for the current blocks, packed in sequence order."""
        if cache is not None:
            ids, pos, cu = self._pack(seqs, spans, device)
            return self.model.logits(self.model.decode(ids, pos, cu, cache))
        # No cache: every sequence up to its block end, block-causal, in one packed forward.
        live = [(s, a, e) for s, (a, e) in zip(seqs, spans, strict=True) if e > a]
        if not live:
            return torch.zeros(0, self.model.config.vocab_size, device=device)
        ids = torch.tensor([t for s, _, e in live for t in s.tokens[:e]], dtype=torch.long,
                           device=device)
        lay = layouts.block_causal([e for _, _, e in live], self.B).to(device)
        hidden = self.model(ids, lay)
        starts = lay.cu_seqlens[:-1].tolist()
        rows = torch.cat([torch.arange(st + a, st + e, device=device)
                          for st, (_, a, e) in zip(starts, live, strict=True)])
        out = [self.model.logits(hidden[rows])]
        return torch.cat(out) if out else torch.zeros(0, self.model.config.vocab_size)
