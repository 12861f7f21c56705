"""The update stage (SPEC 4.6 / 2.4 / 4.9): for each planned mini-batch, the no-grad quantities of
the rollout-time policy (old / reference log-probs, values, GAE targets, the objective's per-token
inputs), then its optimizer steps. Policy and value terms go through `policy_value_loss` in ONE
call per pass (two under seq_mean, see Update._pass), which receives the run's Objective whole.

The stage holds what it uses, handed over explicitly by the trainer: the models and optimizers
(UpdateModels), the objective, the rest of its settings (UpdateSettings), the device and the
trainer's non-finite policy (a guard callable); it never sees the trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlmkern._host import HOST, read_floats
from dlmkern.models.lora import adapters_disabled
from dlmkern.ops import check_device_errors, policy_value_loss
from dlmkern.ops.objective import Objective, response_block_lengths, response_blocks, token_weights
from dlmkern.rl import Rows
from dlmkern.rl.advantages import trace_gae_batch
from dlmkern.trainers.plan import MiniBatch, Pass


def selected_logp(model, rows: Rows, device, *, temperature: float) -> torch.Tensor:
    """Log-probs of the rows' targets at their trained positions under softmax(logits /
    temperature) (the one place that builds this call). The trainer passes the sampler's
    temperature (Objective.temperature, from sampling.temperature): old, new and reference
    log-probs then score the policy the rollout drew from, as the sampler's own log-probs do."""
    return model(rows.input_ids.to(device), rows.layout.to(device),
                 rows=rows.train_rows.to(device), targets=rows.targets.to(device),
                 temperature=temperature)


def selected_values(value_model, rows: Rows, device) -> torch.Tensor:
    """The value model's V at the rows' trained positions."""
    return value_model(rows.input_ids.to(device), rows.layout.to(device))[
        rows.train_rows.to(device)]


@dataclass
class UpdateModels:
    """What the update scores and trains: the policy and its optimizer, the frozen KL reference
    (kl_to: ref), the value model and its optimizer (or None)."""

    model: torch.nn.Module
    opt: object                              # MixedPrecisionAdamW
    ref_model: torch.nn.Module | None = None
    value_model: torch.nn.Module | None = None
    value_opt: object | None = None
    ref_is_base: bool = False  # LoRA: the KL reference is the policy with adapters disabled


@dataclass(frozen=True)
class UpdateSettings:
    """The update's settings besides the objective (RLConfig's keys of the same names, and the
    blocks a ratio_level=block ratio groups by)."""

    gamma: float = 1.0
    lam: float = 1.0
    vf_clip: float = 0.2
    max_grad_norm: float = 1.0
    block_size: int | None = None      # block models' block size; None: full attention
    gen_block_length: int = 32         # full-attention models: the sampler's blocks


# guard(optimizer, what, {name: host float}) -> apply the step? (the trainer's non-finite policy)
Guard = Callable[[object, str, dict], bool]


@dataclass
class Prepared:
    """A pass's tensors, fixed at rollout time (no gradients)."""

    plan: Pass
    rows: Rows                        # on the device
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    adv: torch.Tensor                 # per trained token
    old_v: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    logp_gap: torch.Tensor | None = None  # sum |sampler logp - old logp| (trace rows)
    weights: torch.Tensor | None = None   # per trained token (objective.token_weights)
    block_ids: torch.Tensor | None = None  # per trained token (objective.ratio_level: block)
    copy_ids: torch.Tensor | None = None   # per trained token (objective.likelihood_bound)
    positions: torch.Tensor | None = None  # per trained token (objective.likelihood_bound)


