"""Self-contained checkpoints: every directory dlmkern writes loads back with
`dlmkern.models.load` and `dlmkern sample --model DIR`, tokenizer included, in the dtype it was
trained in."""

import os

import torch
from dlmkern import SFT, TraceRL
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, load, load_tokenizer, tiny_config
from dlmkern.trainers import SFTConfig, TraceRLConfig

TOK = CharTokenizer("0123456789+= \n")
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id)).to(dtype)


def test_char_tokenizer_saves_as_a_hugging_face_tokenizer(tmp_path):
    TOK.save_pretrained(str(tmp_path))
    hf = load_tokenizer(str(tmp_path))  # transformers.AutoTokenizer, local files only
    text = "12+34= 5\n67"
    assert hf.encode(text) == TOK.encode(text)
    assert hf.decode(TOK.encode(text)) == text
    assert (hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (
        TOK.eos_token_id, TOK.pad_token_id, TOK.mask_token_id)
    assert hf.decode(TOK.encode("42") + [TOK.eos_token_id], skip_special_tokens=True) == "42"


def test_rewards_see_completions_without_special_tokens(tmp_path):
    # With a Hugging Face tokenizer, decode() keeps "<eos>" unless told not to: rewards would
    # compare "12<eos>" with "12". Completions are decoded as TRL does (Trajectory.text).
    TOK.save_pretrained(str(tmp_path / "tok"))
    hf = load_tokenizer(str(tmp_path / "tok"))
    seen = []

    def record(prompts, completions, **_):
        seen.extend(completions)
        return [float(len(c) % 2) for c in completions]

    eos_model = _model()
    with torch.no_grad():  # make EOS likely, so completions end with it
        eos_model.lm_head.weight[TOK.eos_token_id] += 3 * eos_model.lm_head.weight[0].abs()
    cfg = TraceRLConfig(prompts_per_step=2, group_size=4, max_new_tokens=8, total_steps=1,
                        output_dir=str(tmp_path / "rl"), progress_bar=False)
    tr = TraceRL(eos_model, hf, DATA, record, cfg)
    trajs = tr.rollout(DATA[:2]).trajs
    assert any(t.finish_reason == "eos" for t in trajs)
    assert seen and not any("<eos>" in c or "<pad>" in c for c in seen)


def test_bf16_checkpoint_exports_bf16_and_loads_with_its_tokenizer(tmp_path, capsys):
    model = _model(torch.bfloat16)
    sft = SFT(model, TOK, DATA, SFTConfig(batch_size=4, total_steps=1, lr=1e-3,
                                          output_dir=str(tmp_path / "sft")))
    sft.train()
    export = tmp_path / "sft" / "final" / "model"
    assert (export / "tokenizer.json").exists()
    from safetensors.torch import load_file

    tensors = load_file(str(export / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    back = load(str(export))
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the trained weights, bit for bit
    assert main(["sample", "--model", str(export), "--prompt", "1+2=", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()  # one line, maybe empty (EOS first)
    assert len(out) == 1 and "<" not in out[0]
    assert os.path.exists(export / "config.json")
