"""dlmkern plan (issue 25): the plan's per-stage peaks against a real run of the same step at small
size, tracked with the same tracker on real tensors (within 10 %); fitting, refusing and the
command line."""

import dataclasses
import json

import pytest
import torch
from dlmkern.cli import main
from dlmkern.models import DiffusionLM, ValueModel
from dlmkern.models.config import tiny_config
from dlmkern.plan import PlannedRun, run_tracked
from dlmkern.plan.command import parse_bytes
from dlmkern.plan.fit import Budget, fit
from dlmkern.plan.step import tracked, trainer_inputs
from dlmkern.sampling import BlockSampler, SamplingConfig
from dlmkern.trainers import TraceRLConfig
from dlmkern.trainers.rl import RLTrainer

# ~5.4M parameters per model; sequential unmasking of one token per step is the planner's worst
# case exactly (every block takes its 4 steps), so the real rows are the planned ones
MC = tiny_config("sdar", vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                 num_heads=8, num_kv_heads=4, head_dim=32)
PROMPT = 16


def _cfg(out, **kw):
    base = dict(prompts_per_step=4, group_size=2, max_new_tokens=16, use_value_model=True,
                micro_batch_tokens=160, gradient_checkpointing=False, output_dir=str(out),
                progress_bar=False,
                sampling=SamplingConfig(rule="sequential", steps=4, temperature=1.0, max_seqs=4))
    base.update(kw)
    return TraceRLConfig(**base)


def _real(cfg, monkeypatch) -> dict:
    """The step on real tensors: its second step (the first makes the optimizer state), with
    the block sampler on its static-buffer path as on a GPU."""
    torch.manual_seed(0)
    init = BlockSampler.__init__

    def graphs_on(self, *a, **kw):
        init(self, *a, **{**kw, "cuda_graphs": True})  # "emulate" on the CPU
    monkeypatch.setattr(BlockSampler, "__init__", graphs_on)
    trainer = RLTrainer(DiffusionLM(MC), *trainer_inputs(cfg, PROMPT), cfg,
                        value_model=ValueModel(MC))
    trainer.train_step()
    stages = {"load": tracked(trainer).current()}
    stages.update(run_tracked(trainer, trainer.train_step).stages)
    stages.pop("decode_step", None)
    return stages


def _planned(cfg) -> dict:
    with PlannedRun(MC, cfg, ranks=1, prompt_tokens=PROMPT, dtype=torch.float32) as run:
        stages = {**run.load(), **run.rollout(cfg.sampling.max_seqs),
                  **run.update(cfg.micro_batch_tokens, cfg.gradient_checkpointing)}
    blk = stages["rollout_blocks"]
    blk["total"] -= blk.pop("graph_pool")  # CUDA graphs' pool: no such pool on the CPU
    return stages


@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_matches_a_real_run_stage_by_stage(tmp_path, monkeypatch, ckpt):
    cfg = _cfg(tmp_path / "real", gradient_checkpointing=ckpt)
    real = _real(cfg, monkeypatch)
    plan = _planned(dataclasses.replace(cfg, output_dir=str(tmp_path / "plan")))
    stages = ["load", "rollout_prefill", "rollout_blocks", "old_logp", "update_forward",
              "update_backward", "optimizer_step"]
    assert set(stages) <= set(real) and set(stages) <= set(plan), (sorted(real), sorted(plan))
    for s in stages:
        r, p = real[s]["total"], plan[s]["total"]
        assert abs(p - r) <= 0.10 * r, (s, p, r, plan[s], real[s])
    # the resident state is the same tensors, byte for byte
    assert plan["load"] == real["load"]


