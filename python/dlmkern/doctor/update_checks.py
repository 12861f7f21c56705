"""What one training update must do, checked on any device: an RL update moves log-probabilities
the way the advantages say (and the rollout's advantages rank completions as their rewards do),
updates move a value model's values toward the returns, an SFT step lowers the loss, and one
step's gradients equal those of the pure-torch reference backend (``use_backend("reference")``)
on the same device, from the same weights and data. The doctor's trainer rows run these; the
trainer tests import them from here (one owner)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from dlmkern.ops import use_backend
from dlmkern.rl import Rows
from dlmkern.rl.advantages import trace_gae_batch
from dlmkern.trainers.update import selected_logp, selected_values

# One step's gradients against the reference backend's: the largest relative L2 error over the
# models a step trains (policy, value model), ||g - g_ref|| / ||g_ref||. Measured on the doctor's
# tiny models (2026-12-04, CPU): fp32 <= 3e-6, bf16 kernels and bf16 weights <= 1.2e-2; a 10x
# gradient gives 9, a sign flip 2, an attention output 10 % off >= 0.1 (fp32).
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def trajectory_logp(trainer, trajs) -> torch.Tensor:
    """Each trajectory's summed log-probability of its trained tokens, on the trainer's own rows
    (the rows and masks its update uses: random estimators draw them from seed, step and place),
    in fp32 on the host."""
    rows = Rows.cat(trainer.rows(trajs))
    with torch.no_grad():
        lp = selected_logp(trainer.model, rows, trainer.device,
                           temperature=trainer.cfg.sampling.temperature).float().cpu()
    return torch.zeros(len(trajs)).index_add(0, rows.traj.cpu(), lp)


def advantages_order_as_rewards(batch) -> None:
    """The rollout's own advantages (group z-scores, or a tree leaf's local advantage among its
    siblings; none with a value model, whose GAE runs in the update) rank every group's
    completions as their rewards do. Raises AssertionError when
    a pair is ranked the other way round, or when no group has a reward spread to rank."""
    if batch.advantages is None:
        return
    g, a = batch.group_size, batch.advantages.float().cpu()
    if a.dim() == 2:  # tree rollouts: a leaf's own column ranks it against its siblings
        g, a = batch.trajs[0].tree.spec.factors[-1], a[:, -1]
    r = batch.rewards.float().cpu().view(-1, g)
    a = a.view(-1, g)
    dr, da = r[:, :, None] - r[:, None, :], a[:, :, None] - a[:, None, :]
    spread = dr != 0
    if not bool(spread.any()):
        raise AssertionError("no group of the rollout has a reward spread: nothing to rank")
    wrong = int(((dr * da)[spread] <= 0).sum()) // 2
    if wrong:
        raise AssertionError(f"the rollout's advantages rank {wrong} pair(s) of completions "
                             "against their rewards")


def update_follows_the_advantage(make: Callable[[], object], trajs, advantages: Sequence[float]
                                 ) -> dict:
    """First order, a step on -sum(A_i logp_i) raises sum(A_i logp_i); alone, a positive-advantage
    trajectory gains log-probability and a negative one loses it. ``make()`` builds a fresh RL
    trainer (the same weights every call); ``trajs`` one group of its rollout; ``advantages``
    theirs, passed as the rewards too: with a value model the update's GAE makes the advantages,
    which equal the rewards at a fresh value model's V = 0 (gamma = lam = 1; the same signs
    otherwise). Log-probs are read on the trainer's own rows (same step, same masks). Raises
    AssertionError saying what moved the wrong way; returns the update's statistics."""
    adv = torch.tensor([float(a) for a in advantages])
    if len(adv) != len(trajs) or not (adv > 0).any() or not (adv < 0).any():
        raise ValueError("update_follows_the_advantage: one advantage per trajectory, of both "
                         "signs")
    tr = make()
    before = trajectory_logp(tr, trajs)
    stats = tr.update(trajs, adv, adv.clone())
    if "skipped" in stats:
        raise AssertionError(f"the update was skipped: {stats['skipped']}")
    if not math.isfinite(stats["loss"]):
        raise AssertionError(f"the update's loss is {stats['loss']}")
    gain = float((adv * (trajectory_logp(tr, trajs) - before)).sum())
    if not gain > 0:
        raise AssertionError(f"the update changed sum(A logp) by {gain:+.2e}: it moved against "
                             "the advantages")
    for i in (int((adv > 0).nonzero()[0]), int((adv < 0).nonzero()[0])):
        single = make()
        b = trajectory_logp(single, trajs[i:i + 1])
        single.update(trajs[i:i + 1], adv[i:i + 1], adv[i:i + 1].clone())
        delta = float(trajectory_logp(single, trajs[i:i + 1]) - b)
        if not delta * float(adv[i]) > 0:
            raise AssertionError(f"alone, a trajectory of advantage {float(adv[i]):+g} changed "
                                 f"its log-probability by {delta:+.2e}")
    return stats


