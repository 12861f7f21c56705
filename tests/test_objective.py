"""The objective as data (issue #28 item 1, SPEC 4.9): each setting's loss and gradient equal a
plain-torch implementation of its formula written here (never dlmkern's loss code); the fused
kernel and the reference agree where both apply; a setting the kernel lacks runs on the reference
and says so; bad combinations are refused at config time naming both keys; the update stage gets
its models, optimizers and objective explicitly."""

import math

import pytest
import torch
from dlmkern.ops import Objective, policy_value_loss, use_backend
from dlmkern.ops import objective as objective_mod
from dlmkern.ops.objective import response_blocks, token_weights
from dlmkern.trainers import RLConfig, RLTrainer, TraceRL, TraceRLConfig, build_config

from .test_rl_stages import DATA, TOK, _cfg, _model, parity

# ---- a small fixed batch: 4 sequences of 3-6 tokens, [T] flat with sequence ids ------------------

LENGTHS = (5, 3, 6, 4)
SEQ = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
T = int(SEQ.numel())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -1.5 + 0.5 * torch.randn(T, generator=g)
    # per-sequence log-ratio offsets: sequences 0 and 2 leave [0.8, 1.2], 1 and 3 stay inside
    offset = torch.tensor([0.5, 0.05, -0.6, -0.1])[SEQ]
    old = logp - offset + 0.1 * torch.randn(T, generator=g)
    adv_seq = torch.tensor([1.0, -0.7, -1.3, 0.4])  # one advantage per sequence (GRPO)
    ref = logp + 0.3 * torch.randn(T, generator=g)
    w = 0.5 + torch.rand(T, generator=g)
    return {"logp": logp, "old": old, "adv": adv_seq[SEQ], "adv_seq": adv_seq, "ref": ref,
            "w": w, "mask": torch.ones(T, dtype=torch.bool)}


def _ours(b, objective, **kw):
    """dlmkern's loss and d loss / d logp."""
    lp = b["logp"].clone().requires_grad_()
    loss, stats = policy_value_loss(lp, b["old"], b["adv"], b["mask"], objective=objective,
                                    seq_ids=SEQ, num_seqs=len(LENGTHS), **kw)
    loss.backward()
    return loss.detach(), lp.grad, stats


def _truth(b, fn):
    """An independent formula fn(logp) -> loss, and its gradient by autograd."""
    lp = b["logp"].clone().requires_grad_()
    loss = fn(lp)
    loss.backward()
    return loss.detach(), lp.grad


def _close(ours, truth):
    torch.testing.assert_close(ours[0], truth[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], truth[1], atol=1e-6, rtol=1e-5)


def _ppo(r, a, lo=0.2, hi=0.2):
    return -torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * a)


