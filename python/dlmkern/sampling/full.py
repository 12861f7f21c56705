"""Full-attention sampler for LLaDA / Dream (SPEC 3): semi-autoregressive blocks over a
bidirectional model, the same unmasking rules as the block sampler, and an optional prefix
cache (Fast-dLLM style, refreshed at every block).

Blocks count from the end of the prompt (LLaDA's `generate`): the canvas is the prompt followed by
`gen_length` mask tokens, and block b covers canvas positions P + b*block_length onward.

Every sequence advances together: the canvases live packed on the device, and a denoising step is
one forward, one batched token draw and one batched unmasking rule over [S, block] tensors, with
no host synchronisation. The host plans a block (gather indices, static counts, every uniform
draw) and reads it back once when the block is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST, planning, read
from dlmkern.models.transformer import DiffusionLM, KVCache
from dlmkern.ops import check_device_errors, layouts
from dlmkern.sampling.block import Trajectory, end_at_eos, lagged_all_done
from dlmkern.sampling.rules import (
    SamplingConfig,
    SequenceDraws,
    choose_batch,
    dream_transfer_count,
    in_chunks,
    sample_tokens,
    transfer_schedule,
)

_PREDICT_ROWS = 2048  # record_predictions: response rows projected onto the vocabulary at once


@dataclass
class _Block:
    """One block's device state ([S, n] slot-major: slot j of row i is canvas position
    P_i + lo + j) and its host-planned inputs."""

    slots: torch.Tensor      # [S, n] index of each slot in the packed canvases
    masked: torch.Tensor     # [S, n] still to unmask
    step_map: torch.Tensor   # [S, n] global step at which each slot was unmasked
    logprobs: torch.Tensor   # [S, n] sampler log-prob of each chosen token
    counter: torch.Tensor    # [S] next global step id of each sequence
    n_static: torch.Tensor   # [n_iter, S] static / sequential counts (0: the step does nothing)
    uniforms: torch.Tensor | None  # [n_iter, S, n]
    cache: KVCache | None = None
    seg_index: torch.Tensor | None = None   # cached path: canvas rows after the prefix
    positions: torch.Tensor | None = None   # and their positions
    cu: torch.Tensor | None = None          # and their cu_seqlens
    rows: torch.Tensor | None = None        # rows of the block's slots in the forward's output
    # record_predictions: each step's decoded completion [S, gen_length] and who was active [S]
    predictions: list | None = None
    lo: int = 0                             # the block's first response index


class FullSampler:
    """``FullSampler(model, SamplingConfig(...), gen_length=..., block_length=...)``;
    ``generate(prompts, n_samples=1, seed=0)`` -> list of :class:`Trajectory`.

    ``use_cache=False`` runs the whole canvas every step (LLaDA / Dream reference behaviour);
    ``use_cache=True`` caches the k / v of everything before the current block at the start of
    each block and then runs only [current block | later positions] per step.

    ``record_predictions=True`` (MDPO, off by default: it projects the whole response onto the
    vocabulary at every step) fills Trajectory.step_predictions [steps, gen_length] (host int32):
    at each of the sequence's steps, the completion decoded from that step's state: the committed
    tokens, the current block's draw (what the step would commit there) and the argmax (never
    the mask) at the later blocks' still-masked positions."""

    def __init__(self, model: DiffusionLM, config: SamplingConfig | None = None, *,
                 gen_length: int = 64, block_length: int = 32, eos_token_id: int | None = None,
                 use_cache: bool = False, record_predictions: bool = False):
        if model.config.block_causal:
            raise ValueError("FullSampler is for full-attention models; use BlockSampler")
        if gen_length < 1 or block_length < 1:
            raise ValueError("gen_length and block_length must be >= 1")
        cfg = config or SamplingConfig()
        if cfg.cfg_scale and use_cache:
            raise ValueError("cfg_scale needs use_cache=False (LLaDA's guidance runs the whole "
                             "canvas twice, with and without the prompt)")
        if record_predictions and (use_cache or cfg.cfg_scale):
            raise ValueError("record_predictions needs use_cache=False and cfg_scale=0 (it reads "
                             "the whole canvas's predictions from the plain forward)")
        self.record_predictions = record_predictions
        self.model, self.cfg = model, cfg.per_block(-(-gen_length // block_length))
        self.gen_length, self.block_length = gen_length, block_length
        self.eos, self.use_cache = eos_token_id, use_cache
        self.mask_id = model.config.mask_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n_samples: int = 1, seed: int = 0,
                 seeds: list[int] | None = None,
                 inpaint: list[dict[int, int] | None] | None = None):
        """Like BlockSampler.generate (one generator per sequence, see SequenceDraws; at most
        `config.max_seqs` sequences at a time; `inpaint`: response tokens written into the
        canvas before the first step and never masked)."""
        return in_chunks(self._generate, prompts, n_samples, seed, seeds, self.cfg.max_seqs,
                         self._planned, inpaint)

    @torch.no_grad()
    def generate_tree(self, prompts: list[list[int]], spec, seed: int = 0,
                      seeds: list[int] | None = None) -> list[Trajectory]:
        """d-TreeRPO's tree rollout (dlmkern.sampling.tree.generate_tree)."""
        from dlmkern.sampling.tree import generate_tree

        return generate_tree(self, prompts, spec, seed, seeds)

    def _planned(self, prompt: list[int]) -> Trajectory:
        """The planner's worst-case trajectory of this sampler (dlmkern.sampling.planned)."""
        from dlmkern.sampling.planned import full_trajectory

        return full_trajectory(prompt, self.gen_length, self.block_length, self.cfg,
                               self.record_predictions)

    def _generate(self, prompts: list[list[int]], seeds: list[int],
                  given: list[dict[int, int]], draws=None) -> list[Trajectory]:
        device = next(self.model.parameters()).device
        draws = draws or SequenceDraws(len(prompts), seeds=seeds)
        lens = [len(p) + self.gen_length for p in prompts]
        self._offsets, self._given = layouts.offsets(lens), given
        canvas = torch.tensor([t for p, g in zip(prompts, given, strict=True)
                               for t in p + [g.get(j, self.mask_id)
                                             for j in range(self.gen_length)]],
                              dtype=torch.long, device=HOST).to(device)
        # with guidance the forward runs [canvases | canvases with the prompts masked]
        copies = 2 if self.cfg.cfg_scale else 1
        self._layout = None if self.use_cache else layouts.full(lens * copies).to(device)
        self._prompt = torch.tensor([i < len(p) for p, n in zip(prompts, lens, strict=True)
                                     for i in range(n)], device=HOST).to(device)
        self._resp = torch.tensor([[o + len(p) + j for j in range(self.gen_length)]
                                   for o, p in zip(self._offsets, prompts, strict=False)],
                                  dtype=torch.long, device=HOST).to(device)
        trajs = [Trajectory(p) for p in prompts]
        counter = [0] * len(prompts)
        done = [False] * len(prompts)
        plan = planning()  # dlmkern.plan: later blocks repeat these shapes (module doc of _host)
        for k, lo in enumerate(range(0, self.gen_length, self.block_length)):
            # (a prefix cache grows with every block: then the planner runs all of them)
            if all(done) or (plan is not None and not self.use_cache and k >= plan.blocks):
                break
            hi = min(lo + self.block_length, self.gen_length)
            blk = self._plan(prompts, done, counter, draws, lo, hi, canvas, device)
            self._denoise(blk, canvas)
            self._finish_block(blk, canvas, trajs, done, counter, lo, hi)
        if plan is not None:  # the planner's worst case stands for what it cannot read
            return [self._planned(p) for p in prompts]
        return trajs

    def _plan(self, prompts, done, counter, draws, lo, hi, canvas, device) -> _Block:
        """The block's host plan, copied to the device once: slot indices, the static counts of
        every step, every uniform draw, and (cached path) the prefix cache and gather indices."""
        S, n, cfg = len(prompts), hi - lo, self.cfg
        live = [not d for d in done]
        slots = torch.tensor([[o + len(p) + lo + j for j in range(n)]
                              for o, p in zip(self._offsets, prompts, strict=False)],
                             dtype=torch.long, device=HOST)
        masked = [[on and lo + j not in g for j in range(n)]  # inpainted slots: fixed
                  for on, g in zip(live, self._given, strict=True)]
        fixed = cfg.rule in ("static", "sequential")
        if fixed:
            counts = [_static_counts(cfg, sum(m)) for m in masked]
            # steps after the last one that unmasks anything do nothing: not run
            n_iter = max((k + 1 for cs in counts for k, c in enumerate(cs) if c), default=0)
            counts = [cs[:n_iter] for cs in counts]
        else:  # the other rules unmask at least one slot per step
            n_iter = n
            counts = [[0] * n_iter for _ in live]
        # the global step of each iteration (a static step that unmasks nothing takes no id)
        steps = [[c0 + (sum(x > 0 for x in cs[:it]) if fixed else it) for it in range(n_iter)]
                 for c0, cs in zip(counter, counts, strict=True)]
        blk = _Block(
            slots=slots.to(device),
            masked=torch.tensor(masked, dtype=torch.bool, device=HOST).view(S, n).to(device),
            step_map=torch.full((S, n), -1, dtype=torch.long, device=device),
            logprobs=torch.zeros(S, n, dtype=torch.float32, device=device),
            counter=torch.tensor(counter, dtype=torch.long, device=HOST).to(device),
            n_static=torch.tensor(counts, dtype=torch.long, device=HOST).T.contiguous()
            .to(device),
            uniforms=draws.block(live, n_iter, n, device, steps=steps)
            if cfg.temperature > 0 else None)
        blk.lo = lo
        if self.record_predictions and planning() is None:  # (the planner: never read)
            blk.predictions = []
        if self.use_cache:
            self._plan_cache(blk, prompts, lo, canvas, device)
        else:
            blk.rows = blk.slots.view(-1)
        return blk

    def _plan_cache(self, blk: _Block, prompts, lo, canvas, device):
        """Prefix cache of everything before the current block (Dream: before the position
        that predicts the block's first token), and the indices each step gathers."""
        shift = 1 if self.model.config.logits_shift else 0
        start = [len(p) + lo - shift for p in prompts]
        ends = [len(p) + self.gen_length for p in prompts]
        blk.cache = KVCache.empty(self.model.config, len(prompts), max(ends), device,
                                  next(self.model.parameters()).dtype)
        prefix = [o + j for o, s in zip(self._offsets, start, strict=False) for j in range(s)]
        ids = canvas.index_select(0, torch.tensor(prefix, dtype=torch.long, device=HOST)
                                  .to(device))
        self.model.prefill(ids, layouts.offsets(start), blk.cache)  # offsets on the host
        seg = [(o + s, o + e, s, e) for o, s, e in zip(self._offsets, start, ends, strict=False)]
        seg_lens = [e - s for s, e in zip(start, ends, strict=True)]
        seg_cu = layouts.offsets(seg_lens)
        blk.seg_index = torch.tensor([i for a, b, *_ in seg for i in range(a, b)],
                                     dtype=torch.long, device=HOST).to(device)
        blk.positions = torch.tensor([i for *_, s, e in seg for i in range(s, e)],
                                     dtype=torch.long, device=HOST).to(device)
        blk.cu = torch.tensor(seg_cu, dtype=torch.int32, device=HOST).to(device)
        n = blk.slots.shape[1]
        blk.rows = torch.tensor([c + len(p) + lo - s + j for c, p, s in
                                 zip(seg_cu, prompts, start, strict=False) for j in range(n)],
                                dtype=torch.long, device=HOST).to(device)

    def _logits(self, blk: _Block, canvas) -> torch.Tensor:
        """Logits [S * n, V] of the block's slots (the rest of the canvas is run through the
        model but never projected onto the vocabulary; record_predictions: its response's argmax,
        self._argmax [S, gen_length])."""
        m = self.model
        if blk.cache is None and self.cfg.cfg_scale:  # LLaDA's classifier-free guidance
            uncond = torch.where(self._prompt, self.mask_id, canvas)
            h = m.prediction_hidden(m(torch.cat([canvas, uncond]), self._layout),
                                    self._layout.cu_seqlens)
            cond, un = (m.logits(h.index_select(0, blk.rows + off))
                        for off in (0, canvas.shape[0]))
            return un + (self.cfg.cfg_scale + 1) * (cond - un)
        if blk.cache is None:
            h = m.prediction_hidden(m(canvas, self._layout), self._layout.cu_seqlens)
            if blk.predictions is not None:
                self._argmax = self._predict(h)
        else:
            h = m.decode(canvas.index_select(0, blk.seg_index), blk.positions, blk.cu, blk.cache)
            h = m.prediction_hidden(h, blk.cu)  # Dream: row r predicts the next position
        return m.logits(h.index_select(0, blk.rows))

    def _denoise(self, blk: _Block, canvas):
        """The block's denoising steps (no host sync inside a step)."""
        fixed = self.cfg.rule in ("static", "sequential")
        S, n = blk.slots.shape
        pending = None
        for it in range(blk.n_static.shape[0]):
            u = None if blk.uniforms is None else blk.uniforms[it].reshape(-1)
            tok, conf, lp, ent = sample_tokens(self._logits(blk, canvas), self.cfg,
                                               self.mask_id, u)
            tok, conf, lp, ent = (x.view(S, n) for x in (tok, conf, lp, ent))
            n_static = blk.n_static[it]
            active = blk.masked.any(1) & ((n_static > 0) if fixed else True)
            sel = choose_batch(self.cfg, conf, ent, blk.masked, n_static) & active[:, None]
            flat = blk.slots.view(-1)
            old = canvas.index_select(0, flat).view(S, n)
            if blk.predictions is not None:
                self._record(blk, canvas, torch.where(blk.masked, tok, old), active)
            canvas.index_copy_(0, flat, torch.where(sel, tok, old).view(-1))
            blk.step_map.copy_(torch.where(sel, blk.counter[:, None].expand(S, n),
                                           blk.step_map))
            blk.logprobs.copy_(torch.where(sel, lp, blk.logprobs))
            blk.masked &= ~sel
            blk.counter += active
            if not fixed:  # a dynamic rule: stop once every block is done
                pending, finished = lagged_all_done(blk.masked, pending)
                if finished:
                    break

    def _predict(self, h: torch.Tensor) -> torch.Tensor:
        """[S, gen_length] argmax (never the mask, as the draw) of every response position,
        projected _PREDICT_ROWS rows at a time (one [rows, V] logits buffer at most)."""
        rows = self._resp.view(-1)
        out = []
        for lo in range(0, rows.numel(), _PREDICT_ROWS):
            lg = self.model.logits(h.index_select(0, rows[lo:lo + _PREDICT_ROWS]))
            lg[:, self.mask_id] = float("-inf")
            out.append(lg.argmax(-1))
        return torch.cat(out).view(self._resp.shape)

    def _record(self, blk: _Block, canvas, block_pred, active):
        """The completion decoded from this step's state: committed tokens, the block's draw,
        the argmax at the other still-masked positions."""
        resp = canvas.index_select(0, self._resp.view(-1)).view(self._resp.shape)
        pred = torch.where(resp == self.mask_id, self._argmax, resp)
        pred[:, blk.lo:blk.lo + block_pred.shape[1]] = block_pred
        blk.predictions.append((pred, active.clone()))

    def _finish_block(self, blk: _Block, canvas, trajs, done, counter, lo: int, hi: int):
        """The block's one read-back: tokens, step map, log-probs and counters to the host; a
        sequence whose block holds EOS ends there (its after_eos context: the rest of the canvas,
        the positions after this block still [MASK] but for inpainted ones)."""
        preds = blk.predictions or []
        active = torch.stack([a for _, a in preds]) if preds else blk.counter[:0]
        tokens, step_map, logprobs, counters, active = read(
            canvas.index_select(0, blk.slots.view(-1)).view(blk.slots.shape), blk.step_map,
            blk.logprobs, blk.counter, active)
        check_device_errors(canvas.device)  # the kernels' flag, once per block (CUDA)
        # (synchronised by the read: a plain copy; int32 on the host, [steps, gen_length] each)
        preds = torch.stack([p for p, _ in preds]).to(HOST, torch.int32) if preds else None
        for i, c in enumerate(counters):
            if done[i]:
                continue
            t = trajs[i]
            if preds is not None:
                _append_predictions(t, preds[[k for k, a in enumerate(active) if a[i]], i])
            counter[i] = c
            t.token_ids.extend(tokens[i])
            t.step_map.extend(step_map[i])
            t.logprobs.extend(logprobs[i])
            g = self._given[i]
            t.inpainted.extend(r for r in range(lo, hi) if r in g)
            if self.eos is not None and self.eos in tokens[i]:
                n = t.token_ids.index(self.eos) + 1
                end_at_eos(t, n, self.gen_length - hi, self.mask_id)
                for r in range(hi, self.gen_length):  # later inpainted tokens: in the canvas
                    if r in g:
                        t.after_eos_ids[r - n], t.after_eos_steps[r - n] = g[r], -1
                done[i] = True


def _append_predictions(t: Trajectory, preds: torch.Tensor) -> None:
    """A block's recorded completions [its steps, gen_length] after the earlier blocks'."""
    start = 0 if t.step_predictions is None else len(t.step_predictions)
    t.prediction_steps.extend(range(start, start + preds.shape[0]))
    t.step_predictions = preds if t.step_predictions is None else \
        torch.cat([t.step_predictions, preds])


def _static_counts(cfg: SamplingConfig, masked: int) -> list[int]:
    """Tokens each step of a static / sequential rule unmasks in a block of `masked` slots:
    LLaDA's even split, or Dream's timestep schedule (simulated: it depends on what is left)."""
    if cfg.schedule != "dream":
        return transfer_schedule(masked, cfg.steps)
    out, left = [], masked
    for k in range(cfg.steps):
        c = min(dream_transfer_count(left, k, cfg.steps, cfg.eps), left)
        out.append(c)
        left -= c
    return out
