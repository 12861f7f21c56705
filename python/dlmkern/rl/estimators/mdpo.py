"""MDPO (He et al. 2025): one noisy copy per trained sampler step k (Trajectory.prediction_steps,
the steps whose decoded completions were kept: every step, or MDPO's top-k), holding the state
the sampler saw at step k (the tokens decoded at step k or later [MASK]ed, as trace rows) and
training EVERY still-masked generated position on the step's own prediction there
(Trajectory.step_predictions: the completion decoded from that state, which was rewarded):
at the positions committed at step k that is the committed token, elsewhere the prediction the
step made and a later step may have overruled. Rows.step is k. Full-attention models only (the
block sampler's state at step k holds no later blocks: RLConfig.check_model refuses them).
Positions after EOS are context as in trace rows, never trained (DARE trains the whole canvas)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.rl.estimators.base import Estimator, NoisyCopy, RowSpec


@dataclass(frozen=True)
class MDPOSteps(Estimator):
    name = "mdpo"
    trace_steps = False  # every masked position trains, not one trace step's tokens
    random = False

    def copies(self, traj, spec: RowSpec, gen=None) -> list[NoisyCopy]:
        n = len(traj.token_ids)
        preds = getattr(traj, "step_predictions", None)
        if spec.block_size is not None:
            raise ValueError("estimator mdpo is for full-attention models (block_size None)")
        if preds is None:
            raise ValueError("estimator mdpo needs the sampler's decoded completion at each step "
                             "(FullSampler(record_predictions=True): advantage mdpo)")
        steps = torch.tensor(list(traj.step_map), dtype=torch.long, device=HOST)
        after = torch.tensor(list(getattr(traj, "after_eos_steps", [])), dtype=torch.long,
                             device=HOST)
        out = []
        for row, k in enumerate(traj.prediction_steps):
            masked = steps >= k
            out.append(NoisyCopy(masked, torch.where(masked, k, -1),
                                 after_eos_masked=after >= k,
                                 target=preds[row, :n].long()))
        return out
