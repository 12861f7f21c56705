"""The RL core as presets and stages (issue #18): presets and their overrides, config checks
before any model work, advantages computed once, rows built once, the fused policy + value loss,
and logs that tell the truth (pass rate by threshold, sampler / trainer log-prob gap)."""


import pytest
import torch
from dlmkern import DiPO, TraceRL
from dlmkern.cli import main, parse_run
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import reference
from dlmkern.rl import Rows
from dlmkern.trainers import (
    PRESETS,
    DiPOConfig,
    RLConfig,
    RLTrainer,
    SFTConfig,
    TraceRLConfig,
    build_config,
)
from dlmkern.trainers.config import describe
from dlmkern.trainers.plan import plan_step
from dlmkern.trainers.rollout import RolloutBatch, reward_stats
from dlmkern.trainers.update import selected_logp, selected_values

from .rl_helpers import rl_config

TOK = CharTokenizer()
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def parity(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def _model(family="sdar", seed=0, layers=None):
    torch.manual_seed(seed)
    kw = {} if layers is None else {"num_layers": layers}
    return DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id, **kw))


def _cfg(tmp_path, preset=TraceRLConfig, **kw):
    base = dict(prompts_per_step=2, group_size=4, max_new_tokens=8, total_steps=1,
                output_dir=str(tmp_path), progress_bar=False, lr=1e-3, pass_rate_low=0.0,
                pass_rate_high=1.0)
    return rl_config(preset, **{**base, **kw})


# ---- presets ---------------------------------------------------------------------------------


def test_a_trainer_refuses_another_algorithms_config_and_applies_its_preset(tmp_path):
    # before: DiPO(..., RLConfig(lr=1e-6)) trained silently with TraceRL's clip and no dynamic
    # sampling
    with pytest.raises(TypeError, match=r"DiPO takes a DiPOConfig"):
        DiPO(_model(), TOK, DATA, parity, RLConfig(lr=1e-6, output_dir=str(tmp_path)))
    with pytest.raises(TypeError, match=r"TraceRL takes a TraceRLConfig"):
        TraceRL(_model(), TOK, DATA, parity, DiPOConfig(output_dir=str(tmp_path)))
    d = DiPO(_model(), TOK, DATA, parity, DiPOConfig(lr=2e-6, output_dir=str(tmp_path / "a")))
    assert (d.cfg.lr, d.cfg.eps_high, d.cfg.kl_to, d.cfg.dynamic_sampling) == (
        2e-6, 0.28, "ref", True)
    d = DiPO(_model(), TOK, DATA, parity, {"lr": 2e-6, "output_dir": str(tmp_path / "b")})
    assert (d.cfg.lr, d.cfg.eps_high, d.cfg.dynamic_sampling) == (2e-6, 0.28, True)
    t = TraceRL(_model(), TOK, DATA, parity, {"output_dir": str(tmp_path / "c")})
    assert (t.cfg.pass_rate_low, t.cfg.pass_rate_high, t.cfg.eps_high) == (0.2, 0.8, 0.2)
    assert t.name == "tracerl" and d.name == "dipo"
    # RLTrainer runs any preset: the config is the algorithm
    r = RLTrainer(_model(), TOK, DATA, parity, PRESETS["coupled_grpo"](
        output_dir=str(tmp_path / "d")))
    assert r.estimator.name == "coupled" and r.name == "coupled_grpo"


def _run_file(tmp_path, algo: str, trainer: str = "") -> str:
    model = tmp_path / "model"
    _model().save_pretrained(str(model))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    path = tmp_path / f"{algo}.yaml"
    path.write_text(f"algo: {algo}\nmodel: {model}\ndataset: {data}\ntokenizer: char\n"
                    f"trainer:\n  output_dir: {tmp_path / 'out'}\n{trainer}")
    return str(path)


def test_the_run_files_algo_picks_the_preset_and_trainer_overrides_it(tmp_path):
    # before: every CLI run got RLConfig's defaults whatever its algo
    _, cfg = parse_run(_run_file(tmp_path, "dipo"), [])
    assert type(cfg) is DiPOConfig and cfg.eps_high == 0.28 and cfg.dynamic_sampling
    _, cfg = parse_run(_run_file(tmp_path, "dipo", "  eps_high: 0.3\n  sampling:\n"
                                 "    rule: dynamic\n"), ["sampling.threshold=0.7"])
    assert cfg.eps_high == 0.3 and cfg.kl_to == "ref"
    assert (cfg.sampling.rule, cfg.sampling.threshold) == ("dynamic", 0.7)
    _, cfg = parse_run(_run_file(tmp_path, "diffu_grpo"), [])
    assert cfg.estimator == "diffu_grpo"
    with pytest.raises(ValueError, match=r"algo must be one of tracerl, dipo, .*sft"):
        parse_run(_run_file(tmp_path, "ppo"), [])


