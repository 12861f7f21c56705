"""Trainers: config handling, one RL step moves log-probs the way advantages say, filtering,
exact resume, DiPO specifics, value model, SFT."""

import json
import math

import pytest
import torch
from dlmkern import SFT, DiPO, TraceRL
from dlmkern.data import CharTokenizer
from dlmkern.doctor.update_checks import (
    update_follows_the_advantage,
    value_moves_toward_the_returns,
)
from dlmkern.models import DiffusionLM, load, tiny_config
from dlmkern.trainers import (
    DiPOConfig,
    RLConfig,
    SFTConfig,
    TraceRLConfig,
    build_config,
    load_config,
)
from dlmkern.trainers.plan import micro_batches

from .rl_helpers import rl_config

TOK = CharTokenizer()
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
VALUE_FALL = 0.9  # the values' RMS error after 5 updates on fixed trajectories: at most this share


def exact(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def _model(family="sdar", seed=0):
    torch.manual_seed(seed)
    return DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id))


def _cfg(tmp_path, preset=TraceRLConfig, **kw):
    base = dict(prompts_per_step=2, group_size=4, max_new_tokens=8, total_steps=2,
                output_dir=str(tmp_path), progress_bar=False, lr=1e-3, pass_rate_low=0.0,
                pass_rate_high=1.0)
    base.update(kw)
    return rl_config(preset, **base)


def test_config_types_unknown_keys_and_yaml(tmp_path):
    cfg = build_config(RLConfig, {"lr": 1e-5}, ["group_size=4", "dynamic_sampling=true"])
    assert cfg.lr == 1e-5 and cfg.group_size == 4 and cfg.dynamic_sampling is True
    with pytest.raises(ValueError, match=r"unknown key 'learning_rate'"):
        build_config(RLConfig, {"learning_rate": 1e-5})
    with pytest.raises(ValueError, match=r"group_size must be int, got 'four'"):
        build_config(RLConfig, {}, ["group_size=four"])
    with pytest.raises(ValueError, match=r"lr must be float, got 'fast'"):
        build_config(RLConfig, {"lr": "fast"})
    with pytest.raises(ValueError, match=r"group_size must be int, got list"):
        build_config(RLConfig, {"group_size": [4]})
    with pytest.raises(ValueError, match=r"reduction must be"):
        build_config(RLConfig, {"reduction": "mean"})
    p = tmp_path / "c.yaml"
    p.write_text("lr: 2.0e-6\nshrinkage: 2\n")
    cfg = load_config(RLConfig, str(p), ["shrinkage=3"])
    assert cfg.lr == 2e-6 and cfg.shrinkage == 3
    with pytest.raises(ValueError, match=r"min_mask_ratio"):
        build_config(SFTConfig, {"min_mask_ratio": 0.0})


def _update_follows_the_advantage(cfg, family) -> dict:
    """The doctor's direction check (dlmkern.doctor.update_checks, its one owner) on one group
    of a rollout, advantages +1 / -1."""
    make = lambda: TraceRL(_model(family), TOK, DATA, exact, cfg)  # noqa: E731
    trajs = make().rollout(DATA[:1]).trajs
    return update_follows_the_advantage(make, trajs, [1.0, -1.0, 1.0, -1.0])


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_one_rl_step_follows_the_advantage(tmp_path, family):
    _update_follows_the_advantage(
        _cfg(tmp_path, lr=1e-4, max_grad_norm=100.0, shrinkage=1), family)


def test_minibatches_and_epochs_move_the_ratio_so_clip_and_kl_act(tmp_path):
    # One step per rollout keeps ratio = 1 (clip and the KL to the old policy are then inert).
    # With 2 mini-batches x 2 epochs old_logp stays at its rollout value: later steps see
    # ratio != 1, the clip binds and the k3 KL to the old policy is positive.
    cfg = _cfg(tmp_path, lr=3e-2, max_grad_norm=100.0, num_minibatches=2, ppo_epochs=2,
               kl_coef=0.1, kl_to="old", eps_low=0.05, eps_high=0.05)
    tr = TraceRL(_model(), TOK, DATA, exact, cfg)
    batch = tr.rollout(DATA[:1])
    trajs, rewards = batch.trajs, batch.rewards
    stats = tr.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), rewards)
    assert stats["optimizer_steps"] == 4
    assert stats["kl"] > 0 and stats["approx_kl"] > 0 and stats["clip_frac_mean"] > 0
    one = TraceRL(_model(), TOK, DATA, exact, _cfg(tmp_path / "one", lr=3e-2, kl_coef=0.1))
    st1 = one.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), rewards)
    assert st1["optimizer_steps"] == 1 and st1["kl"] == 0 and st1["clip_frac"] == 0
    with pytest.raises(ValueError, match="num_minibatches must be >= 1"):
        build_config(RLConfig, {"num_minibatches": 0})


