"""Block-diffusion sampler for SDAR / TraDo with a KV cache (SPEC 3).

Prompts are prefilled block-causally (whole blocks only); then, block by block, the current block
of every sequence is denoised against the cache with decode_attention and its clean k / v are
committed. Blocks are aligned to absolute positions, exactly as the trainer aligns them: a prompt
ending mid-block starts the first generated block mid-block (its prompt tail is part of the block).

Inside a block every sequence advances together on [S, block] device tensors (tokens, still-masked
slots, step map, log-probs, step counters): a denoising step is one decode forward, one batched
token draw and one batched unmasking rule, with no host synchronisation. The host sets a block up
(its spans, the static schedule, every uniform draw of the block from each sequence's own
generator) and reads it back once when the block is done. On CUDA the step is captured in a CUDA
graph per block shape (number of live query slots) and replayed; static and sequential rules run
exactly `steps` steps, dynamic rules stop one step after the block is seen finished (the check
lags a step so the host never stalls the queue).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dlmkern._host import HOST, planning, read  # block plans: built on the host, copied over
from dlmkern.models.transformer import DiffusionLM, KVCache
from dlmkern.ops import check_device_errors, layouts
from dlmkern.sampling.rules import (
    SamplingConfig,
    SequenceDraws,
    choose_batch,
    in_chunks,
    sample_tokens,
    transfer_schedule,
)

NOT_DECODED = 2**62  # step of a position after EOS the sampler never unmasked: [MASK] always


@dataclass
class Trajectory:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # generated tokens (never re-tokenized)
    step_map: list[int] = field(default_factory=list)    # global denoising step of each token
    logprobs: list[float] = field(default_factory=list)  # sampler log-prob of each chosen token
    finish_reason: str = "length"                         # "eos" or "length"
    # what the sampler still had after EOS (SPEC 4.1: rows see it, never train it); "length": []
    after_eos_ids: list[int] = field(default_factory=list)    # rest of the EOS block / canvas
    after_eos_steps: list[int] = field(default_factory=list)  # their steps (NOT_DECODED: [MASK])
    # indices of token_ids given to the sampler (IGPO's inpainted hints), not sampled: their
    # step is -1 (visible from the start) and no row ever trains them (dlmkern.rl.rows)
    inpainted: list[int] = field(default_factory=list)
    # a tree rollout's leaf (dlmkern.sampling.tree.TreeLeaf: its tree and leaf index), else None
    tree: object | None = None
    # FullSampler(record_predictions=True) (MDPO): [steps, gen_length] int32, row i the
    # completion decoded from the state at global step prediction_steps[i] (every step, in
    # order; the trainer keeps the steps it trains); None otherwise
    step_predictions: torch.Tensor | None = None
    prediction_steps: list[int] = field(default_factory=list)

    def text(self, tokenizer) -> str:
        """The completion as text: decoded without special tokens (EOS, padding), as TRL does;
        what rewards, evaluation and `dlmkern sample` see."""
        return tokenizer.decode(self.token_ids, skip_special_tokens=True)


# With CUDA graphs, live query rows are rounded up to a multiple of block_size * ceil(S / 8): at
# most ~8 step shapes (graphs) per generate() call however sequences finish.
_BUCKETS = 8


@dataclass
class _Seq:
    traj: Trajectory
    tokens: list[int]      # prompt + generated so far
    limit: int             # prompt length + max_new_tokens
    step: int = 0          # next global step id
    done: bool = False
    given: dict[int, int] = field(default_factory=dict)  # fixed response tokens (inpaint)


class _BlockState:
    """The device tensors one block's denoising steps read and write ([S, B] slot-major: slot j of
    row i is position start_i + j). One instance per block shape is kept for a whole generate()
    call, so a CUDA graph captured on it stays valid; each block loads fresh values with copy_."""

    def __init__(self, S: int, B: int, n_live: int, device):
        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens, self.masked = z(S, B), z(S, B, dtype=torch.bool)
        self.step_map, self.logprobs = z(S, B), z(S, B, dtype=torch.float32)
        self.counter = z(S)                      # next global step id of each sequence
        self.slots, self.positions = z(n_live), z(n_live)  # query rows: flat slot, position
        self.cu = z(S + 1, dtype=torch.int32)    # query rows of each sequence
        self.uniforms = torch.ones(S, B, dtype=torch.float32, device=device)  # this step's draws
        self.n_static = z(S)                     # this step's static / sequential counts
        self.full_ids = self.full_rows = self.layout = None  # the recomputing path's inputs

    def load(self, **values):
        for name, v in values.items():
            getattr(self, name).copy_(v, non_blocking=True)


class BlockSampler:
    """``BlockSampler(model, SamplingConfig(...), max_new_tokens=..., eos_token_id=...)``;
    ``generate(prompts, n_samples=1, seed=0)`` returns one :class:`Trajectory` per sample.
    ``use_cache=False`` recomputes the whole sequence block-causally at every step (the
    reference the cached path must match, and the uncached baseline of the benchmark).
    ``cuda_graphs`` (default: on for a cached sampler on CUDA) captures the denoising step."""

    def __init__(self, model: DiffusionLM, config: SamplingConfig | None = None, *,
                 max_new_tokens: int = 64, eos_token_id: int | None = None,
                 use_cache: bool = True, cuda_graphs: bool | None = None):
        if not model.config.block_causal:
            raise ValueError("BlockSampler needs a block-diffusion (SDAR) model; use FullSampler")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if cuda_graphs and not use_cache:
            raise ValueError("cuda_graphs needs use_cache=True (the recomputing path changes "
                             "shape every block)")
        self.model, self.cfg = model, config or SamplingConfig()
        if self.cfg.cfg_scale or self.cfg.steps_total:
            raise ValueError("cfg_scale and steps_total are LLaDA's (FullSampler); BlockSampler "
                             "counts `steps` per block and has no classifier-free guidance")
        self.max_new_tokens, self.eos, self.use_cache = max_new_tokens, eos_token_id, use_cache
        self.cuda_graphs = cuda_graphs
        self.B = model.config.block_size
        self.mask_id = model.config.mask_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n_samples: int = 1, seed: int = 0,
                 seeds: list[int] | None = None,
                 inpaint: list[dict[int, int] | None] | None = None):
        """One trajectory per (prompt, sample). Each sequence draws from its own CPU generator
        (seeded `seed * 1000003 + index`, or `seeds[index]`) a fixed number of uniforms per
        block, so a sequence's tokens do not depend on which other sequences share the batch
        (or the rank). At most `config.max_seqs` sequences run at a time, each chunk with its
        own KV cache (freed before the next): the same tokens as one batch. `inpaint`: per
        sequence, response tokens held fixed from the start (rules.check_inpaint)."""
        self.step_shapes = []  # live-row buckets used (captured graphs), over every chunk
        return in_chunks(self._generate, prompts, n_samples, seed, seeds, self.cfg.max_seqs,
                         self._planned, inpaint)

    @torch.no_grad()
    def generate_tree(self, prompts: list[list[int]], spec, seed: int = 0,
                      seeds: list[int] | None = None) -> list[Trajectory]:
        """d-TreeRPO's tree rollout (dlmkern.sampling.tree.generate_tree)."""
        from dlmkern.sampling.tree import generate_tree

        self.step_shapes = []
        return generate_tree(self, prompts, spec, seed, seeds)

    def _planned(self, prompt: list[int]) -> Trajectory:
        """The planner's worst-case trajectory of this sampler (dlmkern.sampling.planned)."""
        from dlmkern.sampling.planned import block_trajectory

        return block_trajectory(prompt, self.max_new_tokens, self.B, self.cfg)

    def _generate(self, prompts: list[list[int]], seeds: list[int],
                  given: list[dict[int, int]], draws=None) -> list[Trajectory]:
        device = next(self.model.parameters()).device
        seqs = [_Seq(Trajectory(list(p)), list(p), len(p) + self.max_new_tokens, given=g)
                for p, g in zip(prompts, given, strict=True)]
        draws = draws or SequenceDraws(len(seqs), seeds=seeds)
        graphs = self.cuda_graphs if self.cuda_graphs is not None else (
            self.use_cache and (device.type == "cuda" or planning() is not None))
        if graphs and device.type != "cuda":
            graphs = "emulate"  # same static buffers and code path, eager (tests on CPU)
        # Step shapes come in buckets (see _block): padding rows live in dummy sequences with
        # their own cache rows, so a captured graph serves every live count in its bucket.
        pad_seqs = -(-len(seqs) // _BUCKETS) if graphs else 0
        cache = None
        if self.use_cache:
            max_len = max(s.limit for s in seqs) + self.B
            dtype = next(self.model.parameters()).dtype
            cache = KVCache.empty(self.model.config, len(seqs) + pad_seqs, max_len, device,
                                  dtype)
            starts = [(len(s.tokens) // self.B) * self.B for s in seqs]
            ids = torch.tensor([t for s, n in zip(seqs, starts, strict=True) for t in s.tokens[:n]],
                               dtype=torch.long, device=device)
            self.model.prefill(ids, layouts.offsets(starts), cache)  # offsets on the host
        run = _StepRunner(self, cache, graphs, pad_seqs)
        plan = planning()  # dlmkern.plan: later blocks repeat these shapes (module doc of _host)
        n_blocks = 0
        while not all(s.done for s in seqs) and (plan is None or n_blocks < plan.blocks):
            self._block(seqs, run, draws, device)
            n_blocks += 1
        self.step_shapes = sorted(set(self.step_shapes) | set(run.states))
        if plan is not None:  # the planner's worst case stands for what it cannot read
            return [self._planned(s.traj.prompt_ids) for s in seqs]
        return [s.traj for s in seqs]

    def _block(self, seqs, run, draws, device):
        B, cfg = self.B, self.cfg
        S = len(seqs) + run.pad_seqs  # real sequences, then the dummy (padding) ones
        # Current block of each sequence: [start, end), start = the first ungenerated block's
        # start; done sequences get an empty block so cache rows stay aligned. Generated slots
        # start at gen = max(start, prompt length): a prompt tail in the block is never resampled.
        spans, gen = [], []
        for s in seqs:
            a = layouts.response_block_span(len(s.tokens), s.limit, B)[0] * B  # the trainer's rule
            e = a if s.done else min(a + B, s.limit)
            spans.append((a, e))
            gen.append(max(a, len(s.traj.prompt_ids)))
        lens = [e - a for a, e in spans]
        n_live = sum(lens)
        if run.pad_seqs:  # round the live rows up to a multiple of G = B * pad_seqs
            g = B * run.pad_seqs
            pad = -(-n_live // g) * g - n_live          # < g: fits in the dummy sequences
            dummy = [min(B, max(0, pad - j * B)) for j in range(run.pad_seqs)]
            spans += [(0, n) for n in dummy]             # positions 0..n-1
            gen += dummy                                 # generated from n on: nothing masked
            lens += dummy
            n_live += pad
        st = run.state(S, B, n_live, device)
        tokens, masked = self._block_slots(seqs, spans, gen, S)
        slots = [i * B + j for i, n in enumerate(lens) for j in range(n)]
        positions = [p for a, e in spans for p in range(a, e)]
        cu = torch.tensor(layouts.offsets(lens), dtype=torch.int32, device=HOST)
        st.load(tokens=torch.tensor(tokens, dtype=torch.long, device=HOST),
                masked=torch.tensor(masked, dtype=torch.bool, device=HOST),
                slots=torch.tensor(slots, dtype=torch.long, device=HOST),
                positions=torch.tensor(positions, dtype=torch.long, device=HOST), cu=cu,
                step_map=torch.full((S, B), -1, device=HOST),
                logprobs=torch.zeros(S, B, device=HOST),
                counter=torch.tensor([s.step for s in seqs] + [0] * run.pad_seqs, device=HOST))
        if not self.use_cache:
            self._load_recompute_inputs(st, seqs, spans, device)
        # Host-side plan of the whole block: static counts per step and every uniform draw.
        fixed = cfg.rule in ("static", "sequential")
        n_iter = cfg.steps if fixed else B
        sched = [transfer_schedule(sum(m), cfg.steps) for m in masked]  # inpainted: fixed
        n_static = torch.tensor(sched, dtype=torch.long, device=HOST).T.contiguous().to(device)
        uniforms = None  # [n_iter, S, B]
        if cfg.temperature > 0:
            live = [not s.done for s in seqs] + [False] * run.pad_seqs
            # a step counts while its block has masked slots: iteration it is step s.step + it
            steps = [[s.step + it for it in range(n_iter)] for s in seqs] + \
                [[0] * n_iter] * run.pad_seqs
            uniforms = draws.block(live, n_iter, B, device, steps=steps)
        pending = None
        for it in range(n_iter):
            st.load(n_static=n_static[min(it, cfg.steps - 1)])
            if uniforms is not None:
                st.load(uniforms=uniforms[it])
            run(st)
            if not fixed:  # a dynamic rule: stop once every block is done
                pending, finished = lagged_all_done(st.masked, pending)
                if finished:
                    break
        if self.use_cache:  # commit the finished blocks' clean k / v
            ids = st.tokens.view(-1).index_select(0, st.slots)
            self.model.decode(ids, st.positions, st.cu, run.cache, commit=True)
            if run.pad_seqs:
                for lens_l in run.cache.seqlens:
                    lens_l[len(seqs):] = 0  # the dummy sequences keep nothing
        self._finish_block(seqs, spans[:len(seqs)], gen[:len(seqs)], st)

    def _block_slots(self, seqs, spans, gen, S):
        """[S, B] host lists of the block's starting tokens (prompt tail, inpainted tokens, else
        [MASK]) and of the slots still to generate: built as lists, one tensor each (no
        per-sequence tensor op)."""
        B, mask = self.B, self.mask_id
        tokens = [[mask] * B for _ in range(S)]
        masked = [[False] * B for _ in range(S)]
        for i, (s, (a, e)) in enumerate(zip(seqs, spans, strict=False)):  # real ones only
            tail = s.tokens[a:]
            tokens[i][: len(tail)] = tail
            P = len(s.traj.prompt_ids)
            for j in range(gen[i] - a, e - a):
                fixed = s.given.get(a + j - P)
                tokens[i][j] = mask if fixed is None else fixed
                masked[i][j] = fixed is None
        return tokens, masked

    def _finish_block(self, seqs, spans, gen, st):
        """The block's one read-back: tokens, step map, log-probs and counters to the host."""
        tokens, step_map, logprobs, counter = read(st.tokens, st.step_map, st.logprobs,
                                                   st.counter)
        check_device_errors(st.tokens.device)  # the kernels' flag, once per block (CUDA)
        for i, (s, (a, e)) in enumerate(zip(seqs, spans, strict=True)):
            if s.done:
                continue
            new = tokens[i][gen[i] - a: e - a]
            s.tokens.extend(new)
            s.step = counter[i]
            t = s.traj
            P = len(t.prompt_ids)
            t.inpainted.extend(r for r in range(gen[i] - P, e - P) if r in s.given)
            t.token_ids.extend(new)
            t.step_map.extend(step_map[i][gen[i] - a: e - a])
            t.logprobs.extend(logprobs[i][gen[i] - a: e - a])
            if self.eos is not None and self.eos in new:
                end_at_eos(t, t.token_ids.index(self.eos) + 1)
                s.done = True
            elif e >= s.limit:
                s.done = True

    def _load_recompute_inputs(self, st, seqs, spans, device):
        """No cache: each live sequence up to its block end, block-causal, one packed forward;
        `full_rows` are the rows of the query slots in that packing."""
        live = [(i, s, a, e) for i, (s, (a, e)) in enumerate(zip(seqs, spans, strict=True))
                if e > a]
        ids = [t for _, s, a, e in live for t in s.tokens[:a] + [self.mask_id] * (e - a)]
        lay = layouts.block_causal([e for *_, e in live], self.B)
        starts = lay.cu_seqlens[:-1].tolist()
        rows = [st_ + j for st_, (_, _, a, e) in zip(starts, live, strict=True)
                for j in range(a, e)]
        st.full_ids = torch.tensor(ids, dtype=torch.long, device=device)
        st.full_rows = torch.tensor(rows, dtype=torch.long, device=device)
        st.layout = lay.to(device)

    def step(self, st: _BlockState, cache: KVCache | None):
        """One denoising step of every block (st is updated in place; no host sync)."""
        S, B = st.tokens.shape
        ids = st.tokens.view(-1).index_select(0, st.slots)
        if cache is not None:
            logits = self.model.logits(self.model.decode(ids, st.positions, st.cu, cache))
        else:
            full = st.full_ids.index_copy(0, st.full_rows, ids)
            logits = self.model.logits(self.model(full, st.layout)[st.full_rows])
        tok, conf, lp, ent = sample_tokens(logits, self.cfg, self.mask_id,
                                           st.uniforms.view(-1).index_select(0, st.slots))

        def spread(x, fill):  # query rows -> [S, B] slots
            out = torch.full((S * B,), fill, dtype=x.dtype, device=x.device)
            return out.index_copy_(0, st.slots, x).view(S, B)

        sel = choose_batch(self.cfg, spread(conf, float("-inf")), spread(ent, float("inf")),
                           st.masked, st.n_static)
        had = st.masked.any(1)
        st.tokens.copy_(torch.where(sel, spread(tok, self.mask_id), st.tokens))
        st.step_map.copy_(torch.where(sel, st.counter[:, None].expand(S, B), st.step_map))
        st.logprobs.copy_(torch.where(sel, spread(lp, 0.0), st.logprobs))
        st.masked &= ~sel
        st.counter += had


def end_at_eos(t: Trajectory, n: int, masked_after: int = 0, mask_id: int | None = None) -> None:
    """Cut `t` after its first n tokens (EOS last): the decoded rest of the EOS block goes to its
    after_eos context, then `masked_after` positions the sampler kept [MASK] (full attention's
    later blocks)."""
    t.after_eos_ids = t.token_ids[n:] + [mask_id] * masked_after
    t.after_eos_steps = t.step_map[n:] + [NOT_DECODED] * masked_after
    t.token_ids, t.step_map, t.logprobs = t.token_ids[:n], t.step_map[:n], t.logprobs[:n]
    t.inpainted = [r for r in t.inpainted if r < n]
    t.finish_reason = "eos"


def lagged_all_done(masked: torch.Tensor, pending):
    """Whether every block was finished one step ago (CUDA: read from pinned memory behind an
    event, so the host waits only for the step before the one in flight); on CPU, now."""
    flag = ~masked.any()
    if masked.device.type != "cuda":
        return None, bool(read(flag)[0])
    # on the flag's device: an event recorded on another device's stream never waits for the copy
    with torch.cuda.device(masked.device):
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(masked.device))
    finished = False
    if pending is not None:
        pending[0].synchronize()
        finished = bool(pending[1])
    return (event, host), finished


class _StepRunner:
    """Runs BlockSampler.step on the block state of each shape: eagerly, or (CUDA) from a CUDA
    graph captured on the shape's first step (that first step runs eagerly on a side stream as
    the warm-up). Graphs and states live for one generate() call, as the cache does. Streams and
    captures are made on the states' device (the model's), whatever the current device is.
    graphs="emulate" keeps the static-buffer path without capture (CPU tests)."""

    def __init__(self, sampler: BlockSampler, cache, graphs, pad_seqs: int = 0):
        self.sampler, self.cache, self.graphs = sampler, cache, graphs
        self.pad_seqs = pad_seqs  # dummy sequences after the real ones (bucketed shapes)
        self.states: dict[int, _BlockState] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._stream = None  # warm-up and capture stream: captures sharing a pool share it

    def state(self, S, B, n_live, device) -> _BlockState:
        if not self.graphs:
            return _BlockState(S, B, n_live, device)
        if n_live not in self.states:
            self.states[n_live] = _BlockState(S, B, n_live, device)
        return self.states[n_live]

    def __call__(self, st: _BlockState):
        if self.graphs is not True:
            return self.sampler.step(st, self.cache)
        device = st.tokens.device  # the model's: a capture on another device's stream is empty
        with torch.cuda.device(device):
            key = st.slots.numel()
            graph = self._graphs.get(key)
            if graph is not None:
                graph.replay()
                return
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)
            side, current = self._stream, torch.cuda.current_stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.sampler.step(st, self.cache)  # the real step, and the capture's warm-up
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                self.sampler.step(st, self.cache)
            self._pool = graph.pool()
            self._graphs[key] = graph