def test_every_config_key_has_a_help_line_the_cli_prints(capsys):
    for cls in (*PRESETS.values(), SFTConfig):
        for key, _, text in describe(cls):
            assert text.strip(), f"{cls.__name__}.{key} has no help"
    assert main(["config", "dipo"]) == 0
    out = capsys.readouterr().out
    assert "eps_high" in out and "0.28" in out and "sampling.rule" in out


def test_config_mistakes_fail_before_any_model_is_loaded(tmp_path):
    no_model = str(tmp_path / "missing-model")  # loading it would fail differently
    bad = [
        ({"sampling": {"rule": "bogus"}}, r"config: sampling: unknown unmasking rule 'bogus'"),
        ({"rule": "dynamic"}, r"unknown key 'rule'.*write sampling\.rule"),
        ({"use_value_model": True, "estimator": "coupled"},
         r"use_value_model needs estimator: trace"),
        ({"dynamic_sampling": True, "pass_rate_low": 0.2},
         r"dynamic_sampling keeps the groups whose rewards differ by itself"),
        ({"estimator": "mystery"}, r"estimator must be one of trace, random_mask"),
        ({"eps_low": 1.5}, r"eps_low"),
        ({"dual_clip": 0.5}, r"dual_clip must be 0"),
        ({"sampling": {"steps": 0}}, r"config: sampling: steps must be >= 1"),
        ({"sampling": {"steps_total": 5}, "max_new_tokens": 8, "gen_block_length": 4},
         r"sampling.steps_total=5 must split evenly over the 2 blocks"),
        ({"use_value_model": True, "estimator": "mystery"}, r"estimator must be one of"),
    ]
    for values, msg in bad:
        with pytest.raises(ValueError, match=msg):
            TraceRL(no_model, TOK, DATA, parity, {"output_dir": str(tmp_path), **values})
    with pytest.raises(ValueError, match=r"unknown key 'sampling\.rules'"):
        build_config(TraceRLConfig, {}, ["sampling.rules=static"])
    with pytest.raises(ValueError, match=r"log_every must be >= 1"):  # before: ZeroDivision
        build_config(SFTConfig, {"log_every": 0})
    # a config built in Python is type-checked too (YAML and key=value are coerced)
    for kw, msg in (({"use_value_model": "false"}, r"use_value_model must be bool, got str"),
                    ({"group_size": 4.0}, r"group_size must be int, got float"),
                    ({"pass_threshold": float("nan")}, r"pass_threshold must be finite"),
                    ({"lr": "1e-6"}, r"lr must be float, got str")):
        with pytest.raises(ValueError, match=msg):
            TraceRLConfig(**kw).validate()
    # a setting the model kind refuses fails before output_dir is touched or weights load
    model_dir, out = tmp_path / "sdar", tmp_path / "previous"
    _model("sdar").save_pretrained(str(model_dir))
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ValueError, match=r"cfg_scale and sampling.steps_total are LLaDA's"):
        TraceRL(str(model_dir), TOK, DATA, parity, _cfg(out, steps_total=8,
                                                         existing_output_dir="overwrite"))
    assert (out / "log.jsonl").exists()
    # a dict config is checked knowing the explicit value model (group_size 1 is fine then)
    from dlmkern.models import ValueModel

    m = _model()
    tr = TraceRL(m, TOK, DATA, parity, {"group_size": 1, "output_dir": str(tmp_path / "v")},
                 value_model=ValueModel.from_policy(m))
    assert tr.cfg.group_size == 1


def test_shrinkage_default_follows_the_model_kind(tmp_path):
    # before: RLConfig said 1 for every model while full_rows and the SPEC said 8 for LLaDA
    assert TraceRL(_model("sdar"), TOK, DATA, parity, _cfg(tmp_path / "a")).row_spec.shrinkage \
        == 1
    assert TraceRL(_model("llada"), TOK, DATA, parity, _cfg(tmp_path / "b")).row_spec.shrinkage \
        == 8
    assert TraceRL(_model("llada"), TOK, DATA, parity,
                   _cfg(tmp_path / "c", shrinkage=2)).row_spec.shrinkage == 2


# ---- stages ----------------------------------------------------------------------------------


