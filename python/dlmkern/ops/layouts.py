"""Layout builders for block_attention (SPEC 2.1 / 4.2).

A layout packs sequences back to back (varlen, ``cu_seqlens``) and gives every token its absolute
``block`` (position // block_size, positions counted from the start of the sequence including the
prompt), its ``stream`` (0 = clean copy, r >= 1 = noisy copy r) and its ``position_ids`` (RoPE
position; a noisy copy shares the positions of the clean tokens it copies). One visibility rule
(see ``csrc/include/dlmkern/block_mask.h``) then covers every layout below.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dlmkern._host import HOST, on_host


@dataclass
class Layout:
    block: torch.Tensor         # [T] int32
    stream: torch.Tensor        # [T] int32
    position_ids: torch.Tensor  # [T] int64, position in the sequence's clean copy
    cu_seqlens: torch.Tensor    # [S + 1] int32
    max_seqlen: int
    full: bool = False          # bidirectional attention per sequence (LLaDA / Dream)

    @property
    def num_tokens(self) -> int:
        return int(self.block.numel())

    def to(self, device) -> Layout:
        if self.cu_seqlens.device == torch.device(device):
            return self  # already there (and validated when it was built or moved)
        return _trusted(Layout(self.block.to(device), self.stream.to(device),
                               self.position_ids.to(device), self.cu_seqlens.to(device),
                               self.max_seqlen, self.full))


def offsets(lens: Sequence[int]) -> list[int]:
    """[0, l0, l0 + l1, ...]: the cu_seqlens of sequences of these lengths, as host ints."""
    return [0, *itertools.accumulate(int(n) for n in lens)]


def _trusted(lay: Layout) -> Layout:
    """Validates the layout's cu_seqlens / stream values once (one host sync) so that every
    block_attention call on these tensors (each layer, forward and backward) skips its own
    host-side value checks. In-place changes to them make them checked again."""
    cu, stream = lay.cu_seqlens, lay.stream
    real = type(cu) is torch.Tensor and type(stream) is torch.Tensor  # not fake / subclasses
    if real and not cu.is_meta and not torch.compiler.is_compiling():
        torch.ops.dlmkern._trust_layout(cu, stream)
    return lay


def _pack(parts: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, full=False) -> Layout:
    """parts: per sequence (positions [n] int64, streams [n] int64)."""
    lens = [int(p.numel()) for p, _ in parts]
    cu = torch.tensor(offsets(lens), dtype=torch.int32, device=HOST)
    empty = torch.zeros(0, dtype=torch.int64, device=HOST)
    pos = torch.cat([p for p, _ in parts]) if parts else empty
    stream = torch.cat([s for _, s in parts]) if parts else empty
    block = torch.zeros_like(pos) if full else pos // block_size
    return _trusted(Layout(block.to(torch.int32), stream.to(torch.int32), pos, cu,
                           max(lens, default=0), full))


def _check(block_size: int, **lists):
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = None
    for name, v in lists.items():
        if n is not None and len(v) != n:
            raise ValueError(f"`{name}` has {len(v)} entries, expected {n}")
        n = len(v)
        if name not in ("block_rounds", "copies") and any(int(x) < 0 for x in v):
            raise ValueError(f"`{name}` entries must be >= 0")


def _ar(a: int, b: int) -> torch.Tensor:
    return torch.arange(a, b, dtype=torch.int64, device=HOST)


@on_host
def block_causal(seq_lens: Sequence[int], block_size: int) -> Layout:
    """Plain block-causal sequences (prefill, block SFT on clean text): one clean copy each."""
    _check(block_size, seq_lens=seq_lens)
    return _pack([(_ar(0, n), torch.zeros(n, dtype=torch.int64)) for n in seq_lens], block_size)


@on_host
def full(seq_lens: Sequence[int]) -> Layout:
    """Bidirectional attention inside each sequence (LLaDA / Dream)."""
    _check(1, seq_lens=seq_lens)
    return _pack([(_ar(0, n), torch.zeros(n, dtype=torch.int64)) for n in seq_lens], 1,
                 full=True)


@on_host
def bd3(seq_lens: Sequence[int], block_size: int) -> Layout:
    """The BD3 / DiRL training layout [noisy | clean]: a noisy copy (stream 1) of the whole
    sequence, then its clean copy (stream 0), both with positions 0..L-1."""
    _check(block_size, seq_lens=seq_lens)
    parts = []
    for n in seq_lens:
        parts.append((torch.cat([_ar(0, n), _ar(0, n)]),
                      torch.cat([torch.ones(n, dtype=torch.int64),
                                 torch.zeros(n, dtype=torch.int64)])))
    return _pack(parts, block_size)


def response_block_span(prompt_len: int, seq_len: int, block_size: int) -> tuple[int, int]:
    """(first_block, n_blocks): the absolute blocks (position // block_size) that hold the
    response tokens, positions prompt_len .. seq_len - 1. A prompt ending mid-block shares its last
    block with the response. No response: (prompt_len // block_size, 0)."""
    first = prompt_len // block_size
    if seq_len <= prompt_len:
        return first, 0
    return first, -(-seq_len // block_size) - first


def _blocks(blocks: Sequence[int] | torch.Tensor) -> list[int]:
    return blocks.tolist() if isinstance(blocks, torch.Tensor) else [int(x) for x in blocks]


@on_host
def packed_copies(seq_lens: Sequence[int], block_size: int,
                  copies: Sequence[Sequence[Sequence[int] | torch.Tensor]]) -> Layout:
    """dlmkern's packed KV-reuse layout (SPEC 4.2) from explicit noisy copies, one packed
    sequence per trajectory: [clean copy (stream 0) | copy 1 | ... | copy K].

    ``copies[i][c - 1]``: the absolute block indices (increasing) noisy copy c of trajectory i
    holds. A copy holds whole blocks (clipped to the sequence; a prompt tail in a block is part of
    it) at the clean copy's positions. The packing order of every KV-reuse layout lives here.
    """
    _check(block_size, seq_lens=seq_lens, copies=copies)
    parts = []
    for n, segments in zip(seq_lens, copies, strict=True):
        n_blocks = -(-int(n) // block_size)
        blocks = [_blocks(b) for b in segments]
        for c, b in enumerate(blocks, 1):
            ordered = all(x < y for x, y in itertools.pairwise(b))
            if not ordered or any(not 0 <= x < n_blocks for x in b):
                raise ValueError(f"noisy copy {c} holds blocks {b}: expected increasing indices "
                                 f"in [0, {n_blocks}) (length {n}, block size {block_size})")
        block = torch.tensor([x for b in blocks for x in b], dtype=torch.int64, device=HOST)
        copy = torch.tensor([c for c, b in enumerate(blocks, 1) for _ in b], dtype=torch.int64,
                            device=HOST)
        pos = (block[:, None] * block_size + _ar(0, block_size)).flatten()
        keep = pos < n  # the sequence's last block may be partial
        parts.append((torch.cat([_ar(0, n), pos[keep]]),
                      torch.cat([torch.zeros(n, dtype=torch.int64, device=HOST),
                                 copy.repeat_interleave(block_size)[keep]])))
    return _pack(parts, block_size)


@on_host
def tracerl(prompt_lens: Sequence[int], seq_lens: Sequence[int], block_size: int) -> Layout:
    """TraceRL's layout [prompt | clean response | noisy response] for one round.

    The noisy copy (stream 1) covers every block holding response tokens, whole: when the prompt
    ends mid-block, that block's prompt tail is part of the noisy copy too (unmasked), exactly as
    the sampler denoises that block.
    """
    _check(block_size, prompt_lens=prompt_lens, seq_lens=seq_lens)
    copies = []
    for p, n in zip(prompt_lens, seq_lens, strict=True):
        if p > n:
            raise ValueError(f"prompt length {p} exceeds sequence length {n}")
        first, n_blocks = response_block_span(p, n, block_size)
        copies.append([range(first, first + n_blocks)])
    return packed_copies(seq_lens, block_size, copies)


@on_host
def packed_rounds(
    prompt_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_size: int,
    block_rounds: Sequence[Sequence[int]],
) -> Layout:
    """dlmkern's packed KV-reuse layout (SPEC 4.2), one packed sequence per trajectory:
    [prompt + clean response (stream 0) | noisy_1 | ... | noisy_K].

    ``block_rounds[i][j]`` is the number of rounds of the j-th block of trajectory i that holds
    response tokens (blocks from prompt_len // block_size on). Noisy copy r holds, in order, the
    whole blocks with at least r rounds (``packed_copies``).
    """
    _check(block_size, prompt_lens=prompt_lens, seq_lens=seq_lens, block_rounds=block_rounds)
    copies = []
    for p, n, rounds in zip(prompt_lens, seq_lens, block_rounds, strict=True):
        first, n_blocks = response_block_span(p, n, block_size)
        rounds = [int(r) for r in rounds]
        if len(rounds) != n_blocks:
            raise ValueError(
                f"block_rounds has {len(rounds)} entries for a trajectory with {n_blocks} "
                f"response blocks (prompt {p}, length {n}, block size {block_size})"
            )
        if any(r < 0 for r in rounds):
            raise ValueError("block_rounds entries must be >= 0")
        copies.append([[first + j for j, nr in enumerate(rounds) if nr >= r]
                       for r in range(1, max(rounds, default=0) + 1)])
    return packed_copies(seq_lens, block_size, copies)


@on_host
def cat(parts: Sequence[Layout]) -> Layout:
    """Concatenation of packed layouts (their sequences back to back); all full or all not.
    The result is validated once, like every builder's."""
    if not parts:
        raise ValueError("layouts.cat: no layouts to concatenate")
    full = parts[0].full
    if any(p.full != full for p in parts):
        raise ValueError("layouts.cat: cannot mix full-attention and block layouts")
    tokens = offsets([p.num_tokens for p in parts])
    cu = [parts[0].cu_seqlens[:1]] + [p.cu_seqlens[1:] + off
                                      for p, off in zip(parts, tokens, strict=False)]
    return _trusted(Layout(torch.cat([p.block for p in parts]),
                           torch.cat([p.stream for p in parts]),
                           torch.cat([p.position_ids for p in parts]),
                           torch.cat(cu), max(p.max_seqlen for p in parts), full))


@on_host
def dense_mask(layout: Layout) -> torch.Tensor:
    """The [T, T] boolean visibility matrix of a layout (for references and tests only)."""
    T = layout.num_tokens
    seq = torch.zeros(T, dtype=torch.int64)
    cu = layout.cu_seqlens.to(torch.int64)
    for i in range(len(cu) - 1):
        seq[cu[i]:cu[i + 1]] = i
    same = seq[:, None] == seq[None, :]
    if layout.full:
        return same
    return same & visible(layout.block[:, None], layout.stream[:, None], layout.block[None, :],
                          layout.stream[None, :])


def visible(q_block, q_stream, k_block, k_stream):
    """The SPEC 2.1 rule on tensors (broadcasting), mirroring dlmkern/block_mask.h."""
    clean_k = k_stream == 0
    clean_vis = torch.where(q_stream == 0, k_block <= q_block, k_block < q_block)
    noisy_vis = (k_stream == q_stream) & (k_block == q_block)
    return torch.where(clean_k, clean_vis, noisy_vis)