def test_gradient_checkpointing_option_gives_the_same_update(tmp_path):
    runs = []
    for ckpt in (False, True):
        tr = TraceRL(_model(), TOK, DATA, exact,
                     _cfg(tmp_path / str(ckpt), lr=1e-2, use_value_model=True, value_lr=1e-2,
                          gradient_checkpointing=ckpt))
        assert tr.model.gradient_checkpointing is ckpt
        assert tr.value_model.trunk.gradient_checkpointing is ckpt
        batch = tr.rollout(DATA[:1])
        trajs, rewards = batch.trajs, batch.rewards
        tr.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), rewards)
        runs.append([p.detach().clone() for p in (*tr.model.parameters(),
                                                  *tr.value_model.parameters())])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    sft = SFT(_model(), TOK, DATA, SFTConfig(gradient_checkpointing=True, progress_bar=False,
                                             output_dir=str(tmp_path / "sft")))
    assert sft.model.gradient_checkpointing


def test_step_logs_reach_jsonl_tensorboard_and_wandb(tmp_path, monkeypatch):
    import sys
    import types

    seen = {"tb": [], "wandb": [], "init": None}

    class FakeWriter:
        def __init__(self, logdir):
            seen["tb_dir"] = logdir

        def add_scalar(self, k, v, step):
            seen["tb"].append((k, v, step))

        def close(self):
            seen["tb_closed"] = True

    class FakeRun:
        def log(self, scalars, step):
            seen["wandb"].append((scalars, step))

        def finish(self):
            seen["wandb_finished"] = True

    def init(project, config):
        seen["init"] = (project, config["group_size"])
        return FakeRun()

    # stand-ins for the optional packages (neither needs to be installed)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_PROJECT", "dlmkern-test")
    monkeypatch.setenv("DLMKERN_TENSORBOARD", "1")
    tr = TraceRL(_model(), TOK, DATA, lambda p, c, **k: [float(i % 2) for i in range(len(c))],
                 _cfg(tmp_path, total_steps=3, log_every=2))
    tr.train()
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2]  # log_every = 2
    for key in ("reward_mean", "reward_std", "pass_rate", "kept_groups", "gen_tokens", "loss",
                "clip_frac", "kl", "approx_kl", "train_tokens", "time_sample", "time_reward",
                "time_train", "time_step", "sampler_logp_gap"):
        assert key in rows[0], key
    assert seen["init"] == ("dlmkern-test", 4)
    assert {s for _, s in seen["wandb"]} == {0, 2} and "reward_mean" in seen["wandb"][0][0]
    assert ("reward_mean", rows[1]["reward_mean"], 2) in seen["tb"]
    assert seen.get("tb_closed") and seen.get("wandb_finished")


def test_more_minibatches_than_trajectories(tmp_path):
    tr = TraceRL(_model(), TOK, DATA, exact, _cfg(tmp_path, num_minibatches=6))
    batch = tr.rollout(DATA[:1])  # 4 trajectories, 6 mini-batches: 2 are empty
    trajs, rewards = batch.trajs, batch.rewards
    stats = tr.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), rewards)
    assert stats["optimizer_steps"] == 4 and math.isfinite(stats["loss"])


def test_all_filtered_batch_is_a_logged_no_op(tmp_path, capsys):
    tr = TraceRL(_model(), TOK, DATA, lambda p, c, **k: [0.0] * len(c),
                 _cfg(tmp_path, pass_rate_low=0.2, pass_rate_high=0.8))
    before = [p.clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert log["kept_groups"] == 0 and "all groups filtered" in log["skipped"]
    assert "all groups filtered" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))
    assert all(math.isfinite(v) for v in log.values() if isinstance(v, float))


def test_empty_completions_do_not_produce_nan(tmp_path):
    # an EOS-only model: every completion is empty after its first token
    m = _model()
    with torch.no_grad():
        m.lm_head.weight[TOK.eos_token_id] = m.norm.weight * 40
    tr = TraceRL(m, TOK, DATA, lambda p, c, **k: [float(i % 2) for i in range(len(c))],
                 _cfg(tmp_path))
    log = tr.train_step()
    assert all(math.isfinite(v) for v in log.values() if isinstance(v, float))


