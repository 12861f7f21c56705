"""Mistakes in what a command is pointed at, refused before any work and naming the thing
(issue 27 item 4): a CUDA device on a machine without one, a tokenizer whose ids do not fit the
model's vocabulary, text the character tokenizer cannot encode (it refuses, never drops, in
prompts, data and answers), and unknown keys, with the known key they were probably meant to
be."""

import json
import os

import pytest
import torch
import yaml
from dlmkern import SFT, TraceRL
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, load_tokenizer, tiny_config
from dlmkern.trainers import SFTConfig, TraceRLConfig, build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_RECIPE = os.path.join(ROOT, "configs", "block_sft.yaml")
RL_RECIPE = os.path.join(ROOT, "configs", "trado4b_tracerl_value.yaml")
DEMO_TOK = CharTokenizer("0123456789+=")  # the demo's alphabet: 15 ids
TOK = CharTokenizer()  # the default alphabet: 21 ids
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
NOWHERE = "/nonexistent/model"  # loading it would fail: an error about anything else came first


def _model(tok):
    torch.manual_seed(0)
    return DiffusionLM(tiny_config("sdar", vocab_size=tok.vocab_size,
                                   mask_token_id=tok.mask_token_id))


def _model_dir(tmp_path, tok, with_tokenizer=True):
    d = tmp_path / f"model{tok.vocab_size}"
    _model(tok).save_pretrained(str(d))
    if with_tokenizer:
        tok.save_pretrained(str(d))
    return d


def _data(tmp_path, rows=DATA):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


# ---- the device -------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_device_cuda_without_a_gpu_is_refused_naming_the_flag(tmp_path, capsys, cmd):
    model = _model_dir(tmp_path, TOK)
    what = ["--prompt", "1+1="] if cmd == "sample" else ["--data", str(_data(tmp_path))]
    assert main([cmd, "--model", str(model), "--device", "cuda", *what]) == 2
    err = capsys.readouterr().err
    assert f"dlmkern {cmd}: error: --device cuda: this machine has no CUDA GPU " \
           "(torch.cuda.is_available() is False); use --device cpu or leave --device out" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_trainer_asked_for_cuda_without_a_gpu_refuses_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"device cuda: this machine has no CUDA GPU"):
        SFT(NOWHERE, TOK, DATA, SFTConfig(output_dir=str(tmp_path / "out")), device="cuda")
    assert not (tmp_path / "out").exists()


def test_an_unknown_device_is_refused_naming_the_flag(tmp_path, capsys):
    assert main(["sample", "--model", str(_model_dir(tmp_path, TOK)), "--device", "gpu",
                 "--prompt", "1+1="]) == 2
    assert "--device 'gpu' is not a device (cpu, cuda, cuda:N)" in capsys.readouterr().err


# ---- the tokenizer's vocabulary against the model's -------------------------------------------

def test_a_tokenizer_with_more_ids_than_the_model_is_refused_by_train(tmp_path, capsys,
                                                                      monkeypatch):
    model = _model_dir(tmp_path, DEMO_TOK)  # 15 ids; tokenizer=char has 21
    data = _data(tmp_path)
    rc = main(["train", SFT_RECIPE, f"model={model}", f"dataset={data}", "tokenizer=char",
               f"output_dir={tmp_path / 'out'}", "batch_size=4", "total_steps=1",
               "progress_bar=false"])
    assert rc == 2
    err = capsys.readouterr().err
    assert ("tokenizer char gives ids up to 20 (21 ids) but the model's vocabulary has 15 "
            f"(vocab_size in {model / 'config.json'})") in err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_by_sample(tmp_path, capsys):
    model = _model_dir(tmp_path, DEMO_TOK)
    assert main(["sample", "--model", str(model), "--tokenizer", "char", "--prompt",
                 "1+1="]) == 2
    assert "tokenizer char gives ids up to 20 (21 ids) but the model's vocabulary has 15" in \
        capsys.readouterr().err


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_by_the_trainers(tmp_path):
    small = _model(DEMO_TOK)
    with pytest.raises(ValueError, match=r"tokenizer gives ids up to 20 \(21 ids\) but the "
                                         r"model's vocabulary has 15"):
        SFT(small, TOK, DATA, SFTConfig(output_dir=str(tmp_path / "sft")))
    with pytest.raises(ValueError, match=r"tokenizer gives ids up to 20 \(21 ids\) but the "
                                         r"model's vocabulary has 15"):
        TraceRL(small, TOK, DATA, lambda p, c, **_: [0.0] * len(c),
                TraceRLConfig(output_dir=str(tmp_path / "rl")))