class Update:
    """One `prepare` and one `step` per mini-batch and epoch, with the models, optimizers,
    objective and settings it is given."""

    def __init__(self, models: UpdateModels, objective: Objective, settings: UpdateSettings,
                 device, guard: Guard):
        self.models, self.objective, self.settings = models, objective, settings
        self.device, self.guard = device, guard

    def _logp(self, model, rows: Rows) -> torch.Tensor:
        """selected_logp at the sampler's temperature (validate refuses what it cannot score)."""
        return selected_logp(model, rows, self.device, temperature=self.objective.temperature)

    def _ref_logp(self, r: Rows, old: torch.Tensor) -> torch.Tensor:
        """The KL target's log-probs: the frozen reference copy, the policy with its LoRA
        adapters disabled (ref_is_base), or the old policy's."""
        ms = self.models
        if ms.ref_model is not None:
            return self._logp(ms.ref_model, r)
        if ms.ref_is_base:
            with adapters_disabled(ms.model):
                return self._logp(ms.model, r)
        return old

    def prepare(self, mb: MiniBatch, rows: list[Rows], trajs, sample_adv, rewards,
                trace_steps: bool) -> list[Prepared]:
        ms, obj, dev = self.models, self.objective, self.device
        out = []
        for p in mb.passes:
            host = Rows.cat([rows[i] for i in p.traj])
            r = host.to(dev)  # once: every epoch reuses it
            with torch.no_grad():
                ms.model.eval()
                old = self._logp(ms.model, r)
                ref = None
                if obj.kl_coef > 0:  # the KL target: the reference (kl_to: ref) or the old policy
                    ref = self._ref_logp(r, old)
                prep = Prepared(p, r, old, ref, None)
                if ms.value_model is not None:  # GAE over trace steps: the advantages
                    self._value_targets(prep, host, rewards[p.traj])
                else:  # per trajectory, or per (trajectory, Rows.step): MDPO's [n, steps],
                    # d-TreeRPO's [n, depths]
                    prep.adv = _token_advantages(sample_adv[p.traj], host).to(dev)
                if trace_steps:
                    prep.logp_gap = _sampler_gap(host, [trajs[i] for i in p.traj], old)
                self._objective_inputs(prep, host, [trajs[i] for i in p.traj])
            out.append(prep)
        return out

    def _objective_inputs(self, prep: Prepared, host: Rows, trajs) -> None:
        """The per-token inputs the objective reads (none for the default one): its token
        weights, and the blocks of a block ratio. Built from the host rows, moved once."""
        obj, st = self.objective, self.settings
        if obj.weighted:
            n = torch.tensor([len(t.token_ids) for t in trajs], device=HOST)
            plen = torch.tensor([len(t.prompt_ids) for t in trajs], device=HOST)
            blocks = lens = None
            if obj.token_weights == "block_elbo":  # each block's own rate
                blocks = response_blocks(host.gen_index, plen[host.traj], st.block_size,
                                         st.gen_block_length)
                lens = response_block_lengths(host.gen_index, plen[host.traj], n[host.traj],
                                              st.block_size, st.gen_block_length)
            old = prep.old_logp if obj.token_weights == "mdpo" else None
            prep.weights = token_weights(obj.token_weights, host.traj, host.step, n,
                                         host.copy_weight, blocks=blocks,
                                         block_lengths=lens, old_logp=old).to(self.device)
        if obj.over_copies:  # a token's noisy copy (Rows.step) and place in its completion
            prep.copy_ids = host.step.to(self.device)
        if obj.bounded:
            prep.positions = host.gen_index.to(self.device)
        if obj.ratio_level == "block":
            plen = torch.tensor([len(t.prompt_ids) for t in trajs], device=HOST)
            prep.block_ids = response_blocks(host.gen_index, plen[host.traj], st.block_size,
                                             st.gen_block_length).to(self.device)

    def _value_targets(self, prep: Prepared, host: Rows, rewards: torch.Tensor) -> None:
        """Values of the rollout-time value model at each trained token's noisy position, and
        GAE advantages / returns over trace steps (step structure read from the host rows)."""
        vm, r = self.models.value_model, prep.rows
        traj, step = host.traj, host.step
        vm.eval()
        old_v = selected_values(vm, r, self.device)
        prep.adv, prep.returns = trace_gae_batch(traj, step, old_v, rewards, self.settings.gamma,
                                                 self.settings.lam)
        prep.old_v = old_v

    def _pass(self, mb: MiniBatch, prep: Prepared, several: bool) -> dict:
        """Forward and backward of one pass; its statistics (0-d tensors). The value term rides
        in the policy's policy_value_loss call, except under seq_mean: one op reduction cannot
        be the policy's per-sequence mean and the value loss's token mean, so there the value
        term keeps its own call (its gradient stays that of the token-mean value loss)."""
        ms, obj, st = self.models, self.objective, self.settings
        vm = ms.value_model
        p, r = prep.plan, prep.rows
        logp = self._logp(ms.model, r)
        values = selected_values(vm, r, self.device) if vm is not None else None
        fused = vm is not None and obj.reduction != "seq_mean"
        mask = torch.ones_like(logp, dtype=torch.bool)
        loss, stats = policy_value_loss(
            logp, prep.old_logp, prep.adv, mask, objective=obj, ref_logp=prep.ref_logp,
            values=values if fused else None, old_values=prep.old_v if fused else None,
            returns=prep.returns if fused else None, weights=prep.weights,
            block_ids=prep.block_ids, copy_ids=prep.copy_ids, positions=prep.positions,
            vf_coef=_vf_coef(mb, p, obj, int(logp.numel())),
            vf_clip=st.vf_clip, seq_ids=r.traj, num_seqs=r.num_trajectories)
        # a single pass keeps the expression (and its rounding) of an unsplit step
        (loss * (mb.policy_scale * p.policy_share if several else mb.policy_scale)).backward()
        if vm is not None and not fused:
            z = torch.zeros_like(values)
            vloss, vst = policy_value_loss(z, z, z, mask, values=values, old_values=prep.old_v,
                                           returns=prep.returns, vf_coef=1.0,
                                           vf_clip=st.vf_clip)
            (vloss * (mb.value_scale * p.value_share if several else mb.value_scale)).backward()
            stats = dict(stats, vf_loss=vst["vf_loss"], vf_clip_frac=vst["vf_clip_frac"])
        return stats

    def step(self, mb: MiniBatch, prepared: list[Prepared]) -> dict:
        """One optimizer step of the policy (and the value model) on a prepared mini-batch."""
        ms, obj, st = self.models, self.objective, self.settings
        vm, opt, value_opt = ms.value_model, ms.opt, ms.value_opt
        ms.model.train()
        if vm is not None:
            vm.train()
            value_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        several = len(prepared) > 1
        parts = []
        for prep in prepared:
            p = prep.plan
            pass_stats = self._pass(mb, prep, several)
            if several:  # bf16 gradients summed in fp32
                opt.stash_grads()
                if vm is not None:
                    value_opt.stash_grads()
            if p.weight > 0 or mb.weight == 0 or not several:  # stand-in ranks keep theirs
                parts.append((p, pass_stats, prep))
        opt.unstash_grads()
        norms = {}
        if vm is not None:
            value_opt.unstash_grads()
            norms["value_grad_norm"] = torch.nn.utils.clip_grad_norm_(vm.parameters(),
                                                                      st.max_grad_norm)
        norms["grad_norm"] = torch.nn.utils.clip_grad_norm_(ms.model.parameters(),
                                                            st.max_grad_norm)
        # to host once, after every pass is queued (no sync between passes), and before the
        # optimizer steps: a non-finite loss or gradient norm never reaches the weights
        host, host_parts = _read_step(norms, parts, vm is not None)
        check_device_errors(self.device)  # the kernels' flag, once per optimizer step (CUDA)
        stats = {}
        if vm is not None:
            stats.update(_value_stats(host_parts, obj), value_grad_norm=host["value_grad_norm"])
        stats.update(combine_stats([(p.policy_share, s) for p, s, _ in host_parts],
                                   obj.kl_coef), grad_norm=host["grad_norm"])
        if vm is not None and self.guard(
                value_opt, "value", {"value_loss": stats["value_loss"],
                                     "value_grad_norm": stats["value_grad_norm"]}):
            value_opt.step()
        if self.guard(opt, "policy", {"loss": stats["loss"], "grad_norm": stats["grad_norm"]}):
            opt.step()
        # gradients are not kept past the step: the next rollout has their memory
        opt.zero_grad(set_to_none=True)
        if vm is not None:
            value_opt.zero_grad(set_to_none=True)
        return stats


def _token_advantages(sample_adv: torch.Tensor, host: Rows) -> torch.Tensor:
    """Each trained token's advantage: its trajectory's, or (a [n, steps] table of step-level
    advantages) its trajectory's at its Rows.step."""
    if sample_adv.dim() == 1:
        return sample_adv[host.traj]
    return sample_adv[host.traj, host.step]


def _vf_coef(mb: MiniBatch, p: Pass, obj: Objective, n_tokens: int) -> float:
    """vf_coef that gives the value model, through the fused loss's policy scaling, the gradient
    of its own token-mean loss at its own share (the two-call path's): equal scales for
    token_mean; a sum's normalizer and token count otherwise."""
    policy = mb.policy_scale * (p.policy_share if len(mb.passes) > 1 else 1.0)
    value = mb.value_scale * (p.value_share if len(mb.passes) > 1 else 1.0)
    if policy == 0:  # a stand-in: nothing flows back anyway
        return 1.0
    if obj.reduction == "sum":
        return value * obj.loss_normalizer / (policy * max(n_tokens, 1))
    return value / policy


def _sampler_gap(rows: Rows, trajs, old_logp: torch.Tensor) -> torch.Tensor:
    """sum over trained tokens of |sampler log-prob - trainer old log-prob|."""
    if rows.gen_index.numel() == 0:
        return old_logp.new_zeros(())
    lp = [torch.tensor(t.logprobs, dtype=torch.float32, device=HOST) for t in trajs]
    start = torch.tensor([0] + [len(x) for x in lp[:-1]], device=HOST).cumsum(0)
    sampler = torch.cat(lp)[start[rows.traj] + rows.gen_index]  # host rows
    return (sampler.to(old_logp.device) - old_logp.float()).abs().sum()


