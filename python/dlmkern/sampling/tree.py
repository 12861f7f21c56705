"""Tree rollouts (d-TreeRPO): every prompt grows a tree of partially denoised canvases.

A tree of depth D has its root (the prompt and an all-[MASK] response) at global step 0 and
branch steps 0 = b_0 < b_1 < ... < b_{D-1}: a node at depth d (1..D) holds the canvas at step
b_d (a leaf, d = D, the finished completion); its segment, the denoising steps [b_{d-1}, b_d),
is what it added to its parent. The root has `factors[0]` children, each node at depth d has
`factors[d]`: prod(factors) leaves per prompt, which are the sampler's ordinary trajectories
(leaf index = the mixed-radix number of its path, the first child varying slowest).

Siblings share their ancestors exactly: every node draws its own uniforms (one CPU generator per
node, seeded from the node's seed), and a leaf uses, at each step, the generator of the node
whose segment holds that step. Leaves of one node then run the same canvases, step map and draws
until the node's branch step, so the model proposes the same tokens and the rule picks the same
positions; `check_shared_prefix` verifies it after generation (a forward that is not
deterministic across identical rows of one batch would break it: an error, never a silent
mix-up)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlmkern.sampling.rules import sequence_seeds


@dataclass(frozen=True)
class TreeSpec:
    """factors[d]: children of each depth-d node (d = 0 the root); branch_steps: b_1..b_{D-1},
    the global steps at which the nodes of depth 1..D-1 fork."""

    factors: tuple[int, ...]
    branch_steps: tuple[int, ...]

    def __post_init__(self):
        if not self.factors or any(k < 1 for k in self.factors):
            raise ValueError(f"tree factors must be >= 1, got {self.factors}")
        b = (0, *self.branch_steps)
        if len(self.branch_steps) != len(self.factors) - 1 or any(
                x >= y for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(f"a depth-{len(self.factors)} tree needs {len(self.factors) - 1} "
                             f"increasing branch steps > 0, got {self.branch_steps}")

    @property
    def depth(self) -> int:
        return len(self.factors)

    @property
    def leaves(self) -> int:
        return math.prod(self.factors)

    @property
    def starts(self) -> tuple[int, ...]:
        """b_0..b_{D-1}: the first step of each depth's segment."""
        return (0, *self.branch_steps)

    def path(self, leaf: int) -> tuple[int, ...]:
        """The child index at each depth 1..D of leaf `leaf` (mixed radix, first depth slowest)."""
        out = []
        for k in reversed(self.factors):
            out.append(leaf % k)
            leaf //= k
        return tuple(reversed(out))

    def first_leaf(self, leaf: int, depth: int) -> int:
        """The first leaf under `leaf`'s ancestor at `depth` (1..D): its representative."""
        below = math.prod(self.factors[depth:])
        return leaf // below * below

    def segment(self, step: int) -> int:
        """The depth (1..D) of the node whose segment holds global step `step`."""
        return sum(step >= b for b in self.branch_steps) + 1


@dataclass(frozen=True)
class TreeLeaf:
    """A leaf trajectory's place in its prompt's tree (Trajectory.tree)."""

    spec: TreeSpec
    leaf: int                       # index among the prompt's leaves

    @property
    def path(self) -> tuple[int, ...]:
        return self.spec.path(self.leaf)

    def owns(self, depth: int) -> bool:
        """This leaf trains its depth-`depth` ancestor's segment (it is that node's first leaf:
        a shared segment is trained once, from one leaf)."""
        return self.spec.first_leaf(self.leaf, depth) == self.leaf

    def node_of(self, steps: torch.Tensor) -> torch.Tensor:
        """Per generated token (its step), the depth (1..D) of the node that unmasked it."""
        b = torch.tensor(self.spec.branch_steps, dtype=torch.long, device=steps.device)
        return (steps[:, None] >= b[None, :]).sum(-1) + 1 if b.numel() else \
            torch.ones_like(steps)