def test_no_trained_tokens_is_a_logged_no_op(tmp_path, capsys):
    # completions with no generated token at all leave nothing to train on
    from dlmkern.sampling.block import Trajectory

    tr = TraceRL(_model(), TOK, DATA, lambda p, c, **k: [float(i % 2) for i in range(len(c))],
                 _cfg(tmp_path, prompts_per_step=1))
    empty = type("S", (), {"generate": lambda self, prompts, n_samples, seeds: [
        Trajectory(prompt_ids=list(p), finish_reason="eos") for p in prompts
        for _ in range(n_samples)]})()
    tr.rollout_stage.sampler = lambda model: empty
    before = [p.clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert log["skipped"] == "no trained tokens" and log["kept_groups"] == 1
    assert "no trained tokens" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))
    assert all(math.isfinite(v) for v in log.values() if isinstance(v, float))


def test_resume_restores_the_kl_reference(tmp_path):
    # the reference is the policy at the start of the run; a run resumed from a later
    # checkpoint (with its policy loaded from there) must still use that reference
    reward = lambda p, c, **k: [float(len(x) % 2) for x in c]  # noqa: E731
    old = dict(dynamic_sampling=False, eps_high=0.2)  # the settings this test was written with
    cfg = _cfg(tmp_path / "a", DiPOConfig, kl_coef=0.1, lr=1e-2, **old)
    a = DiPO(_model(), TOK, DATA, reward, cfg)
    assert "skipped" not in a.train_step()
    assert any(not torch.equal(p1, p2) for p1, p2 in zip(_model().parameters(),
                                                         a.model.parameters(), strict=True))
    a.save(str(tmp_path / "ckpt"))
    b = DiPO(load(str(tmp_path / "ckpt" / "model")), TOK, DATA, reward,
             _cfg(tmp_path / "b", DiPOConfig, kl_coef=0.1, lr=1e-2, **old))
    b.resume(str(tmp_path / "ckpt"))
    for (n, p1), p2 in zip(_model().named_parameters(), b.ref_model.parameters(), strict=True):
        assert torch.equal(p1, p2), n
    # a checkpoint without a reference (older dlmkern) says so instead of silently using the
    # model the trainer was built with
    tr = TraceRL(_model(), TOK, DATA, reward, _cfg(tmp_path / "c", pass_rate_low=0.0))
    tr.save(str(tmp_path / "noref"))
    c = DiPO(_model(), TOK, DATA, reward, _cfg(tmp_path / "d", DiPOConfig, kl_coef=0.1, **old))
    with pytest.warns(RuntimeWarning, match="holds no KL reference"):
        c.resume(str(tmp_path / "noref"))


@pytest.mark.parametrize("value", [False, True])
def test_resume_reproduces_the_next_step_exactly(tmp_path, value):
    cfg = _cfg(tmp_path / "a", pass_rate_low=0.0, pass_rate_high=1.0, use_value_model=value)
    reward = lambda p, c, **k: [float(len(x) % 2) for x in c]  # noqa: E731
    a = TraceRL(_model(), TOK, DATA, reward, cfg)
    a.train_step()
    a.save(str(tmp_path / "ckpt"))
    a.train_step()
    b = TraceRL(_model(seed=5), TOK, DATA, reward,
                _cfg(tmp_path / "b", pass_rate_low=0.0, pass_rate_high=1.0,
                     use_value_model=value))
    b.resume(str(tmp_path / "ckpt"))
    assert b.step == 1 and b.data_pos == a.data_pos - 2
    b.train_step()
    for (n, p1), p2 in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p1, p2), n
    if value:  # the value model and its optimizer resume too
        for (n, p1), p2 in zip(a.value_model.named_parameters(), b.value_model.parameters(),
                               strict=True):
            assert torch.equal(p1, p2), n


