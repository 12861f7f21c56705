"""Training rows built from trajectories (SPEC 4.2).

Block models: one packed sequence per trajectory, [prompt + clean response (stream 0) |
noisy_1 | ... | noisy_K], noisy copy r holding the blocks that have a round r, so the clean keys /
values are computed once for every round (the KV-reuse layout of dlmkern.ops.layouts).
Full-attention models: one row per (shrunk) step over the whole response, packed varlen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.ops import layouts
from dlmkern.ops.layouts import Layout
from dlmkern.rl.trace import response_blocks, shrink, trace_rounds


@dataclass
class Rows:
    input_ids: torch.Tensor    # [T] tokens of the packed rows (noisy copies hold [MASK]s)
    layout: Layout             # block / stream / positions / cu_seqlens
    train_rows: torch.Tensor   # [n] indices into the T tokens whose prediction is trained
    targets: torch.Tensor      # [n] the clean token at each trained row
    traj: torch.Tensor         # [n] trajectory index of each trained token
    step: torch.Tensor         # [n] (shrunk) trace step of each trained token
    gen_index: torch.Tensor    # [n] index of the token in its trajectory's generated tokens

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> Rows:
        return Rows(self.input_ids.to(device), self.layout.to(device),
                    self.train_rows.to(device), self.targets.to(device), self.traj.to(device),
                    self.step.to(device), self.gen_index.to(device))


def _cat(parts, dtype=torch.long):
    return torch.tensor([x for p in parts for x in p], dtype=dtype, device=HOST)


def _block_trace(t, block_size: int, shrinkage: int):
    """(prompt length, response length, clean tokens, rounds per block) of a trajectory."""
    P, n = len(t.prompt_ids), len(t.token_ids)
    groups = response_blocks(P, n, block_size)
    rounds = trace_rounds(shrink(list(t.step_map), groups, shrinkage), groups)
    return P, n, list(t.prompt_ids) + list(t.token_ids), rounds


def block_rows(trajectories, block_size: int, mask_token_id: int, shrinkage: int = 1) -> Rows:
    """Packed KV-reuse rows for block-diffusion models. `trajectories`: objects with
    prompt_ids, token_ids and step_map (dlmkern.sampling.Trajectory)."""
    prompt_lens, seq_lens, block_rounds, ids, rows = [], [], [], [], []
    tr_traj, tr_step, tr_gen, tr_tgt = [], [], [], []
    offset = 0
    for ti, t in enumerate(trajectories):
        P, n, clean, rounds = _block_trace(t, block_size, shrinkage)
        prompt_lens.append(P)
        seq_lens.append(P + n)
        block_rounds.append([len(r) for r in rounds])
        seq_ids = list(clean)
        # noisy copies in the order of layouts.packed_rounds: round r, then blocks in order
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
    lay = layouts.packed_rounds(prompt_lens, seq_lens, block_size, block_rounds)
    input_ids = _cat(ids)
    assert input_ids.numel() == lay.num_tokens, "rows and layout disagree"
    return Rows(input_ids, lay, _cat([rows]), _cat([tr_tgt]), _cat([tr_traj]), _cat([tr_step]),
                _cat([tr_gen]))


def full_rows(trajectories, mask_token_id: int, shrinkage: int = 8) -> Rows:
    """Full-attention models: one row per (shrunk) step over the whole response."""
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
    return Rows(_cat(ids), layouts.full(lens), _cat([rows]), _cat([tr_tgt]), _cat([tr_traj]),
                _cat([tr_step]), _cat([tr_gen]))


def per_round_rows(trajectories, block_size: int, mask_token_id: int, shrinkage: int = 1) -> Rows:
    """The peers' layout, one [prompt | clean | noisy_r] row per round (TraceRL's code): the
    baseline that block_rows is checked and benchmarked against. Blocks without round r hold
    their clean tokens in row r (they are not trained there)."""
    ids, rows, prompt_lens, seq_lens = [], [], [], []
    tr_traj, tr_step, tr_gen, tr_tgt = [], [], [], []
    offset = 0
    for ti, t in enumerate(trajectories):
        P, n, clean, rounds = _block_trace(t, block_size, shrinkage)
        first = (P // block_size) * block_size if n else P + n
        for r in range(1, max((len(x) for x in rounds), default=0) + 1):
            masked, trained = set(), {}
            for brounds in rounds:
                if len(brounds) >= r:
                    masked |= {P + i for i in brounds[r - 1].masked}
                    trained.update({P + i: brounds[r - 1].step for i in brounds[r - 1].trained})
            noisy = [mask_token_id if pos in masked else clean[pos] for pos in range(first, P + n)]
            for pos, st in sorted(trained.items()):
                rows.append(offset + P + n + pos - first)
                tr_traj.append(ti)
                tr_step.append(st)
                tr_gen.append(pos - P)
                tr_tgt.append(clean[pos])
            ids.append(clean + noisy)
            prompt_lens.append(P)
            seq_lens.append(P + n)
            offset += P + n + len(noisy)
    return Rows(_cat(ids), layouts.tracerl(prompt_lens, seq_lens, block_size), _cat([rows]),
                _cat([tr_tgt]), _cat([tr_traj]), _cat([tr_step]), _cat([tr_gen]))
