"""Training rows built from trajectories (SPEC 4.2).

An estimator (dlmkern.rl.estimators) says what each noisy copy of a trajectory masks and trains
(``NoisyCopy``); ``build_rows`` is the one builder that turns them into rows:
- block models: one packed sequence per trajectory, [prompt + clean response (stream 0) | copy 1 |
  ... | copy K], copy c holding (in block order) the response blocks in which it masks a token, so
  the clean keys / values are computed once for every copy (the KV-reuse layout,
  dlmkern.ops.layouts.packed_copies);
- full-attention models: one row [prompt | response] per copy, packed varlen.
For TraceRL copy r is round r of every block, as before. The baselines' copies used to hold every
response block; now a block in which a copy masks nothing is left out of it: the trained tokens
and their log-probs are unchanged (that block only fed itself), the rows are just shorter.
A copy that says what it masks of the trajectory's after-EOS context (Trajectory.after_eos_ids:
the rest of the EOS block, or of a full-attention canvas) gets it placed after the response, as
context only: never trained, never counted in the n generated tokens.
Tokens the sampler was given rather than sampled (Trajectory.inpainted: IGPO's hints) are clean
context in every copy and never trained, whatever the estimator's copies say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dlmkern._host import HOST, on_host
from dlmkern.ops import layouts
from dlmkern.ops.layouts import Layout
from dlmkern.rl.trace import response_blocks, shrink, trace_rounds


@dataclass(frozen=True)
class RowSpec:
    """What the rows are built for (the model), and the options of the estimators."""

    mask_token_id: int
    block_size: int | None   # None: full-attention model (LLaDA / Dream)
    shrinkage: int = 1       # trace shrinkage s (used by "trace" only)


@dataclass(frozen=True)
class NoisyCopy:
    """One noisy copy of a trajectory, over its n generated tokens (and P prompt tokens, and A
    after-EOS context tokens when it holds them)."""

    masked: torch.Tensor                       # [n] bool: [MASK] in this copy
    step: torch.Tensor                         # [n] int64: -1 not trained here, else Rows.step
    prompt_masked: torch.Tensor | None = None  # [P] bool: prompt tokens [MASK]ed (diffu_grpo)
    after_eos_masked: torch.Tensor | None = None  # [A] bool over after_eos_ids; None: left out
    # the copy's weight in its trajectory's ELBO estimate (a quadrature weight w_k, 1/M for M
    # Monte Carlo copies): token_weights=elbo is weight / t; None: 1 (the baselines' 1 / t)
    weight: float | None = None
    # [n] the token each trained position is scored on; None: the trajectory's own (MDPO: the
    # prediction of the copy's sampler step, which differs at positions committed later)
    target: torch.Tensor | None = None


@dataclass
class Rows:
    input_ids: torch.Tensor    # [T] tokens of the packed rows (noisy copies hold [MASK]s)
    layout: Layout             # block / stream / positions / cu_seqlens
    train_rows: torch.Tensor   # [n] indices into the T tokens whose prediction is trained
    targets: torch.Tensor      # [n] the clean token at each trained row
    traj: torch.Tensor         # [n] trajectory index of each trained token
    step: torch.Tensor         # [n] (shrunk) trace step, or noisy-copy index, of each token
    gen_index: torch.Tensor    # [n] index of the token in its trajectory's generated tokens
    num_trajectories: int      # trajectories the rows were built from (traj < this)
    copy_weight: torch.Tensor | None = None  # [n] float32: NoisyCopy.weight of each token's copy

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> Rows:
        return Rows(self.input_ids.to(device), self.layout.to(device),
                    self.train_rows.to(device), self.targets.to(device), self.traj.to(device),
                    self.step.to(device), self.gen_index.to(device), self.num_trajectories,
                    None if self.copy_weight is None else self.copy_weight.to(device))

    @staticmethod
    @on_host
    def cat(parts: Sequence[Rows]) -> Rows:
        """The rows of several batches packed back to back: part k's trajectory ids are offset by
        the trajectories before it, its train_rows by the tokens before it."""
        if not parts:
            raise ValueError("Rows.cat: no rows to concatenate (see Rows.empty)")
        weights = _cat_copy_weights(parts)
        tok = layouts.offsets([p.num_tokens for p in parts])
        trj = layouts.offsets([p.num_trajectories for p in parts])
        return Rows(torch.cat([p.input_ids for p in parts]), layouts.cat([p.layout for p in parts]),
                    torch.cat([p.train_rows + o for p, o in zip(parts, tok, strict=False)]),
                    torch.cat([p.targets for p in parts]),
                    torch.cat([p.traj + o for p, o in zip(parts, trj, strict=False)]),
                    torch.cat([p.step for p in parts]), torch.cat([p.gen_index for p in parts]),
                    trj[-1], weights)

    @staticmethod
    @on_host
    def empty(full: bool) -> Rows:
        """Rows of no trajectory (no copy weights: Rows.cat takes them beside any part)."""
        z = torch.zeros(0, dtype=torch.long)
        lay = layouts.full([]) if full else layouts.block_causal([], 1)
        return Rows(z, lay, z, z, z, z, z, 0)


def _cat_copy_weights(parts: Sequence[Rows]) -> torch.Tensor | None:
    """The parts' copy weights back to back; None when no part carries them. A part without
    them must train no token (a trajectory that generated nothing has no copy to weigh)."""
    if all(p.copy_weight is None for p in parts):
        return None
    if any(p.copy_weight is None and p.train_rows.numel() for p in parts):
        raise ValueError("Rows.cat: either every part carries copy weights or none does")
    none = torch.zeros(0, dtype=torch.float32, device=parts[0].train_rows.device)
    return torch.cat([none if p.copy_weight is None else p.copy_weight for p in parts])


def _check_copies(copies: Sequence[NoisyCopy], P: int, n: int, A: int) -> None:
    given = {c.after_eos_masked is not None for c in copies}
    if len(given) > 1:
        raise ValueError("either every noisy copy masks the after-EOS context or none holds it")
    for c in copies:
        am = c.after_eos_masked
        if am is not None and (am.shape != (A,) or am.dtype != torch.bool):
            raise ValueError(f"after_eos_masked must be [A={A}] bool, got {tuple(am.shape)} "
                             f"{am.dtype}")
        if c.target is not None and c.target.shape != (n,):
            raise ValueError(f"a noisy copy's target must be [n={n}], got {tuple(c.target.shape)}")
        if c.masked.shape != (n,) or c.step.shape != (n,) or c.masked.dtype != torch.bool:
            raise ValueError(f"a noisy copy needs masked [n] bool and step [n] over the n={n} "
                             f"generated tokens, got {tuple(c.masked.shape)} {c.masked.dtype} "
                             f"and {tuple(c.step.shape)}")
        pm = c.prompt_masked
        if pm is not None and (pm.shape != (P,) or pm.dtype != torch.bool):
            raise ValueError(f"prompt_masked must be [P={P}] bool, got {tuple(pm.shape)} "
                             f"{pm.dtype}")


def _prompt_masks(copies: Sequence[NoisyCopy], P: int, block: bool) -> torch.Tensor:
    """[K + 1, P] bool: the prompt's [MASK]s in the clean stream (row 0) and in each copy. Block
    models share one clean stream, so there every copy must mask the prompt alike."""
    none = torch.zeros(P, dtype=torch.bool, device=HOST)
    masks = [none if c.prompt_masked is None else c.prompt_masked for c in copies]
    if block and any(not torch.equal(m, masks[0]) for m in masks):
        raise ValueError("block models share one clean prompt: every noisy copy must mask the "
                         "prompt the same way")
    return torch.stack([masks[0] if block and masks else none, *masks])


def _copy_blocks(P: int, n: int, masked: torch.Tensor, block_size: int) -> list[list[int]]:
    """Per copy, the absolute blocks (in order) holding a response token it masks."""
    first, n_blocks = layouts.response_block_span(P, P + n, block_size)
    block = torch.arange(P, P + n, device=HOST) // block_size - first
    has = torch.zeros(masked.shape[0], n_blocks, device=HOST).index_add_(
        1, block, masked.float()) > 0
    out: list[list[int]] = [[] for _ in range(masked.shape[0])]
    for k, b in has.nonzero().tolist():  # copy-major, blocks ascending
        out[k].append(first + b)
    return out


def _after_eos(traj, copies: Sequence[NoisyCopy], spec: RowSpec) -> list[int]:
    """The after-EOS context the rows hold: the trajectory's, when its copies mask it. Block
    models: it never leaves the EOS block (later blocks never fed the completion)."""
    ids = list(getattr(traj, "after_eos_ids", []))
    if not ids or not copies or copies[0].after_eos_masked is None:
        return []
    P, n, B = len(traj.prompt_ids), len(traj.token_ids), spec.block_size
    if B is not None and (n == 0 or (P + n + len(ids) - 1) // B != (P + n - 1) // B):
        raise ValueError(f"the after-EOS context ({len(ids)} tokens after position {P + n}) "
                         f"crosses the EOS block (block size {B})")
    return ids


def _inpainted(traj, n: int) -> torch.Tensor:
    """[n] bool: the generated tokens the sampler was given (Trajectory.inpainted, IGPO's
    hints), not sampled: the sampler had them unmasked from the first step."""
    given = torch.zeros(n, dtype=torch.bool)
    idx = list(getattr(traj, "inpainted", []))
    if any(not 0 <= i < n for i in idx):
        raise ValueError(f"inpainted indices must lie in [0, {n}), got {idx}")
    given[idx] = True
    return given


@on_host
def build_rows(traj, copies: Sequence[NoisyCopy], spec: RowSpec) -> Rows:
    """Rows of ONE trajectory (prompt_ids, token_ids, after_eos_ids) from its noisy copies. A copy
    that masks no response token trains nothing and is dropped. Token ids and trained rows are
    read at the layout's (stream, position) of every token, so rows and layout cannot disagree."""
    P, n = len(traj.prompt_ids), len(traj.token_ids)
    _check_copies(copies, P, n, len(getattr(traj, "after_eos_ids", [])))
    empty = torch.zeros(0, n, dtype=torch.bool)
    masked = torch.stack([c.masked for c in copies]) if copies else empty
    step = torch.stack([c.step for c in copies]).long() if copies else empty.long()
    if bool(((step >= 0) & ~masked).any()):
        raise ValueError("a noisy copy trains a token it does not mask")
    given = _inpainted(traj, n)  # never the policy's actions: clean context in every copy
    masked, step = masked & ~given, step.masked_fill(given, -1)
    keep = masked.any(1).tolist()
    copies = [c for c, k in zip(copies, keep, strict=True) if k]
    given = {c.weight is not None for c in copies}
    if len(given) > 1:
        raise ValueError("either every noisy copy has a weight or none has")
    masked, step = masked[keep], step[keep]
    K, after = len(copies), _after_eos(traj, copies, spec)
    A = len(after)
    if A:  # context only: masked as each copy says, never trained
        masked = torch.cat([masked, torch.stack([c.after_eos_masked for c in copies])], 1)
        step = torch.cat([step, torch.full((K, A), -1, dtype=torch.long)], 1)
    L, block = P + n + A, spec.block_size is not None
    clean = torch.tensor(list(traj.prompt_ids) + list(traj.token_ids) + after, dtype=torch.long)
    # [MASK] and step of every (stream, position); row 0 is the clean stream (block models)
    masked = torch.cat([_prompt_masks(copies, P, block),
                        torch.cat([torch.zeros(1, n + A, dtype=torch.bool), masked])], 1)
    step = torch.cat([torch.full((K + 1, P), -1, dtype=torch.long),
                      torch.cat([torch.full((1, n + A), -1, dtype=torch.long), step])], 1)
    if block:
        lay = layouts.packed_copies([L], spec.block_size,
                                    [_copy_blocks(P, n + A, masked[1:, P:], spec.block_size)])
        stream = lay.stream.long()
    else:
        lay = layouts.full([L] * K)
        stream = torch.arange(1, K + 1).repeat_interleave(L)
    pos = lay.position_ids
    at = stream * L + pos
    input_ids = torch.where(masked.flatten()[at], spec.mask_token_id, clean[pos])
    st = step.flatten()[at]
    rows = (st >= 0).nonzero().squeeze(1)
    weight = None
    if given == {True}:  # stream k >= 1 holds copy k - 1
        weight = torch.tensor([float(c.weight) for c in copies], dtype=torch.float32)[
            stream[rows] - 1]
    return Rows(input_ids, lay, rows, _targets(copies, clean, P, n)[stream[rows], pos[rows]],
                torch.zeros_like(rows), st[rows], pos[rows] - P, 1, weight)