# ---- text the character tokenizer cannot encode ------------------------------------------------

def test_the_saved_character_tokenizer_refuses_what_it_cannot_encode(tmp_path):
    DEMO_TOK.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("12+3=") == DEMO_TOK.encode("12+3=")
    with pytest.raises(ValueError, match=r"character 'h' of 'hello world' is not in the "
                                         r"character tokenizer's alphabet '0123456789\+='"):
        tok.encode("hello world")


def test_sample_refuses_a_prompt_the_tokenizer_cannot_encode(tmp_path, capsys):
    model = _model_dir(tmp_path, DEMO_TOK)
    assert main(["sample", "--model", str(model), "--prompt", "hello world"]) == 2
    captured = capsys.readouterr()
    assert "character 'h' of 'hello world' is not in the character tokenizer's alphabet" in \
        captured.err
    assert captured.out == ""  # no completion of an empty prompt


@pytest.mark.parametrize("tok_kind", ["built", "saved"])
def test_sft_refuses_answers_with_characters_outside_the_alphabet(tmp_path, tok_kind):
    rows = [*DATA[:7], {"prompt": "1+1=", "answer": "two"}, *DATA[7:]]
    tok = TOK
    if tok_kind == "saved":
        TOK.save_pretrained(str(tmp_path / "tok"))
        tok = load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"row 7, column 'answer': character 't' of 'two' is "
                                         r"not in the character tokenizer's alphabet"):
        SFT(NOWHERE, tok, rows, SFTConfig(output_dir=str(tmp_path / "out")))


def test_rl_refuses_prompts_with_characters_outside_the_alphabet_in_any_row(tmp_path):
    rows = [*DATA[:3], {"prompt": "one+1=", "answer": "2"}]
    with pytest.raises(ValueError, match=r"row 3, column 'prompt': character 'o' of 'one\+1=' "
                                         r"is not in the character tokenizer's alphabet"):
        TraceRL(NOWHERE, TOK, rows, lambda p, c, **_: [0.0] * len(c),
                TraceRLConfig(output_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match=r"instruction: character 'A' of 'Add.' is not in the "
                                         r"character tokenizer's alphabet"):
        TraceRL(NOWHERE, TOK, DATA, lambda p, c, **_: [0.0] * len(c),
                TraceRLConfig(output_dir=str(tmp_path / "out"), instruction="Add."))


def test_train_refuses_sft_rows_with_words_naming_the_row(tmp_path, capsys):
    model = _model_dir(tmp_path, TOK)
    data = _data(tmp_path, [*DATA, {"prompt": "2+2=", "answer": "four"}])
    rc = main(["train", SFT_RECIPE, f"model={model}", f"dataset={data}", "tokenizer=char",
               f"output_dir={tmp_path / 'out'}", "batch_size=4", "total_steps=1",
               "progress_bar=false"])
    assert rc == 2
    assert "row 25, column 'answer': character 'f' of 'four'" in capsys.readouterr().err


# ---- unknown keys ------------------------------------------------------------------------------

def _run_file(tmp_path, **keys):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"algo": "sft", "model": str(tmp_path),
                                 "dataset": str(tmp_path), **keys}))
    return str(p)


@pytest.mark.parametrize("keys, args, message", [
    ({"modle": "x"}, [], r"unknown key 'modle' \(did you mean 'model'\?"),
    ({"trainer": {"totl_steps": 3}}, [], r"unknown key 'totl_steps' for SFTConfig \(did you "
                                         r"mean 'total_steps'\?"),
    ({}, ["total_step=3"], r"unknown key 'total_step' for SFTConfig \(did you mean "
                           r"'total_steps'\?"),
    ({}, ["datset=x.jsonl"], r"unknown key 'datset' .*did you mean 'dataset' \(a run file "
                             r"key\)\?"),
])
def test_unknown_keys_suggest_the_known_one(tmp_path, capsys, keys, args, message):
    import re

    assert main(["train", _run_file(tmp_path, **keys), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_unknown_nested_keys_suggest_the_known_one():
    with pytest.raises(ValueError, match=r"unknown key 'sampling.stpes' for SamplingConfig "
                                         r"\(did you mean 'sampling.steps'\?"):
        build_config(TraceRLConfig, {}, ["sampling.stpes=2"])