def test_dipo_defaults_dynamic_sampling_and_reference(tmp_path, monkeypatch):
    calls = []

    def reward(prompts, completions, **_):
        calls.append(len(completions))
        if len(calls) == 1:  # the first call's first group is all right (mean 1: filtered)
            return [1.0] * 4 + [float(i % 2) for i in range(len(completions) - 4)]
        return [float(i % 2) for i in range(len(completions))]

    monkeypatch.chdir(tmp_path)  # the default config logs to ./runs/rl
    d = DiPO(_model(), TOK, DATA, reward)
    assert d.cfg.eps_high == 0.28 and d.cfg.dynamic_sampling and d.ref_model is None
    d = DiPO(_model(), TOK, DATA, reward, _cfg(tmp_path / "d", DiPOConfig,
                                               max_oversample_rounds=3))
    log = d.train_step()
    assert log["kept_groups"] == 2 and log["sampled_groups"] > 2  # oversampled to fill
    assert len(calls) >= 2
    # kl_coef > 0 with kl_to=ref loads a frozen reference
    d2 = DiPO(_model(), TOK, DATA, reward, _cfg(tmp_path / "d2", DiPOConfig, kl_coef=0.1))
    assert d2.ref_model is not None and not any(p.requires_grad
                                                for p in d2.ref_model.parameters())
    assert math.isfinite(d2.train_step()["kl"])


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_value_model_learns_the_returns(tmp_path, family):
    # updates on the same trajectories (rewards 0 / 1) lower the value loss and bring V toward
    # the returns: the doctor's value check, with a required fall (measured: RMS error 0.74 ->
    # 0.54 sdar, 0.67 -> 0.52 llada; with the value loss's sign flipped, it fails)
    tr = TraceRL(_model(family), TOK, DATA, lambda p, c, **k: [float(i % 2) for i in range(len(c))],
                 _cfg(tmp_path, use_value_model=True, pass_rate_low=0.0, value_lr=1e-3))
    log = tr.train_step()
    assert math.isfinite(log["value_loss"])
    batch = tr.rollout(DATA[:1])
    before, after = value_moves_toward_the_returns(tr, batch.trajs, batch.rewards, updates=5)
    print(f"RMS |V - R|: {before:.3f} -> {after:.3f}")
    assert after < VALUE_FALL * before


@pytest.mark.parametrize("family", ["sdar", "dream"])
def test_sft_reduces_the_loss(tmp_path, family):
    m = _model(family)
    sft = SFT(m, TOK, DATA[:8], SFTConfig(batch_size=8, lr=3e-3, total_steps=40,
                                          output_dir=str(tmp_path), progress_bar=False))
    def eval_loss():  # same masks each time: average over fixed seeds
        vals = []
        with torch.no_grad():
            for seed in range(8):
                vals.append(sft.loss(DATA[:8], [1000 + 8 * seed + i for i in range(8)]).item())
        return sum(vals) / len(vals)

    first = eval_loss()
    sft.train()
    assert eval_loss() < 0.7 * first


def test_sft_micro_batches_accumulate_to_the_unsplit_step(tmp_path):
    runs = []
    for budget in (0, 30):  # rows of ~7-8 characters, [noisy | clean]: 1-2 rows per forward
        cfg = SFTConfig(batch_size=8, lr=1e-2, output_dir=str(tmp_path), progress_bar=False,
                        max_grad_norm=1e9, micro_batch_tokens=budget)  # no clip: scales show
        sft = SFT(_model(), TOK, DATA, cfg)
        grads = _record_grads(sft.opt)
        if budget:
            assert len(sft._micro_groups(DATA[:8])) >= 4
        runs.append((sft.train_step(), grads))
    (la, ga), (lb, gb) = runs
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    assert len(ga) == len(gb) == 1
    for x, y in zip(ga, gb, strict=True):
        for p, q in zip(x, y, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 0"):
        SFTConfig(micro_batch_tokens=-1).validate()


def test_sft_resume_reproduces_the_next_step_exactly(tmp_path):
    def cfg(d):
        return SFTConfig(batch_size=4, lr=3e-3, total_steps=3, output_dir=str(tmp_path / d),
                         progress_bar=False)

    a = SFT(_model(), TOK, DATA, cfg("a"))
    a.train_step()
    a.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model" / "model.safetensors").exists()
    a.train_step()
    b = SFT(_model(seed=5), TOK, DATA, cfg("b"))
    b.resume(str(tmp_path / "ckpt"))
    assert b.step == 1
    b.train_step()
    for (n, p1), p2 in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p1, p2), n
    # a run continues from a checkpoint to total_steps and writes final/ (checkpoint + HF model)
    b.train()
    assert b.step == 3 and (tmp_path / "b" / "final" / "model" / "config.json").exists()


@pytest.mark.parametrize("estimator", ["random_mask", "coupled", "diffu_grpo"])
@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_baseline_estimators_follow_the_advantage(tmp_path, estimator, family):
    # the direction of the update, as for trace rows (before, only a finite loss was checked)
    cfg = _cfg(tmp_path, lr=1e-4, max_grad_norm=100.0, estimator=estimator)
    assert _update_follows_the_advantage(cfg, family)["train_tokens"] > 0


def _record_grads(*opts) -> list:
    """Makes each optimizer append its parameters' gradients to the returned list at every step."""
    grads = []
    for opt in opts:
        if opt is None:
            continue
        step = opt.step

        def recording(opt=opt, step=step):
            grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]
                          if p.grad is not None])
            return step()

        opt.step = recording
    return grads