def test_advantages_are_computed_once_by_one_estimator(tmp_path, monkeypatch):
    # before: group z-scores were computed, carried, then overwritten by GAE
    import dlmkern.trainers.rollout as rollout

    calls = []
    real = rollout.group_advantages  # the config's advantage (zscore here)
    monkeypatch.setattr(rollout, "group_advantages", lambda *a: calls.append(1) or real(*a))
    tr = TraceRL(_model(), TOK, DATA, parity, _cfg(tmp_path / "v", use_value_model=True))
    assert tr.rollout(DATA[:1]).advantages is None
    tr.train_step()
    assert calls == []
    tr = TraceRL(_model(), TOK, DATA, parity, _cfg(tmp_path / "z"))
    batch = tr.rollout(DATA[:2])
    assert calls == [1]
    z = batch.advantages.view(2, 4)
    r = batch.rewards.view(2, 4)
    for g in range(2):
        if r[g].std() > 0:
            torch.testing.assert_close(z[g], (r[g] - r[g].mean()) / (r[g].std() + 1e-6))


def test_rows_are_built_once_per_trajectory_under_micro_batches(tmp_path, monkeypatch):
    # before: micro_batch_tokens built every trajectory's rows twice (sizing, then training)
    tr = TraceRL(_model(), TOK, DATA, parity, _cfg(tmp_path, micro_batch_tokens=40,
                                                     num_minibatches=2, ppo_epochs=2))
    built = []
    cls = type(tr.estimator)
    est_rows = cls.rows
    monkeypatch.setattr(cls, "rows", lambda *a, **k: built.append(1) or est_rows(*a, **k))
    batch = tr.rollout(DATA[:2])
    tr.update(batch.trajs, batch.advantages, batch.rewards)
    assert len(built) == len(batch.trajs) == 8


def test_the_step_plan_cuts_passes_by_budget_and_shares_sum_to_one():
    class R:  # a trajectory's rows: only their sizes matter to the plan
        def __init__(self, n, trained):
            self.num_tokens, self.train_rows = n, torch.zeros(trained)

    rows = [R(25, 5), R(25, 0), R(50, 7), R(10, 2)]
    plan = plan_step([0, 1, 2, 3], 4, rows, "token_mean", 1, 55)
    (mb,) = plan
    assert [p.traj for p in mb.passes] == [[0, 1], [2], [3]]
    assert [p.n_tokens for p in mb.passes] == [5, 7, 2] and mb.n_tokens == 14
    assert sum(p.policy_share for p in mb.passes) == pytest.approx(1.0)
    assert [p.policy_share for p in mb.passes] == pytest.approx([5 / 14, 7 / 14, 2 / 14])
    seq = plan_step([0, 1, 2, 3], 4, rows, "seq_mean", 2, 0)
    assert [[p.traj for p in mb.passes] for mb in seq] == [[[0, 1]], [[2, 3]]]
    assert [mb.passes[0].n_seq_trained for mb in seq] == [1, 2]
    assert plan_step([0, 1], 2, [R(5, 0), R(5, 0)], "token_mean", 1, 0) == []  # nothing trained


def _two_call_grads(tr, prep, cfg, policy_scale, value_scale):
    """Today's path before the fusion: a policy-only call, then a value-only call."""
    r = prep.rows
    tr.model.train()
    tr.value_model.train()
    logp = selected_logp(tr.model, r, tr.device, temperature=cfg.sampling.temperature)
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, _ = reference.policy_value_loss(
        logp, prep.old_logp, prep.adv, mask, ref_logp=prep.ref_logp, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, kl_coef=cfg.kl_coef, reduction=cfg.reduction, seq_ids=r.traj,
        num_seqs=r.num_trajectories, normalizer=cfg.loss_normalizer)
    (loss * policy_scale).backward()
    v = selected_values(tr.value_model, r, tr.device)
    z = torch.zeros_like(v)
    vloss, _ = reference.policy_value_loss(z, z, z, mask, values=v, old_values=prep.old_v,
                                           returns=prep.returns, vf_coef=1.0,
                                           vf_clip=cfg.vf_clip)
    (vloss * value_scale).backward()
    return _grads(tr)


def _grads(tr):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for p in (*tr.model.parameters(), *tr.value_model.parameters())]