def _targets(copies: Sequence[NoisyCopy], clean: torch.Tensor, P: int, n: int) -> torch.Tensor:
    """[K + 1, L] the token each (stream, position) is trained on: the clean one, but for a
    copy's own targets over the generated tokens."""
    out = clean.expand(len(copies) + 1, -1).clone()
    for k, c in enumerate(copies):
        if c.target is not None:
            out[k + 1, P:P + n] = c.target.long()
    return out


def _cat(parts, dtype=torch.long):
    return torch.tensor([x for p in parts for x in p], dtype=dtype, device=HOST)


def per_round_rows(trajectories, block_size: int, mask_token_id: int, shrinkage: int = 1) -> Rows:
    """The peers' layout, one [prompt | clean | noisy_r] row per round (TraceRL's code): the
    baseline that block_rows is checked and benchmarked against. Blocks without round r hold
    their clean tokens in row r (they are not trained there)."""
    ids, rows, prompt_lens, seq_lens = [], [], [], []
    tr_traj, tr_step, tr_gen, tr_tgt = [], [], [], []
    offset = 0
    for ti, t in enumerate(trajectories):
        P, n = len(t.prompt_ids), len(t.token_ids)
        clean = list(t.prompt_ids) + list(t.token_ids)
        groups = response_blocks(P, n, block_size)
        rounds = trace_rounds(shrink(list(t.step_map), groups, shrinkage), groups)
        first_block, n_blocks = layouts.response_block_span(P, P + n, block_size)
        first = first_block * block_size if n_blocks else P + n
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
                _cat([tr_tgt]), _cat([tr_traj]), _cat([tr_step]), _cat([tr_gen]),
                len(trajectories))
