"""PRE-REFACTOR REFERENCE (issue #18): the per-token loop row builders as they were before the
estimator registry (dlmkern/rl/rows.py block_rows / full_rows, dlmkern/rl/baselines.py
baseline_rows, dlmkern/rl/trace.py, dlmkern/ops/layouts.py packed_rounds), copied verbatim and
made self-contained, so tests can check the vectorised builders reproduce them exactly.
Do not "fix" this file: it is the old behaviour (including diffu_grpo's unmasked prompt in block
models)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dlmkern.ops.layouts import Layout

ESTIMATORS = ("trace", "random_mask", "coupled", "diffu_grpo")


@dataclass
class RefRows:
    input_ids: torch.Tensor
    layout: Layout
    train_rows: torch.Tensor
    targets: torch.Tensor
    traj: torch.Tensor
    step: torch.Tensor
    gen_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _cat(parts, dtype=torch.long):
    return torch.tensor([x for p in parts for x in p], dtype=dtype)


def _ar(a, b):
    return torch.arange(a, b, dtype=torch.int64)


def _pack(parts, block_size, full=False):
    lens = [int(p.numel()) for p, _ in parts]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    empty = torch.zeros(0, dtype=torch.int64)
    pos = torch.cat([p for p, _ in parts]) if parts else empty
    stream = torch.cat([s for _, s in parts]) if parts else empty
    block = torch.zeros_like(pos) if full else pos // block_size
    return Layout(block.to(torch.int32), stream.to(torch.int32), pos,
                  torch.tensor(cu, dtype=torch.int32), max(lens, default=0), full)


def layout_full(seq_lens):
    return _pack([(_ar(0, n), torch.zeros(n, dtype=torch.int64)) for n in seq_lens], 1, True)


def tracerl(prompt_lens, seq_lens, block_size):
    parts = []
    for p, n in zip(prompt_lens, seq_lens, strict=True):
        start = (p // block_size) * block_size if n > p else n
        pos = torch.cat([_ar(0, n), _ar(start, n)])
        stream = torch.cat([torch.zeros(n, dtype=torch.int64),
                            torch.ones(n - start, dtype=torch.int64)])
        parts.append((pos, stream))
    return _pack(parts, block_size)


def packed_rounds(prompt_lens, seq_lens, block_size, block_rounds):
    parts = []
    for p, n, rounds in zip(prompt_lens, seq_lens, block_rounds, strict=True):
        first = p // block_size if n > p else 0
        n_blocks = (n + block_size - 1) // block_size - first if n > p else 0
        rounds = [int(r) for r in rounds]
        assert len(rounds) == n_blocks
        pos, stream = [_ar(0, n)], [torch.zeros(n, dtype=torch.int64)]
        for r in range(1, max(rounds, default=0) + 1):
            for j, nr in enumerate(rounds):
                if nr >= r:
                    b = first + j
                    seg = _ar(max(b * block_size, 0), min((b + 1) * block_size, n))
                    pos.append(seg)
                    stream.append(torch.full_like(seg, r))
        parts.append((torch.cat(pos), torch.cat(stream)))
    return _pack(parts, block_size)


def response_blocks(prompt_len, n_gen, block_size):
    blocks: dict[int, list[int]] = {}
    for i in range(n_gen):
        blocks.setdefault((prompt_len + i) // block_size, []).append(i)
    return [blocks[b] for b in sorted(blocks)]


def shrink(step_map, groups, s):
    out = list(step_map)
    for idx in groups:
        distinct = sorted({step_map[i] for i in idx})
        to = {}
        for k in range(0, len(distinct), s):
            run = distinct[k:k + s]
            for v in run:
                to[v] = run[-1]
        for i in idx:
            out[i] = to[step_map[i]]
    return out


@dataclass
class Round:
    group: int
    round: int
    step: int
    trained: list[int]
    masked: list[int]


def trace_rounds(step_map, groups):
    out = []
    for g, idx in enumerate(groups):
        steps = sorted({step_map[i] for i in idx})
        out.append([Round(g, r + 1, m, [i for i in idx if step_map[i] == m],
                          [i for i in idx if step_map[i] >= m]) for r, m in enumerate(steps)])
    return out


def _block_trace(t, block_size, shrinkage):
    P, n = len(t.prompt_ids), len(t.token_ids)
    groups = response_blocks(P, n, block_size)
    rounds = trace_rounds(shrink(list(t.step_map), groups, shrinkage), groups)
    return P, n, list(t.prompt_ids) + list(t.token_ids), rounds


def block_rows(trajectories, block_size, mask_token_id, shrinkage=1):
    prompt_lens, seq_lens, block_rounds, ids, rows = [], [], [], [], []
    tr_traj, tr_step, tr_gen, tr_tgt = [], [], [], []
    offset = 0
    for ti, t in enumerate(trajectories):
        P, n, clean, rounds = _block_trace(t, block_size, shrinkage)
        prompt_lens.append(P)
        seq_lens.append(P + n)
        block_rounds.append([len(r) for r in rounds])
        seq_ids = list(clean)
        cursor = offset + P + n
        first = (P // block_size) * block_size if n else P + n
        for r in range(1, max((len(x) for x in rounds), default=0) + 1):
            for g, brounds in enumerate(rounds):
                if len(brounds) < r:
                    continue
                rd = brounds[r - 1]
                b = (first // block_size) + g
                lo, hi = b * block_size, min((b + 1) * block_size, P + n)
                masked = {P + i for i in rd.masked}
                trained = {P + i for i in rd.trained}
                for pos in range(lo, hi):
                    seq_ids.append(mask_token_id if pos in masked else clean[pos])
                    if pos in trained:
                        rows.append(cursor + pos - lo)
                        tr_traj.append(ti)
                        tr_step.append(rd.step)
                        tr_gen.append(pos - P)
                        tr_tgt.append(clean[pos])
                cursor += hi - lo
        ids.append(seq_ids)
        offset += len(seq_ids)
    lay = packed_rounds(prompt_lens, seq_lens, block_size, block_rounds)
    input_ids = _cat(ids)
    assert input_ids.numel() == lay.num_tokens, "rows and layout disagree"
    return RefRows(input_ids, lay, _cat([rows]), _cat([tr_tgt]), _cat([tr_traj]),
                   _cat([tr_step]), _cat([tr_gen]))


def full_rows(trajectories, mask_token_id, shrinkage=8):
    ids, rows, lens = [], [], []
    tr_traj, tr_step, tr_gen, tr_tgt = [], [], [], []
    offset = 0
    for ti, t in enumerate(trajectories):
        P, n = len(t.prompt_ids), len(t.token_ids)
        clean = list(t.prompt_ids) + list(t.token_ids)
        steps = shrink(list(t.step_map), [list(range(n))], shrinkage)
        for rd in trace_rounds(steps, [list(range(n))])[0]:
            masked = set(rd.masked)
            row = list(t.prompt_ids) + [mask_token_id if i in masked else t.token_ids[i]
                                        for i in range(n)]
            for i in rd.trained:
                rows.append(offset + P + i)
                tr_traj.append(ti)
                tr_step.append(rd.step)
                tr_gen.append(i)
                tr_tgt.append(clean[P + i])
            ids.append(row)
            lens.append(P + n)
            offset += P + n
    return RefRows(_cat(ids), layout_full(lens), _cat([rows]), _cat([tr_tgt]), _cat([tr_traj]),
                   _cat([tr_step]), _cat([tr_gen]))


def _mask_sets(kind, n, gen, eps=1e-3):
    if kind == "random_mask":
        t = eps + (1 - eps) * float(torch.rand((), generator=gen))
        return [set((torch.rand(n, generator=gen) < t).nonzero().flatten().tolist())]
    if kind == "coupled":
        t = eps + (1 - eps) * float(torch.rand((), generator=gen))
        m = set((torch.rand(n, generator=gen) < t).nonzero().flatten().tolist())
        return [m, set(range(n)) - m]
    if kind == "diffu_grpo":
        return [set(range(n))]
    raise ValueError(f"unknown estimator {kind!r}; expected one of {ESTIMATORS}")


def baseline_rows(kind, trajectories, mask_token_id, gen, block_size=None,
                  prompt_mask_ratio=0.15):
    ids, rows, lens, prompt_lens, block_rounds = [], [], [], [], []
    tr_traj, tr_step, tr_gen, tr_tgt = [], [], [], []
    offset = 0
    gens = gen if isinstance(gen, (list, tuple)) else [gen] * len(trajectories)
    for ti, (t, gen) in enumerate(zip(trajectories, gens, strict=True)):
        P, n = len(t.prompt_ids), len(t.token_ids)
        clean = list(t.prompt_ids) + list(t.token_ids)
        sets = [s for s in _mask_sets(kind, n, gen) if s] if n else []
        if block_size is not None:
            seq = list(clean)
            first = (P // block_size) * block_size
            for c, masked in enumerate(sets):
                for pos in range(first, P + n):
                    is_masked = pos >= P and (pos - P) in masked
                    if is_masked:
                        rows.append(offset + len(seq))
                        tr_traj.append(ti)
                        tr_step.append(c)
                        tr_gen.append(pos - P)
                        tr_tgt.append(clean[pos])
                    seq.append(mask_token_id if is_masked else clean[pos])
            ids.append(seq)
            offset += len(seq)
            prompt_lens.append(P)
            lens.append(P + n)
            block_rounds.append([len(sets)] * len(response_blocks(P, n, block_size)))
        else:
            for c, masked in enumerate(sets):
                prompt = list(t.prompt_ids)
                if kind == "diffu_grpo" and prompt_mask_ratio > 0:
                    pm = (torch.rand(P, generator=gen) < prompt_mask_ratio).tolist()
                    prompt = [mask_token_id if m else x for x, m in zip(prompt, pm, strict=True)]
                row = prompt + [mask_token_id if i in masked else x
                                for i, x in enumerate(t.token_ids)]
                for i in sorted(masked):
                    rows.append(offset + P + i)
                    tr_traj.append(ti)
                    tr_step.append(c)
                    tr_gen.append(i)
                    tr_tgt.append(clean[P + i])
                ids.append(row)
                lens.append(P + n)
                offset += P + n
    if block_size is not None:
        lay = packed_rounds(prompt_lens, lens, block_size, block_rounds)
    else:
        lay = layout_full(lens)
    return RefRows(_cat(ids), lay, _cat([rows]), _cat([tr_tgt]), _cat([tr_traj]),
                   _cat([tr_step]), _cat([tr_gen]))
