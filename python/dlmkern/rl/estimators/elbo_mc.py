"""ELBO Monte Carlo (ESPO's estimator): M noisy copies of a completion, each masking every
response token with probability t ~ U(eps, 1); the masked tokens are trained, copy c's with the
ELBO weight (1 / M) / t_c (NoisyCopy.weight = 1 / M; t_c the share the copy masks), so that the
weighted sum of a trajectory's log-probs is the Monte Carlo mean of the M ELBO estimates.

``mask_coupling``: ``independent`` draws M masks; ``complementary`` draws M masks and adds each
one's complement (2M copies, every token trained once per pair, weights 1 / (2M) / t): ESPO's
variance reduction (``reduce_var`` in its code, after coupled-GRPO), chosen over antithetic
rates t and 1 - t with independent masks because the paper's code does this. A copy that masks
nothing is dropped and the weights are over the copies kept (1 / K for K copies), so the ELBO
weights of a trajectory always sum to its length.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec, trained_copies, uniform_mask

MASK_COUPLINGS = ("independent", "complementary")


@dataclass(frozen=True)
class ElboMC(Estimator):
    num_masks: int = 1
    mask_coupling: str = "independent"

    name = "elbo_mc"
    trace_steps = False
    random = True

    def __post_init__(self):
        if self.num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {self.num_masks}")
        if self.mask_coupling not in MASK_COUPLINGS:
            raise ValueError(f"mask_coupling must be one of {', '.join(MASK_COUPLINGS)}, got "
                             f"{self.mask_coupling!r}")

    def copies(self, traj, spec: RowSpec, gen) -> list[NoisyCopy]:
        n = len(traj.token_ids)
        if not n:
            return []
        masks = []
        for _ in range(self.num_masks):
            m = uniform_mask(n, gen)
            masks += [m, ~m] if self.mask_coupling == "complementary" else [m]
        return weighted_copies(masks, [1.0] * len(masks))


def weighted_copies(masks, weights) -> list[NoisyCopy]:
    """trained_copies with NoisyCopy.weight: each kept copy's weight, renormalised to sum to 1
    over the copies kept (a copy that masks nothing is dropped)."""
    kept = [w for m, w in zip(masks, weights, strict=True) if bool(m.any())]
    total = sum(kept)
    return [NoisyCopy(c.masked, c.step, weight=w / total)
            for c, w in zip(trained_copies(masks), kept, strict=True)]