def test_fit_picks_the_largest_rollout_chunk_that_fits(tmp_path):
    # 512 sequences per rank: their KV caches outweigh a micro-batch of the update
    cfg = _cfg(tmp_path, prompts_per_step=256, max_new_tokens=64, micro_batch_tokens=400,
               sampling=SamplingConfig(rule="sequential", steps=4, max_seqs=0))
    with PlannedRun(MC, cfg, prompt_tokens=PROMPT, dtype=torch.float32) as run:
        peak = lambda stages: max(v["total"] for v in stages.values())  # noqa: E731
        big, small = peak(run.rollout(512)), peak(run.rollout(1))
        update = peak(run.update(400, False))
        assert small < update < big
        fixed = {"micro_batch_tokens": 400, "gradient_checkpointing": False,
                 "optimizer_offload": False}
        # room for every sequence at once, then for less than that
        roomy = Budget(int(max(big, update) * 1.2), reserve=0, margin=0.0)
        got = fit(run, roomy, fixed, local_seqs=512)
        assert got.fits and got.knobs.max_seqs == 512
        tight = Budget((update + big) // 2, reserve=0, margin=0.0)
        got = fit(run, tight, fixed, local_seqs=512)
        assert got.fits and 1 <= got.knobs.max_seqs < 512
        assert peak(got.stages) <= tight.usable
        # the next chunk the search could have taken (an eighth more) does not fit
        n = got.knobs.max_seqs
        assert peak(run.rollout(n + max(1, n // 8))) > tight.usable
        none = fit(run, Budget(small // 2, reserve=0, margin=0.0), fixed, local_seqs=512)
        assert not none.fits and none.failing


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 == parse_bytes("80G")
    assert parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("1024") == 1024
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def _model_dir(tmp_path):
    from dlmkern.models.io import save_pretrained

    d = tmp_path / "model"
    save_pretrained(DiffusionLM(MC), str(d))
    return d


def test_plan_command_writes_json_and_exits_by_fit(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("algo: tracerl\nmodel: nowhere\ndataset: nowhere.jsonl\n"
                   "trainer:\n  prompts_per_step: 2\n  group_size: 2\n  max_new_tokens: 8\n"
                   "  micro_batch_tokens: 64\n  sampling: {rule: sequential, steps: 4}\n")
    model = _model_dir(tmp_path)
    out = tmp_path / "plan.json"
    rc = main(["plan", str(run), f"model={model}", "--gpu-memory", "4GiB", "--reserve", "0",
               "--prompt-tokens", "8", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    p = json.loads(out.read_text())
    assert p["fits"] and p["gpus"] == 1 and p["params"]["policy"] == sum(
        t.numel() for t in DiffusionLM(MC).parameters())
    assert p["knobs"]["max_seqs"] == 4 and p["knobs"]["micro_batch_tokens"] == 64
    assert {"rollout_prefill", "rollout_blocks", "update_backward", "optimizer_step"} <= \
        set(p["stages"])
    assert p["checkpoint_bytes"] > 0 and "FITS" in capsys.readouterr().out
    rc = main(["plan", str(run), f"model={model}", "--gpu-memory", "1MiB", "--reserve", "0"])
    assert rc == 1 and "DOES NOT FIT" in capsys.readouterr().out


def test_plan_needs_a_config_json(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("algo: tracerl\nmodel: nowhere\ndataset: d.jsonl\n")
    assert main(["plan", str(run)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_train_refuses_a_run_that_does_not_fit_before_any_weight_loads(tmp_path, monkeypatch,
                                                                        capsys):
    import dlmkern.plan.command as command
    from dlmkern.models import io

    model = _model_dir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                            for i in range(4)))
    run = tmp_path / "run.yaml"
    run.write_text(f"algo: tracerl\nmodel: {model}\ndataset: {data}\ntokenizer: char\n"
                   f"trainer:\n  prompts_per_step: 2\n  group_size: 2\n  max_new_tokens: 8\n"
                   f"  output_dir: {tmp_path / 'out'}\n")
    monkeypatch.setattr(command, "visible_gpus", lambda: (1, 1, 2**20))  # one 1 MiB GPU
    loads = []
    monkeypatch.setattr(io, "load", lambda *a, **k: loads.append(a))
    assert main(["train", str(run)]) == 2
    err = capsys.readouterr()
    assert "does not fit" in err.err and "DOES NOT FIT" in err.err and not loads
    assert not (tmp_path / "out").exists()


def test_train_check_applies_the_plans_knobs(tmp_path):
    from dlmkern.cli import read_run
    from dlmkern.plan.command import train_check

    run = tmp_path / "run.yaml"
    run.write_text(f"algo: tracerl\nmodel: {_model_dir(tmp_path)}\ndataset: d.jsonl\n"
                   "trainer:\n  prompts_per_step: 2\n  group_size: 2\n  max_new_tokens: 8\n"
                   "  micro_batch_tokens: 64\n")
    _, cfg, _ = read_run(str(run), [])
    assert cfg.sampling.max_seqs == 0
    cfg, p = train_check(str(run), [], cfg, gpus=1, nodes=1, gpu_memory=4 * 2**30)
    assert p["fits"] and cfg.sampling.max_seqs == 4 and cfg.micro_batch_tokens == 64
    # free: the run file's micro_batch_tokens may change too (the largest that fits)
    _, cfg, _ = read_run(str(run), [])
    cfg, p = train_check(str(run), [], cfg, gpus=1, nodes=1, gpu_memory=4 * 2**30, free=True)
    assert cfg.micro_batch_tokens == 0 and not cfg.gradient_checkpointing


def test_fit_keeps_searching_past_a_small_chunk_and_checks_the_host():
    """A setting that fits only a small rollout chunk does not end the search when a costlier
    one (optimizer offload) fits a larger chunk; an offloaded state must fit the host, and
    keeping the fp32 gradient sums on the GPU needs less of it (and more GPU memory)."""
    from dlmkern.plan.fit import Budget, Fit, Knobs, fit

    class Run:  # rollout peak = resident + 1 per sequence; offload moves 100 to the host
        host_bytes = 0

        def set_offload(self, offload, sums=True):
            self.offload, self.sums = offload, sums
            self.host_bytes = (500 if sums else 300) if offload else 0

        def resident(self):
            return 1000 - 100 * self.offload + 50 * (self.offload and not self.sums)

        def load(self):
            return {"load": {"total": self.resident()}}

        def update(self, mbt, ckpt):
            return {"update_backward": {"total": self.resident() + 10}}

        def rollout(self, n):
            return {"rollout_blocks": {"total": self.resident() + n}}

    fixed = {"micro_batch_tokens": 0, "gradient_checkpointing": True}
    got = fit(Run(), Budget(1020, reserve=0, margin=0.0), fixed, local_seqs=256)
    assert isinstance(got, Fit) and got.knobs == Knobs(120, 0, True, True, True)
    host = 16 * 2**30  # fit keeps 16 GiB of a node's memory back
    got = fit(Run(), Budget(1020, reserve=0, margin=0.0, host_memory=host + 400), fixed, 256)
    assert got.knobs == Knobs(64, 0, True, True, False)  # the sums stay on the GPU
    got = fit(Run(), Budget(1020, reserve=0, margin=0.0, host_memory=host + 100), fixed, 256)
    assert got.knobs.max_seqs == 20 and not got.knobs.optimizer_offload  # no offload fits


def test_train_goes_on_unplanned_when_this_torch_cannot_plan(tmp_path, monkeypatch, capsys):
    import dlmkern.plan.command as command
    from dlmkern.cli import read_run
    from dlmkern.plan.cli import check_before_train

    def unavailable():
        raise command.PlannerUnavailable("no MemTracker internals")
    monkeypatch.setattr(command, "_planner", unavailable)
    monkeypatch.setattr(command, "visible_gpus", lambda: (1, 1, 80 * 2**30))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"algo: tracerl\nmodel: {_model_dir(tmp_path)}\ndataset: d.jsonl\n")
    run, cfg, _ = read_run(str(run_file), [])
    args = type("A", (), dict(no_plan=False, fit=False, config=str(run_file), overrides=[]))
    tok = trainer_inputs(cfg, 4)[0]
    assert check_before_train(args, run, cfg, [{"prompt": "p"}], tok) is cfg
    assert "no memory plan" in capsys.readouterr().out
    assert main(["plan", str(run_file)]) == 2
    assert "dlmkern plan: error: no MemTracker internals" in capsys.readouterr().err


def test_plan_counts_a_lora_runs_adapter_only_optimizer_state(tmp_path, capsys):
    # issue #30: with adapters the frozen base takes no gradient or optimizer state (the tracker
    # must not hook a frozen weight beside a trained adapter in the same layer)
    run = tmp_path / "run.yaml"
    run.write_text("algo: tracerl\nmodel: nowhere\ndataset: nowhere.jsonl\n"
                   "trainer:\n  prompts_per_step: 2\n  group_size: 2\n  max_new_tokens: 8\n"
                   "  micro_batch_tokens: 64\n  sampling: {rule: sequential, steps: 4}\n")
    model = _model_dir(tmp_path)
    plans = {}
    for name, over in (("full", []), ("lora", ["lora.rank=4"])):
        out = tmp_path / f"{name}.json"
        rc = main(["plan", str(run), f"model={model}", *over, "--gpu-memory", "4GiB",
                   "--reserve", "0", "--prompt-tokens", "8", "--json", str(out)])
        assert rc == 0, capsys.readouterr()
        plans[name] = json.loads(out.read_text())["stages"]["optimizer_step"]
    full, lora = plans["full"], plans["lora"]
    n = sum(t.numel() for t in DiffusionLM(MC).parameters())
    assert full["optimizer"] >= 8 * n  # fp32 moments of every parameter (4 bytes each, two)
    assert 0 < lora["optimizer"] < full["optimizer"] / 20  # the adapters' only
    assert 0 < lora["grads"] < full["grads"] / 20