def _groups(keys):
    """[(token indices of each group)] for a list of hashable per-token keys, in first-seen
    order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


# ---- sequence ratio (GSPO) ----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean"])
def test_sequence_ratio_is_gspo(reduction):
    # GSPO (Zheng et al. 2025), eq. 5-7: s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|)
    # = exp(mean_t (logp - old)), J = mean_i min(s_i A_i, clip(s_i) A_i); its token_mean form
    # counts each sequence |y_i| times
    b = _batch()
    obj = Objective(ratio_level="sequence", eps_low=0.2, eps_high=0.25, reduction=reduction)

    def gspo(lp):
        per_seq, sizes = [], []
        for i, idx in enumerate(_groups(SEQ.tolist())):
            s = torch.exp((lp[idx] - b["old"][idx]).mean())
            per_seq.append(_ppo(s, b["adv_seq"][i], 0.2, 0.25))
            sizes.append(len(idx))
        per_seq = torch.stack(per_seq)
        if reduction == "seq_mean":
            return per_seq.mean()
        return (per_seq * torch.tensor(sizes, dtype=torch.float32)).sum() / T

    ours = _ours(b, obj)
    _close(ours, _truth(b, gspo))
    # the batch reaches both branches: sequences 0 and 2 clipped (no gradient), 1 and 3 not
    g = ours[1]
    assert torch.all(g[SEQ == 0] == 0) and torch.all(g[SEQ == 2] == 0)
    assert torch.all(g[SEQ == 1] != 0) and torch.all(g[SEQ == 3] != 0)
    assert ours[2]["clip_frac"].item() == pytest.approx((5 + 6) / T)


def test_block_ratio_is_one_ratio_per_sequence_block():
    b = _batch(1)
    blocks = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    obj = Objective(ratio_level="block", eps_low=0.2, eps_high=0.2)

    def block_gspo(lp):
        total = 0.0
        for idx in _groups(list(zip(SEQ.tolist(), blocks.tolist(), strict=True))):
            s = torch.exp((lp[idx] - b["old"][idx]).mean())
            total = total + len(idx) * _ppo(s, b["adv"][idx[0]])
        return total / T

    _close(_ours(b, obj, block_ids=blocks), _truth(b, block_gspo))


# ---- KL kinds, to the reference and to the old policy -------------------------------------------

KL = {
    "k1": lambda lp, tgt: lp - tgt,
    "k3": lambda lp, tgt: torch.exp(tgt - lp) - (tgt - lp) - 1,
    "quadratic": lambda lp, tgt: 0.5 * (lp - tgt) ** 2,
}


@pytest.mark.parametrize("kind", list(KL))
@pytest.mark.parametrize("target", ["ref", "old"])
def test_kl_kinds(kind, target):
    b = _batch(2)
    tgt = b["ref"] if target == "ref" else b["old"]  # the update hands the kl_to target over
    obj = Objective(kl_kind=kind, kl_coef=0.3, kl_to=target)

    def ppo_kl(lp):
        r = torch.exp(lp - b["old"])
        return (_ppo(r, b["adv"]) + 0.3 * KL[kind](lp, tgt)).mean()

    ours = _ours(b, obj, ref_logp=tgt)
    _close(ours, _truth(b, ppo_kl))
    assert ours[2]["kl"].item() == pytest.approx(KL[kind](b["logp"], tgt).mean().item(),
                                                 rel=1e-5, abs=1e-7)


# ---- per-token weights and the weighted likelihood ----------------------------------------------


def test_token_weights_multiply_each_tokens_loss():
    b = _batch(3)
    obj = Objective(token_weights="elbo", kl_coef=0.1, dual_clip=3.0)

    def weighted(lp):
        r = torch.exp(lp - b["old"])
        pg = _ppo(r, b["adv"])
        pg = torch.where(b["adv"] < 0, torch.minimum(pg, -3.0 * b["adv"]), pg)
        return (b["w"] * (pg + 0.1 * KL["k3"](lp, b["ref"]))).mean()

    _close(_ours(b, obj, ref_logp=b["ref"], weights=b["w"]), _truth(b, weighted))


@pytest.mark.parametrize("reduction", ["token_mean", "sum"])
def test_no_ratio_is_a_weighted_likelihood(reduction):
    # wd1-style: loss = -w * A * logp (no ratio, no clip)
    b = _batch(4)
    obj = Objective(ratio_level="none", token_weights="step", reduction=reduction,
                    loss_normalizer=7.0)

    def likelihood(lp):
        x = -b["w"] * b["adv"] * lp
        return x.mean() if reduction == "token_mean" else x.sum() / 7.0

    ours = _ours(b, obj, weights=b["w"])
    _close(ours, _truth(b, likelihood))
    assert ours[2]["clip_frac"].item() == 0.0


def test_the_rows_weights_and_blocks():
    # two trajectories of 6 and 4 generated tokens; (trajectory, step) groups of 2, 4, 1, 3
    traj = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    step = torch.tensor([0, 0, 1, 1, 1, 1, 0, 1, 1, 1])
    n = torch.tensor([6, 4])
    step_w = token_weights("step", traj, step, n)
    want = torch.tensor([1 / 2] * 2 + [1 / 4] * 4 + [1.0] + [1 / 3] * 3)
    torch.testing.assert_close(step_w, want)
    elbo = token_weights("elbo", traj, step, n)  # 1 / t, t = the copy's share of its trajectory
    torch.testing.assert_close(elbo, torch.tensor([3.0] * 2 + [1.5] * 4 + [4.0] + [4 / 3] * 3))
    assert token_weights("none", traj, step, n) is None
    gen = torch.tensor([0, 1, 2, 3, 4, 5])
    # block models: absolute blocks of prompt_len + index; full attention: the sampler's blocks
    assert response_blocks(gen, torch.full((6,), 3), 4, 99).tolist() == [0, 1, 1, 1, 1, 2]
    assert response_blocks(gen, torch.full((6,), 3), None, 4).tolist() == [0, 0, 0, 0, 1, 1]


# ---- fused vs reference --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "sum"])
def test_fused_and_reference_agree_where_both_apply(reduction):
    b = _batch(5)
    obj = Objective(eps_low=0.2, eps_high=0.28, dual_clip=2.0, kl_coef=0.05, kl_kind="k3",
                    kl_to="ref", reduction=reduction, loss_normalizer=11.0)
    assert obj.fused() and obj.path_note() is None
    native = _ours(b, obj, ref_logp=b["ref"])
    with use_backend("reference"):
        ref = _ours(b, obj, ref_logp=b["ref"])
    _close(native, ref)
    for k in native[2]:
        torch.testing.assert_close(native[2][k], ref[2][k], atol=1e-6, rtol=1e-5, msg=k)
    # and the keyword API is the same objective
    kw = _ours(b, None, ref_logp=b["ref"], eps_low=0.2, eps_high=0.28, dual_clip=2.0,
               kl_coef=0.05, reduction=reduction, normalizer=11.0)
    _close(native, kw)


@pytest.mark.parametrize("obj, gap", [
    (Objective(ratio_level="sequence"), "ratio_level=sequence"),
    (Objective(kl_kind="quadratic", kl_coef=0.1), "kl_kind=quadratic"),
    (Objective(token_weights="step"), "token_weights=step"),
])
def test_a_setting_the_kernel_lacks_runs_on_the_reference_and_says_so(monkeypatch, obj, gap):
    # the kernel has every setting today (test_objective_kernel.py): one it lacks, as a setting
    # added to the Objective before its kernel case, is simulated by taking it out of FUSED
    _kernel_lacks(monkeypatch, "ratio_level=sequence", "kl_kind=quadratic", "token_weights=step")
    b = _batch(6)
    kw = {"ref_logp": b["ref"]} if obj.kl_coef else {}
    if obj.weighted:
        kw["weights"] = b["w"]
    with use_backend("reference"):
        want = _ours(b, obj, **kw)

    def no_kernel(*a, **k):
        raise AssertionError("the fused kernel ran an objective it lacks")

    monkeypatch.setattr(torch.ops.dlmkern, "policy_value_loss", no_kernel)
    _close(_ours(b, obj, **kw), want)  # the native backend: the reference path, same numbers
    assert not obj.fused() and gap in obj.path_note() and "reference path" in obj.path_note()
    _kernel_lacks(monkeypatch, "kl_kind=k1")
    assert Objective(kl_kind="k1").fused()  # a KL kind without a KL term changes nothing
    assert not Objective(kl_kind="k1").fused(kl_term=True)  # the op given ref_logp: k1 stats


def _kernel_lacks(monkeypatch, *settings):
    """Take `key=value` settings out of objective.FUSED (the kernel's coverage) for a test."""
    for s in settings:
        key, value = s.split("=")
        monkeypatch.setitem(objective_mod.FUSED, key,
                            tuple(v for v in objective_mod.FUSED[key] if v != value))


def test_the_kl_statistic_is_of_the_objectives_kind_even_at_kl_coef_zero():
    # the op computes the KL statistic whenever it is given ref_logp: of the objective's kind
    b = _batch(7)
    obj = Objective(kl_kind="k1")
    stats = _ours(b, obj, ref_logp=b["ref"])[2]
    assert stats["kl"].item() == pytest.approx((b["logp"] - b["ref"]).mean().item(), abs=1e-6)


def test_a_trainer_says_once_at_start_when_its_loss_runs_on_the_reference(tmp_path, capsys,
                                                                          monkeypatch):
    _kernel_lacks(monkeypatch, "ratio_level=sequence", "kl_kind=quadratic")
    cfg = _cfg(tmp_path, ratio_level="sequence", kl_kind="quadratic", kl_coef=0.05,
               kl_to="ref")
    tr = TraceRL(_model(), TOK, DATA, parity, cfg)
    err = capsys.readouterr().err
    assert err.count("reference path") == 1
    assert "ratio_level=sequence, kl_kind=quadratic are not in the fused" in err
    log = tr.train_step()
    assert math.isfinite(log["loss"]) and log["sampler_logp_gap"] < 1e-4
    capsys.readouterr()
    TraceRL(_model(), TOK, DATA, parity, _cfg(tmp_path / "b"))  # the default: fused, no line
    assert "reference path" not in capsys.readouterr().err


# ---- the trainer: the objective from the config, the update given what it uses -----------------


def test_the_update_stage_holds_what_it_uses_not_the_trainer(tmp_path):
    tr = TraceRL(_model(), TOK, DATA, parity,
                 _cfg(tmp_path, use_value_model=True, eps_high=0.28, kl_coef=0.1,
                      temperature=0.7))
    up = tr.updater
    assert up.objective is tr.objective == Objective(eps_high=0.28, kl_coef=0.1,
                                                     temperature=0.7)
    m = up.models
    assert (m.model, m.opt, m.ref_model, m.value_model, m.value_opt) == (
        tr.model, tr.opt, None, tr.value_model, tr.value_opt)
    assert not any(v is tr for v in vars(up).values())
    tr.make_optimizers()  # dlmkern.plan remakes them: the stage trains with the new ones
    assert tr.updater.models.opt is tr.opt and tr.updater.models.value_opt is tr.value_opt


@pytest.mark.parametrize("family, over", [
    ("sdar", {"ratio_level": "block", "estimator": "random_mask", "token_weights": "elbo"}),
    ("llada", {"ratio_level": "block", "estimator": "coupled", "gen_block_length": 4,
               "shrinkage": 8}),
    ("sdar", {"ratio_level": "none", "token_weights": "step", "kl_coef": 0.1,
              "kl_kind": "k1"}),
])
def test_objectives_train_through_the_update(tmp_path, family, over):
    # the update builds each objective's per-token inputs (weights, block ids) from the rows
    def alternate(prompts, completions, **_):  # a reward spread in every group
        return [float(i % 2) for i in range(len(completions))]

    tr = RLTrainer(_model(family), TOK, DATA, alternate, _cfg(tmp_path, **over))
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("over, keys", [
    ({"ratio_level": "none", "dual_clip": 2.0}, ("dual_clip=2", "ratio_level=none")),
    ({"token_weights": "elbo", "estimator": "trace"}, ("token_weights=elbo", "estimator=trace")),
    ({"ratio_level": "seq"}, ("ratio_level must be one of",)),
    ({"kl_kind": "k2"}, ("kl_kind must be one of",)),
])
def test_bad_combinations_are_refused_at_config_time_naming_both_keys(over, keys):
    for make in (lambda: RLConfig(**over).validate(),  # and as a run file's overrides
                 lambda: build_config(TraceRLConfig, {}, [f"{k}={v}" for k, v in over.items()])):
        with pytest.raises(ValueError) as e:
            make()
        assert all(k in str(e.value) for k in keys), str(e.value)


def test_the_op_refuses_mismatched_objective_inputs():
    b = _batch()
    with pytest.raises(TypeError, match=r"not both .*`objective` and eps_low"):
        _ours(b, Objective(), eps_low=0.1)
    with pytest.raises(ValueError, match=r"`weights` missing: .*token_weights=elbo"):
        _ours(b, Objective(token_weights="elbo"))
    with pytest.raises(ValueError, match=r"`weights` given: .*token_weights=none"):
        _ours(b, Objective(), weights=b["w"])
    with pytest.raises(ValueError, match=r"`block_ids` missing: .*ratio_level=block"):
        _ours(b, Objective(ratio_level="block"))
    with pytest.raises(ValueError, match=r"dual_clip=2 .*ratio_level=none"):
        Objective(ratio_level="none", dual_clip=2.0)
