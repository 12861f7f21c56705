"""The dlmkern command: run files are checked before work starts; every recipe in configs/ runs
one step with the model swapped for a tiny one."""

import json
import os

import pytest
import torch
from dlmkern.cli import main, parse_run
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, load, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = CharTokenizer()


def _tiny_dir(tmp_path, family):
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size,
                                mask_token_id=TOK.mask_token_id))
    d = tmp_path / f"model_{family}"
    m.save_pretrained(str(d))
    return str(d)


def _data(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)})
                           for a in range(5) for b in range(5)))
    return str(p)


@pytest.mark.parametrize("recipe, family", [("trado4b_tracerl_value.yaml", "sdar"),
                                            ("sdar8b_dipo.yaml", "sdar"),
                                            ("llada_tracerl.yaml", "llada"),
                                            ("block_sft.yaml", "sdar")])
def test_recipes_run_one_step_on_a_tiny_model(tmp_path, recipe, family):
    path = os.path.join(ROOT, "configs", recipe)
    # the recipes' math prompt formats need a real tokenizer's letters: the character tokenizer
    # gets the bare prompt (tests/test_prompts.py checks the formats)
    small = ["total_steps=1", f"output_dir={tmp_path / 'out'}", "progress_bar=false",
             "instruction=", "prompt_template="]
    algo = parse_run(path, [f"model={_tiny_dir(tmp_path, family)}",
                            f"dataset={_data(tmp_path)}"])[0].algo
    if algo == "sft":
        small += ["batch_size=4"]
    else:
        small += ["prompts_per_step=1", "group_size=2", "max_new_tokens=8", "sampling.steps=2",
                  "gen_block_length=4", "max_oversample_rounds=0"]
    # a reward with variance inside every group, so no recipe's filter skips the update
    reward = "tests.test_cli:alternating"
    model_dir = _tiny_dir(tmp_path, family)
    rc = main(["train", path, f"model={model_dir}", f"dataset={_data(tmp_path)}",
               "tokenizer=char", f"reward={reward}", *small])
    assert rc == 0
    out = tmp_path / "out"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log and all("skipped" not in row for row in log)
    if algo != "sft":
        assert log[-1]["kept_groups"] == 1 and log[-1]["train_tokens"] > 0
    before, after = load(model_dir), load(str(out / "final" / "model"))
    ref = before.state_dict()
    changed = [n for n, p in after.state_dict().items() if not torch.equal(p, ref[n])]
    assert changed, "one step of the recipe changed no parameter"