def value_moves_toward_the_returns(trainer, trajs, rewards: torch.Tensor, updates: int = 4
                                  ) -> tuple[float, float]:
    """``updates`` updates of ``trainer`` (with a value model) on the same trajectories train
    its values toward the returns R (GAE's, on the trainer's own rows: they do not depend on the
    values): the update's value loss falls from the first update to the last, and the RMS of
    V - R over the trained tokens falls (the square error, as the value loss minimizes: a mean
    |V - R| stays 0.5 from V = 0 to V = 0.5 on returns 0 / 1). Returns the RMS before and after;
    raises AssertionError when either did not fall."""
    if trainer.value_model is None:
        raise ValueError("value_moves_toward_the_returns: the trainer has no value model")
    rows = Rows.cat(trainer.rows(trajs))

    def values() -> torch.Tensor:
        trainer.value_model.eval()
        with torch.no_grad():
            return selected_values(trainer.value_model, rows, trainer.device).float()

    v = values()
    _, returns = trace_gae_batch(rows.traj, rows.step, v, rewards.float().to(v.device),
                                 trainer.cfg.gamma, trainer.cfg.lam)
    before = float((v - returns).square().mean().sqrt())
    if not before > 0:
        raise ValueError("value_moves_toward_the_returns: the values already equal the returns")
    losses = []
    for _ in range(updates):
        stats = trainer.update(trajs, rewards.clone(), rewards.clone())
        if "skipped" in stats:
            raise AssertionError(f"the update was skipped: {stats['skipped']}")
        losses.append(stats["value_loss"])
    after = float((values() - returns).square().mean().sqrt())
    if not losses[-1] < losses[0]:
        raise AssertionError(f"{updates} updates moved the value loss from {losses[0]:.4f} to "
                             f"{losses[-1]:.4f}")
    if not after < before:
        raise AssertionError(f"{updates} updates moved the values' RMS error from {before:.4f} "
                             f"to {after:.4f}: away from the returns")
    return before, after


def sft_step_lowers_the_loss(trainer, rows, seeds) -> float:
    """One SFT train_step lowers the loss of ``rows`` under fixed masks (``seeds``; the step
    draws its own batch from them on a small data set). Returns the relative fall; raises
    AssertionError when the loss did not fall."""
    with torch.no_grad():
        before = float(trainer.loss(rows, seeds))
    log = trainer.train_step()
    if "skipped" in log:
        raise AssertionError(f"the SFT step was skipped: {log['skipped']}")
    with torch.no_grad():
        after = float(trainer.loss(rows, seeds))
    if not after < before:
        raise AssertionError(f"an SFT step moved the loss from {before:.4f} to {after:.4f}")
    return (before - after) / before


def first_step_gradients(optimizers, run: Callable[[], object]) -> list[torch.Tensor]:
    """The gradients each optimizer applies at its first step inside ``run()`` (after clipping),
    flattened in fp32 on the host, one tensor per optimizer (None entries skipped)."""
    opts = [o for o in optimizers if o is not None]
    seen: dict[int, torch.Tensor] = {}

    def record(opt, *_):
        if id(opt) not in seen:
            seen[id(opt)] = torch.cat([p.grad.detach().float().flatten().cpu()
                                       for g in opt.param_groups for p in g["params"]
                                       if p.grad is not None])

    hooks = [o.register_step_pre_hook(record) for o in opts]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    if len(seen) != len(opts):
        raise AssertionError("the step took no optimizer step (skipped?)")
    return [seen[id(o)] for o in opts]


def gradients_vs_reference(make: Callable[[], object], run: Callable[[object], object]
                           ) -> float:
    """One step's gradients with the native kernels against the reference backend on the same
    device: ``make()`` builds a fresh trainer (the same weights and data every call; configure
    it without gradient clipping, which would hide a gradient's scale), ``run(trainer)`` takes
    the step (on fixed data: trajectories sampled beforehand). Returns the largest relative L2
    error over the models the step trains (policy, value model)."""
    grads = {}
    for backend in ("native", "reference"):
        with use_backend(backend):
            tr = make()
            grads[backend] = first_step_gradients(
                [tr.opt, getattr(tr, "value_opt", None)], lambda tr=tr: run(tr))
    worst = 0.0
    for g, want in zip(grads["native"], grads["reference"], strict=True):
        norm = float(want.norm())
        if not norm > 0 or not math.isfinite(norm):
            raise AssertionError(f"the reference gradient's norm is {norm}")
        err = float((g - want).norm()) / norm
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst
