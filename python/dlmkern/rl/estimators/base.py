"""The estimator interface (SPEC 4.5). An estimator says what each noisy copy of a trajectory
masks and trains (``copies``); the one shared builder, dlmkern.rl.rows.build_rows, turns that
into rows for block or full-attention models."""

from __future__ import annotations

import torch

from dlmkern._host import HOST, on_host
from dlmkern.rl.rows import NoisyCopy, Rows, RowSpec, build_rows

__all__ = ["EPS", "Estimator", "NoisyCopy", "RowSpec", "exact_mask", "trained_copies",
           "uniform_mask"]

EPS = 1e-3  # random masking draws its rate t ~ U(EPS, 1): never a copy that masks nothing


class Estimator:
    """Base class; subclasses set the class attributes and implement ``copies``."""

    name: str = ""
    trace_steps: bool = False  # Rows.step are denoising trace steps (GAE over them is meaningful)
    random: bool = False       # draws random masks: rows(...) needs a torch.Generator (CPU)
    copies_are_items: bool = False  # each noisy copy is a loss sequence of its own (d-TreeRPO)

    def copies(self, traj, spec: RowSpec, gen: torch.Generator | None) -> list[NoisyCopy]:
        """What each noisy copy of ONE trajectory (prompt_ids, token_ids, step_map) masks and
        trains. Random draws come from `gen` (a CPU generator), in a fixed order. The baselines
        leave NoisyCopy.after_eos_masked None: their masks reproduce no sampler step, so their
        rows stay on prompt + completion (only trace rows hold the after-EOS context)."""
        raise NotImplementedError

    @on_host
    def rows(self, traj, spec: RowSpec, gen: torch.Generator | None = None) -> Rows:
        """Training rows of ONE trajectory (batches: dlmkern.rl.batch_rows / Rows.cat)."""
        if self.random and gen is None:
            raise ValueError(f"estimator {self.name!r} draws random masks: pass a "
                             "torch.Generator")
        return build_rows(traj, self.copies(traj, spec, gen), spec)

    @on_host
    def copy_rows(self, traj, spec: RowSpec, gen: torch.Generator | None = None) -> list[Rows]:
        """The rows of ONE trajectory, one Rows per noisy copy (each with its own clean
        context): the same draws and trained tokens as ``rows``, for a forward per copy."""
        if self.random and gen is None:
            raise ValueError(f"estimator {self.name!r} draws random masks: pass a "
                             "torch.Generator")
        return [build_rows(traj, [c], spec) for c in self.copies(traj, spec, gen)
                if bool(c.masked.any())]


def uniform_mask(n: int, gen: torch.Generator, eps: float = EPS) -> torch.Tensor:
    """[n] bool: each token masked with probability t ~ U(eps, 1) (random-masking RL). Draws a
    scalar, then n uniforms."""
    t = eps + (1 - eps) * float(torch.rand((), generator=gen, device=HOST))
    return torch.rand(n, generator=gen, device=HOST) < t


def exact_mask(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n] bool: exactly k of the n tokens masked, chosen uniformly (one randperm draw)."""
    m = torch.zeros(n, dtype=torch.bool, device=HOST)
    m[torch.randperm(n, generator=gen, device=HOST)[:k]] = True
    return m


def trained_copies(masks: list[torch.Tensor]) -> list[NoisyCopy]:
    """Copies that train exactly the tokens they mask. A mask without a token is dropped; step is
    the copy's index among those kept (0, 1, ...)."""
    kept = [m for m in masks if bool(m.any())]
    return [NoisyCopy(m, torch.full(m.shape, -1, dtype=torch.long, device=HOST).masked_fill(m, c))
            for c, m in enumerate(kept)]