def test_train_resumes_from_a_checkpoint(tmp_path):
    path = os.path.join(ROOT, "configs", "trado4b_tracerl_value.yaml")
    common = [f"model={_tiny_dir(tmp_path, 'sdar')}", f"dataset={_data(tmp_path)}",
              "tokenizer=char", "reward=tests.test_cli:alternating", "progress_bar=false",
              "prompts_per_step=1", "group_size=2", "max_new_tokens=8", "sampling.steps=2",
              "instruction="]  # the recipe's math instruction: letters the char tokenizer lacks
    out = tmp_path / "out"
    assert main(["train", path, *common, "total_steps=1", f"output_dir={out}"]) == 0
    out2 = tmp_path / "out2"
    assert main(["train", path, *common, "total_steps=3", f"output_dir={out2}",
                 f"resume={out / 'final'}"]) == 0
    steps = [json.loads(x)["step"] for x in (out2 / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # continued after the checkpoint's step
    with pytest.raises(ValueError, match=r"resume 'nowhere' is not a dlmkern checkpoint"):
        parse_run(path, [*common[:2], "resume=nowhere"])


def exact(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def alternating(prompts, completions, **_):
    return [float(i % 2) for i in range(len(completions))]


def test_bad_run_files_fail_before_work(tmp_path, capsys):
    good = {"algo": "tracerl", "model": _tiny_dir(tmp_path, "sdar"), "dataset": _data(tmp_path)}

    def write(d):
        import yaml

        p = tmp_path / "run.yaml"
        p.write_text(yaml.safe_dump(d))
        return str(p)

    with pytest.raises(ValueError, match=r"unknown key 'optimizer'"):
        parse_run(write({**good, "optimizer": "adam"}), [])
    with pytest.raises(ValueError, match=r"model path 'nowhere' does not exist"):
        parse_run(write({**good, "model": "nowhere"}), [])
    with pytest.raises(ValueError, match=r"missing required key 'dataset'"):
        parse_run(write({k: v for k, v in good.items() if k != "dataset"}), [])
    with pytest.raises(ValueError, match=r"unknown key 'learning_rate'"):
        parse_run(write({**good, "trainer": {"learning_rate": 1}}), [])
    with pytest.raises(ValueError, match=r"group_size must be int, got 'x'"):
        parse_run(write(good), ["group_size=x"])
    with pytest.raises(ValueError,
                       match=r"algo must be one of tracerl, dipo, .*, sft, vrpo, got 'ppo'"):
        parse_run(write({**good, "algo": "ppo"}), [])
    with pytest.raises(ValueError, match=r"reward 'no_such_module:f' cannot be loaded"):
        parse_run(write({**good, "reward": "no_such_module:f"}), [])
    with pytest.raises(ValueError, match=r"reward 'tests.test_cli:nothing' cannot be loaded"):
        parse_run(write({**good, "reward": "tests.test_cli:nothing"}), [])
    with pytest.raises(ValueError, match=r"tokenizer 'tok/none' is neither 'char' nor a dir"):
        parse_run(write({**good, "tokenizer": "tok/none"}), [])
    # the command prints the reason and exits 2
    assert main(["train", write({**good, "model": "nowhere"})]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sample_and_eval_commands(tmp_path, capsys):
    model = _tiny_dir(tmp_path, "sdar")
    assert main(["sample", "--model", model, "--tokenizer", "char", "--prompt", "1+2=",
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert main(["eval", "--model", model, "--tokenizer", "char", "--data", _data(tmp_path),
                 "--max-new-tokens", "4", "--reward", "exact"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= res["accuracy"] <= 1.0 and res["samples"] == 25 and res["tokens_per_s"] > 0
    assert res["tokens_per_step"] >= 1.0
    # the math reward (\boxed{} + math-verify) with the dynamic rule, on a full-attention model
    rows = tmp_path / "boxed.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)})
                              for a in range(4)))
    assert main(["eval", "--model", _tiny_dir(tmp_path, "llada"), "--tokenizer", "char",
                 "--data", str(rows), "--max-new-tokens", "8", "--block-length", "4",
                 "--rule", "dynamic", "--threshold", "0.5", "--dtype", "float32"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == 4 and res["accuracy"] == 0.0  # a random model boxes nothing
    assert res["tokens_per_step"] >= 1.0


def test_math_eval_scores_boxed_answers(tmp_path, monkeypatch, capsys):
    # a stand-in sampler that answers in \boxed{}: two right, one equivalent form, one wrong
    import dlmkern.cli as cli
    from dlmkern.evaluate import Generation
    from dlmkern.sampling.block import Trajectory

    answers = ["\\boxed{4}", "so \\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{7}"]

    class Stub:
        def generate(self, prompts, seed=0):
            return [Trajectory(prompt_ids=p, token_ids=_EchoTok().encode(a), step_map=[0] * len(a))
                    for p, a in zip(prompts, answers, strict=True)]

    monkeypatch.setattr(Generation, "sampler", lambda self, model, eos: Stub())
    monkeypatch.setattr(cli, "make_tokenizer", lambda spec: _EchoTok())
    rows = tmp_path / "m.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": "q", "answer": a})
                              for a in ["4", "1/2", "0.5", "8"]))
    assert main(["eval", "--model", _tiny_dir(tmp_path, "sdar"), "--data", str(rows)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["accuracy"] == 0.75


class _EchoTok:
    """Token ids are code points: any text survives encode / decode."""
    eos_token_id = None

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_sample_reaches_every_sampling_rule(tmp_path, monkeypatch, capsys):
    import dlmkern.cli as cli

    seen = []
    real = cli._sampler

    def record(model, tok, args):
        s = real(model, tok, args)
        seen.append(s.cfg)
        return s

    monkeypatch.setattr(cli, "_sampler", record)
    assert main(["sample", "--model", _tiny_dir(tmp_path, "llada"), "--tokenizer", "char",
                 "--prompt", "1+2=", "--max-new-tokens", "8", "--block-length", "4",
                 "--steps-total", "4", "--cfg-scale", "1.5", "--confidence", "margin",
                 "--schedule", "dream", "--top-k", "3", "--top-p", "0.9", "--temperature", "0.7",
                 "--dtype", "float32"]) == 0
    (cfg,) = seen
    assert (cfg.steps, cfg.steps_total, cfg.cfg_scale, cfg.confidence, cfg.schedule, cfg.top_k,
            cfg.top_p, cfg.temperature) == (2, 0, 1.5, "margin", "dream", 3, 0.9, 0.7)
    assert main(["sample", "--model", _tiny_dir(tmp_path, "llada"), "--tokenizer", "char",
                 "--prompt", "1+2=", "--max-new-tokens", "8", "--block-length", "4",
                 "--steps-total", "3"]) == 2
    assert "split evenly" in capsys.readouterr().err