def _read_step(norms: dict, parts, valued: bool):
    """One host read for a mini-batch: the gradient norms and every pass's statistics (and,
    with a value model, the sum of its old values). Returns (norms, [(pass, stats, n_old_v)])
    as floats."""
    flat = dict(norms)
    for j, (_, st, prep) in enumerate(parts):
        flat.update({(j, k): v for k, v in st.items()})
        if valued:
            flat[(j, "old_v_sum")] = prep.old_v.sum()
    host = read_floats(flat)
    out = []
    for j, (p, st, prep) in enumerate(parts):
        keys = list(st) + (["old_v_sum"] if valued else [])
        n_v = int(prep.old_v.numel()) if valued else 0
        out.append((p, {k: host[(j, k)] for k in keys}, n_v))
    return {k: host[k] for k in norms}, out


def _value_stats(parts, obj: Objective) -> dict:
    """Value-loss statistics from the fused passes' host stats: the token-mean value loss
    (vf_loss is reduced like the policy loss: a sum is turned back into a mean)."""
    n = max(sum(k for *_, k in parts), 1)
    loss = clip = vsum = 0.0
    for p, st, k in parts:
        vf = st["vf_loss"]
        if obj.reduction == "sum":
            vf = vf * obj.loss_normalizer / max(k, 1)
        loss += p.value_share * vf
        clip += st["vf_clip_frac"] * k
        vsum += st["old_v_sum"]
    return {"value_loss": loss, "vf_clip_frac": clip / n, "value_mean": vsum / n}


_TOKEN_MEANS = ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean",
                "vf_clip_frac", "dual_clip_frac")


def combine_stats(parts, kl_coef: float) -> dict:
    """Mini-batch statistics from its passes' (share, stats): the loss terms by their share of
    the reduction, token fractions by token counts, the max ratio by max. `loss` is the policy
    objective pg + kl_coef * kl (the value term is reported as value_loss)."""
    for _, st in parts:
        st["loss"] = st["pg_loss"] + kl_coef * st["kl"]
        st.pop("vf_loss", None)
        st.pop("vf_clip_frac", None)
        st.pop("old_v_sum", None)
    if len(parts) == 1:
        return dict(parts[0][1])
    tokens = max(sum(st["num_tokens"] for _, st in parts), 1.0)
    out = {}
    for key in parts[0][1]:
        vals = [(share, st[key], st["num_tokens"]) for share, st in parts]
        if key == "ratio_max":
            out[key] = max(v for _, v, _ in vals)
        elif key == "num_tokens":
            out[key] = sum(v for _, v, _ in vals)
        elif key in _TOKEN_MEANS:
            out[key] = sum(v * n for _, v, n in vals) / tokens
        else:  # loss, pg_loss, kl: reduced like the loss
            out[key] = sum(share * v for share, v, _ in vals)
    return out