@pytest.mark.parametrize("budget", [40, 100])  # ~1 trajectory per micro-batch / 2-3, uneven
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "sum"])
def test_micro_batches_accumulate_to_the_unsplit_step(tmp_path, reduction, budget):
    """micro_batch_tokens splits each mini-batch into several forward / backward passes (whole
    trajectories); the accumulated gradients give the update of the unsplit mini-batch, for the
    policy and the value model, and the statistics are those of the whole mini-batch."""
    value = reduction != "seq_mean"  # with a value model the advantages come from GAE
    kw = dict(lr=1e-2, max_grad_norm=1e9, reduction=reduction, use_value_model=value,
              loss_normalizer=64.0, num_minibatches=2, ppo_epochs=2, kl_coef=0.05,
              pass_rate_low=0.0, pass_rate_high=1.0)
    reward = lambda p, c, **k: [float(len(x) % 2) for x in c]  # noqa: E731
    runs = []
    for tokens in (0, budget):
        tr = TraceRL(_model(), TOK, DATA, reward, _cfg(tmp_path / str(tokens),
                                                        micro_batch_tokens=tokens, **kw))
        # every optimizer step's gradients: the parameters are no test (Adam is blind to a
        # gradient's scale and turns float noise in ~0 entries into full-size steps)
        grads = _record_grads(tr.opt, tr.value_opt if value else None)
        # Adam with eps 1e-8 steps a ~0 gradient entry by a full lr whatever its float noise:
        # the later steps' gradients would compare that noise (seen once rows held after-EOS
        # context); eps 1e-4 keeps them comparable at 1e-6
        for opt in (tr.opt, tr.value_opt if value else None):
            for group in opt.param_groups if opt is not None else ():
                group["eps"] = 1e-4
        torch.manual_seed(1)
        batch = tr.rollout(DATA[:2])
        trajs, rewards = batch.trajs, batch.rewards
        if tokens:  # the budget really splits: 4 trajectories per mini-batch, ~10-44 tokens
            groups = micro_batches([r.num_tokens for r in tr.rows(trajs[:4])], tokens)
            assert len(groups) >= 2 and (tokens == 40 or max(map(len, groups)) >= 2)
        stats = tr.update(trajs, torch.tensor([1.0, -1.0, 0.5, -0.5] * 2), rewards)
        runs.append((tr, stats, grads))
    (a, sa, ga), (b, sb, gb) = runs
    assert len(ga) == len(gb) == (8 if value else 4)  # 2 mini-batches x 2 epochs (x 2 models)
    for x, y in zip(ga, gb, strict=True):
        assert sum(float(t.norm()) for t in x) > 1e-3  # a real update, not a zero gradient
        for p, q in zip(x, y, strict=True):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4)
    assert sa["train_tokens"] == sb["train_tokens"] and sa["row_tokens"] == sb["row_tokens"]
    keys = ["loss", "pg_loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl",
            "ratio_mean", "ratio_max", "num_tokens"]
    for key in keys + (["value_loss", "vf_clip_frac", "value_mean"] if value else []):
        assert sa[key] == pytest.approx(sb[key], rel=1e-4, abs=1e-6), key
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 0"):
        build_config(RLConfig, {"micro_batch_tokens": -1})


def test_every_sampling_rule_reaches_the_rollout_and_bad_ones_fail_at_config(tmp_path):
    with pytest.raises(ValueError, match=r"config: sampling: unknown unmasking rule 'bogus'"):
        build_config(RLConfig, {"sampling": {"rule": "bogus"}})  # before any model is built
    with pytest.raises(ValueError, match=r"config: sampling: unknown confidence 'best'"):
        build_config(RLConfig, {}, ["sampling.confidence=best"])
    cfg = _cfg(tmp_path, confidence="margin", schedule="dream", entropy_bound=0.5,
               steps_total=4, max_new_tokens=8, gen_block_length=4,
               temperature=0.8)  # top_k, top_p, cfg_scale: refused for RL (test_rl_temperature)
    tr = TraceRL(_model("llada"), TOK, DATA, exact, cfg)
    s = tr.rollout_stage.sampler(tr.model).cfg
    assert (s.confidence, s.schedule, s.entropy_bound, s.steps, s.temperature) == (
        "margin", "dream", 0.5, 2, 0.8)  # steps_total 4 over 2 blocks: 2 per block
    trajs = tr.rollout(DATA[:1]).trajs
    assert len(trajs) == cfg.group_size
