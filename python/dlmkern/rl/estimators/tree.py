"""d-TreeRPO's segments (dlmkern.sampling.tree): noisy copy d of a tree leaf is its depth-d
ancestor's segment, scored in the parent's state: the tokens unmasked at steps [b_{d-1}, b_d)
are trained, every token unmasked at b_{d-1} or later is [MASK] (the parent's canvas), earlier
ones keep their values. A segment shared by several leaves is trained once, from its node's first
leaf (TreeLeaf.owns): the other leaves hold no copy of it. Rows.step is the depth minus one,
the column of the leaf's tree advantages (dlmkern.rl.advantages.tree_advantages) that the update
gives the segment's tokens. The after-EOS context is masked as the parent had it. Block models:
the rows' noisy blocks attend to the clean blocks before them, so each block of the segment is
scored as the parent had it, or, for a block the parent had not begun, as it began."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec


@dataclass(frozen=True)
class TreeSegments(Estimator):
    name = "tree"
    trace_steps = False  # one copy spans many sampler steps: not the sampler's own states
    random = False
    # each copy is a loss sequence of its own (d-TreeRPO averages tokens per segment, then
    # segments): the trainer makes every copy an item (dlmkern.trainers.rl)
    copies_are_items = True

    def copies(self, traj, spec: RowSpec, gen=None) -> list[NoisyCopy]:
        leaf = getattr(traj, "tree", None)
        if leaf is None:
            raise ValueError("estimator tree trains tree rollouts: the trajectory has no "
                             "Trajectory.tree (sample with tree_depth > 0)")
        n = len(traj.token_ids)
        if len(traj.step_map) != n:
            raise ValueError(f"step_map has {len(traj.step_map)} entries for {n} tokens")
        steps = torch.tensor(list(traj.step_map), dtype=torch.long, device=HOST)
        node = leaf.node_of(steps)
        after = torch.tensor(list(traj.after_eos_steps), dtype=torch.long, device=HOST)
        out = []
        for d, start in enumerate(leaf.spec.starts, start=1):
            trained = (node == d) & (steps >= 0)
            if not leaf.owns(d) or not bool(trained.any()):
                continue
            out.append(NoisyCopy(steps >= start, torch.where(trained, d - 1, -1), None,
                                 after >= start))
        return out