class TreeDraws:
    """SequenceDraws for tree leaves: sequence i at step s draws from its own copy of the
    generator of the node whose segment holds s (seeded by that node's seed), so the leaves of a
    node draw the same uniforms until it forks."""

    def __init__(self, spec: TreeSpec, leaves: list[int], bases: list[int]):
        """leaves[i]: sequence i's leaf index; bases[i]: the seed of its prompt's first leaf."""
        self.spec = spec
        self.gens = [[torch.Generator(device="cpu").manual_seed(_node_seed(spec, lf, d, base))
                      for d in range(1, spec.depth + 1)]
                     for lf, base in zip(leaves, bases, strict=True)]

    def part(self, lo: int, hi: int) -> TreeDraws:
        """The draws of sequences lo..hi-1 (a chunk of whole trees)."""
        out = TreeDraws(self.spec, [], [])
        out.gens = self.gens[lo:hi]
        return out

    def block(self, live: list[bool], n_iter: int, width: int, device,
              steps: list[list[int]] | None = None) -> torch.Tensor:
        """Like SequenceDraws.block; steps[i][it]: the global step of sequence i's iteration it."""
        out = torch.ones(n_iter, len(live), width, device="cpu")
        for i, (gens, on) in enumerate(zip(self.gens, live, strict=False)):
            if on:
                for it in range(n_iter):
                    g = gens[self.spec.segment(steps[i][it]) - 1]
                    out[it, i] = 1.0 - torch.rand(width, generator=g, device="cpu")
        return out.to(device, non_blocking=True)


def _node_seed(spec: TreeSpec, leaf: int, depth: int, base: int) -> int:
    """A node's seed: from the seed of its prompt's first leaf (base), the node's first leaf and
    its depth; the same for every leaf under it."""
    return (base * 1000003 + spec.first_leaf(leaf, depth) * 131 + depth) % (2**63)


def _canvas(t) -> tuple[list[int], list[int]]:
    """A trajectory's whole response canvas: tokens and steps, the after-EOS context included."""
    return (list(t.token_ids) + list(t.after_eos_ids),
            list(t.step_map) + list(t.after_eos_steps))


def check_shared_prefix(trajs: list, spec: TreeSpec) -> None:
    """Raise unless every leaf has, at every position its depth-d ancestor's first leaf
    unmasked before b_d (d < D), the same token at the same step (and vice versa)."""
    L = spec.leaves
    for i, t in enumerate(trajs):
        toks, steps = _canvas(t)
        for d, b in enumerate(spec.branch_steps, start=1):
            j = i // L * L + spec.first_leaf(i % L, d)
            rt, rs = _canvas(trajs[j])
            mine = {p: (x, s) for p, (x, s) in enumerate(zip(toks, steps, strict=True))
                    if 0 <= s < b}
            theirs = {p: (x, s) for p, (x, s) in enumerate(zip(rt, rs, strict=True))
                      if 0 <= s < b}
            if mine != theirs:
                raise RuntimeError(
                    f"tree leaf {i % L} of prompt {i // L} differs from leaf {j % L} before "
                    f"their shared ancestor's branch step {b}: the sampler's forward is not "
                    f"deterministic across identical rows of one batch")


def generate_tree(sampler, prompts: list[list[int]], spec: TreeSpec, seed: int = 0,
                  seeds: list[int] | None = None) -> list:
    """A sampler's tree rollout: spec.leaves trajectories per prompt (prompt-major, leaf
    order), each with Trajectory.tree set, run by the sampler's `_generate(prompts, seeds,
    given, draws=TreeDraws)` in chunks of whole trees (at most config.max_seqs leaves, at least
    one tree); siblings' shared prefixes are checked. `seeds`: one per leaf, as generate takes
    them; a prompt's tree draws from its first leaf's."""
    L = spec.leaves
    flat = [list(p) for p in prompts for _ in range(L)]
    sd = sequence_seeds(len(flat), seed, seeds)
    leaves = [i % L for i in range(len(flat))]
    draws = TreeDraws(spec, leaves, [sd[i // L * L] for i in range(len(flat))])
    cap = sampler.cfg.max_seqs
    step = max(cap // L, 1) * L if cap else max(len(flat), 1)
    out = []
    for lo in range(0, len(flat), step):
        out += sampler._generate(flat[lo:lo + step], sd[lo:lo + step],
                                 [{} for _ in flat[lo:lo + step]],
                                 draws=draws.part(lo, lo + step))
    for i, t in enumerate(out):
        t.tree = TreeLeaf(spec, leaves[i])
    check_shared_prefix(out, spec)
    return out