@pytest.mark.parametrize("reduction", ["token_mean", "sum", "seq_mean"])
def test_fused_policy_value_call_gives_the_two_call_gradients(tmp_path, monkeypatch, reduction):
    # SPEC 2.4: one policy_value_loss call per pass carries both terms (seq_mean: the value term
    # keeps its own token-mean call, since one reduction cannot serve both)
    import dlmkern.trainers.update as update

    calls = []
    real = update.policy_value_loss
    monkeypatch.setattr(update, "policy_value_loss",
                        lambda *a, **k: calls.append(k.get("values") is not None) or real(*a, **k))
    cfg = _cfg(tmp_path, use_value_model=True, reduction=reduction, loss_normalizer=16.0,
               kl_coef=0.05, max_grad_norm=1e9)
    tr = TraceRL(_model(), TOK, DATA, parity, cfg)
    batch = tr.rollout(DATA[:1])
    rows = tr.rows(batch.trajs)
    (mb,) = plan_step(list(range(4)), 4, rows, reduction, 1, 0)
    prep = tr.updater.prepare(mb, rows, batch.trajs, None, batch.rewards, True)
    got = []
    step = tr.opt.step
    tr.opt.step = lambda: got.extend(_grads(tr)) or step()
    tr.value_opt.step = lambda: None
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    vstate = {k: v.clone() for k, v in tr.value_model.state_dict().items()}
    tr.updater.step(mb, prep)
    assert calls == ([False, True] if reduction == "seq_mean" else [True])
    tr.model.load_state_dict(state)
    tr.value_model.load_state_dict(vstate)
    for m in (tr.model, tr.value_model):
        m.zero_grad(set_to_none=True)
    want = _two_call_grads(tr, prep[0], cfg, mb.policy_scale, mb.value_scale)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


# ---- logs ------------------------------------------------------------------------------------


def test_pass_rate_is_defined_by_the_threshold_not_by_reward_one():
    # before: "accuracy" was the share of rewards >= 1, wrong for summed or fractional rewards
    batch = RolloutBatch([], torch.tensor([0.5, 1.5, 2.0, 0.0, 3.0, 1.0, 2.5, 0.2]), [0, 1], 4)
    cfg = TraceRLConfig(group_size=4, pass_threshold=2.0)
    st = reward_stats(batch, cfg)
    assert st["pass_rate"] == pytest.approx(3 / 8) and st["reward_mean"] == pytest.approx(10.7 / 8)
    assert "accuracy" not in st


def test_the_trainers_group_filter_keeps_partial_credit_groups_with_a_spread():
    # a pass-rate filter (share >= pass_threshold) dropped every partial-credit group: DiPO with
    # the code reward (fraction of tests passed) trained nothing
    from dlmkern.trainers.rollout import keep_mask

    r = torch.tensor([0.5, 0.25, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert keep_mask(r, DiPOConfig(group_size=4)).tolist() == [True, False]
    assert keep_mask(r, TraceRLConfig(group_size=4)).tolist() == [True, True]  # mean 0.5


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_sampler_logp_gap_is_zero_when_sampler_and_rows_agree(tmp_path, family):
    # at temperature 1 with shrinkage 1, the trainer's old log-probs on the packed rows are the
    # sampler's own log-probs: any mismatch of cache, rounds or positions shows up here
    # (completions that end with EOS keep the sampler's after-EOS context: tests/test_eos_context)
    kw = dict(max_new_tokens=8, gen_block_length=4, shrinkage=1, steps_per_block=2)
    tr = TraceRL(_model(family), TOK, DATA, parity, _cfg(tmp_path / "t1", **kw))
    log = tr.train_step()
    assert "sampler_logp_gap" in log and log["sampler_logp_gap"] < 1e-4, log
    # a sampler at another temperature samples another policy, and the trainer scores that one
    # (before issue #28 item 4 it scored T = 1: a gap of 0.1 here; tests/test_rl_temperature)
    hot = TraceRL(_model(family), TOK, DATA, parity,
                  _cfg(tmp_path / "t2", temperature=0.5, **kw))
    assert hot.train_step()["sampler_logp_gap"] < 1e-4


def test_a_pass_packs_each_trajectorys_rows_without_changing_their_log_probs(tmp_path):
    # the update packs per-trajectory rows (built once) into one pass: every trained token's
    # log-prob must be the one its trajectory's rows alone give (no attention across them)
    tr = TraceRL(_model(), TOK, DATA, parity, _cfg(tmp_path))
    batch = tr.rollout(DATA[:1])
    parts = tr.rows(batch.trajs)
    rows = Rows.cat(parts)
    assert rows.num_trajectories == 4 and rows.traj.tolist() == [
        k for k, p in enumerate(parts) for _ in range(p.targets.numel())]
    with torch.no_grad():
        T = tr.cfg.sampling.temperature
        packed = selected_logp(tr.model, rows, tr.device, temperature=T)
        alone = torch.cat([selected_logp(tr.model, p, tr.device, temperature=T) for p in parts])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
