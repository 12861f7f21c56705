"""Prompt formats (SPEC 4.8): a tokenizer built in code with a chat template (nothing downloaded);
rendered prompts against hand-written strings, special tokens once, the peers' formats, and the
trainers / `dlmkern eval` using the same format while rewards see the row's own text."""

import json
import string

import pytest
import torch
from dlmkern import SFT, TraceRL
from dlmkern.data import MATH_INSTRUCTION, CharTokenizer, PromptFormat, load_dataset
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.trainers import SFTConfig, TraceRLConfig

SPECIALS = ["<s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|mask|>"]
# ChatML written the Qwen way, with a BOS first as LLaMA-style templates write it
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")


def chat_tokenizer(template: str | None = CHATML):
    """One token per printable character plus the specials; encode() adds a BOS by default (as
    LLaMA / LLaDA tokenizers do), so a templated prompt encoded naively holds two."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {t: i for i, t in enumerate(["[UNK]", *SPECIALS, *chars])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()  # tokens back to text with nothing between them
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="<|endoftext|>",
                                  unk_token="[UNK]", additional_special_tokens=SPECIALS[1:])
    tok.chat_template = template
    tok.mask_token_id = vocab["<|mask|>"]
    return tok


TOK = chat_tokenizer()
Q = "What is 3+4?"


def test_chat_template_with_instruction_and_system_prompt():
    fmt = PromptFormat(instruction=MATH_INSTRUCTION)
    row = load_dataset([{"prompt": Q}])[0]
    assert fmt.text(row, TOK) == (
        "<s><|im_start|>user\nWhat is 3+4?\nPlease reason step by step, and put your final "
        "answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    fmt = PromptFormat(system_prompt="You are a helpful assistant.",
                       instruction="You need to put your final answer in \\boxed{}. This is the "
                                   "problem:\n{prompt}")
    assert fmt.text(row, TOK) == (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nYou "
        "need to put your final answer in \\boxed{}. This is the problem:\nWhat is 3+4?"
        "<|im_end|>\n<|im_start|>assistant\n")


def test_conversations_keep_their_system_turn_and_instruct_the_last_user_turn():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}]
    row = load_dataset([{"messages": chat, "answer": "4"}])[0]
    assert row["prompt"] == "2+2?"  # what the rewards receive
    fmt = PromptFormat(system_prompt="ignored: the row has one", instruction="Box it.")
    assert fmt.text(row, TOK) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?\nBox it.<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert chat[3]["content"] == "2+2?"  # the row is not modified


def test_special_tokens_are_not_added_twice():
    row = {"prompt": Q}
    ids = PromptFormat().encode(row, TOK)
    assert ids[0] == TOK.bos_token_id and ids.count(TOK.bos_token_id) == 1
    assert TOK.decode(ids) == "<s><|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    # the naive encoding (what the test guards against) holds two BOS
    assert TOK.encode(PromptFormat().text(row, TOK)).count(TOK.bos_token_id) == 2
    # the special markers are single tokens
    assert ids[1] == TOK.convert_tokens_to_ids("<|im_start|>")


def test_raw_and_whole_prompt_templates():
    row = {"prompt": Q}
    raw = PromptFormat(chat_template=False, system_prompt="Sys.", instruction="Box it.")
    assert raw.text(row, TOK) == "Sys.\nWhat is 3+4?\nBox it."
    assert raw.encode(row, TOK) == TOK.encode("Sys.\nWhat is 3+4?\nBox it.")  # tokenizer's BOS
    # dLLM-RL's LLaDA math prompt (sample/llada_rl_rollout.py), token for token
    llada = PromptFormat(template="<|startoftext|><|start_header_id|>user<|end_header_id|>You "
                         "need to put your final answer in \\boxed{}. This is the problem:\n"
                         "{prompt}<|eot_id|><|startoftext|><|start_header_id|>assistant"
                         "<|end_header_id|>\n")
    assert llada.text(row, TOK) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>You need to put your final "
        "answer in \\boxed{}. This is the problem:\nWhat is 3+4?<|eot_id|><|startoftext|>"
        "<|start_header_id|>assistant<|end_header_id|>\n")
    assert TOK.bos_token_id not in llada.encode(row, TOK)  # the template is the whole prompt
    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        PromptFormat(template="no slot")


def test_without_a_chat_template():
    char = CharTokenizer()
    assert PromptFormat().encode({"prompt": "1+2="}, char) == char.encode("1+2=")
    plain = chat_tokenizer(template=None)
    assert PromptFormat().text({"prompt": Q}, plain) == Q
    with pytest.raises(ValueError, match=r"chat_template: true, but the tokenizer has no chat "):
        PromptFormat(chat_template=True).text({"prompt": Q}, plain)
    chat = load_dataset([{"prompt": "a"}, {"messages": [{"role": "user", "content": "1"},
                                                        {"role": "user", "content": "2"}]}])
    with pytest.raises(ValueError, match=r"row 1 holds a conversation \(2 messages"):
        PromptFormat().check(chat, plain)
    PromptFormat().check(chat, TOK)  # the chat template renders it


def test_sft_answers_follow_the_template():
    fmt = PromptFormat(instruction="Box it.")
    row = {"prompt": Q}
    ans = fmt.encode_answer(row, "\\boxed{7}", TOK)
    assert TOK.decode(ans) == "\\boxed{7}<|im_end|>\n"
    assert PromptFormat(chat_template=False).encode_answer(row, "7", TOK) == \
        [TOK.convert_tokens_to_ids("7")]  # no BOS in the middle of a sequence


def _model():
    torch.manual_seed(0)
    return DiffusionLM(tiny_config("sdar", vocab_size=len(TOK), mask_token_id=TOK.mask_token_id))


def test_rl_samples_templated_prompts_and_rewards_see_the_row_text(tmp_path):
    seen = {}

    def reward(prompts, completions, answer, **_):
        seen["prompts"] = list(prompts)
        return [float(i % 2) for i in range(len(completions))]

    verl = [{"prompt": [{"role": "user", "content": f"{a}+{a}="}], "reward_model":
             {"ground_truth": str(2 * a)}} for a in range(2)]
    cfg = TraceRLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, total_steps=1,
                        output_dir=str(tmp_path), progress_bar=False, instruction="Box it.",
                        columns={"answer": "reward_model.ground_truth"})
    tr = TraceRL(_model(), TOK, verl, reward, cfg)
    trajs = tr.rollout(tr.data).trajs
    assert sorted(seen["prompts"]) == ["0+0=", "0+0=", "1+1=", "1+1="]
    texts = sorted({TOK.decode(t.prompt_ids) for t in trajs})
    assert texts == [f"<s><|im_start|>user\n{a}+{a}=\nBox it.<|im_end|>\n<|im_start|>assistant\n"
                     for a in (0, 1)]


def test_sft_encodes_chat_rows(tmp_path):
    chat = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    sft = SFT(_model(), TOK, [{"messages": chat}],
              SFTConfig(output_dir=str(tmp_path), progress_bar=False, batch_size=1))
    p, a = sft.encode(sft.data[0])
    assert TOK.decode(p) == "<s><|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    assert TOK.decode(a) == "4<|im_end|>\n<|endoftext|>"


def test_eval_reads_parquet_with_a_column_mapping_and_the_chat_template(tmp_path, monkeypatch,
                                                                         capsys):
    pa = pytest.importorskip("pyarrow")
    import dlmkern.cli as cli
    import pyarrow.parquet as pq
    from dlmkern.evaluate import Generation
    from dlmkern.sampling.block import Trajectory

    rows = [{"question": "1+1=", "reward_model": {"ground_truth": "2"}},
            {"question": "2+2=", "reward_model": {"ground_truth": "4"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "math.parquet")
    got = {}

    class Stub:
        def generate(self, prompts, seed=0):
            got["prompts"] = [TOK.decode(p) for p in prompts]
            return [Trajectory(prompt_ids=p, token_ids=TOK.encode("\\boxed{2}",
                                                                  add_special_tokens=False),
                               step_map=[0] * 9) for p in prompts]

    monkeypatch.setattr(Generation, "sampler", lambda self, model, eos: Stub())
    model_dir = tmp_path / "model"
    _model().save_pretrained(str(model_dir))
    TOK.save_pretrained(str(model_dir))
    assert cli.main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "math.parquet"),
                     "--column", "prompt=question", "--column",
                     "answer=reward_model.ground_truth", "--instruction", "Box it."]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["accuracy"] == 0.5 and res["samples"] == 2
    assert got["prompts"] == [f"<s><|im_start|>user\n{q}\nBox it.<|im_end|>\n<|im_start|>"
                              "assistant\n" for q in ("1+1=", "2+2=")]
    assert cli.main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "math.parquet"),
                     "--column", "prompt=question"]) == 2  # no answer column: refused
    assert "needs column 'answer'" in capsys.readouterr().err


# the peers' math prompts for the problem "1+1=", copied from their code (see dlmkern.data.prompts)
PEERS = {
    # Gen-Verse/dLLM-RL sample/trado_rl_rollout.py (TraDo, SDAR)
    "trado4b_tracerl_value.yaml": "<|im_start|>user\n1+1=\nPlease reason step by step, and put "
    "your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n",
    # OpenMOSS/DiRL train/rollout_dapo_server.py reason_prompt (SDAR)
    "sdar8b_dipo.yaml": "<|im_start|>user\n1+1=\nPlease reason step by step, and put your final "
    "answer within $\\boxed{}$.<|im_end|>\n<|im_start|>assistant\n",
    # Gen-Verse/dLLM-RL sample/llada_rl_rollout.py (LLaDA)
    "llada_tracerl.yaml": "<|startoftext|><|start_header_id|>user<|end_header_id|>You need to put "
    "your final answer in \\boxed{}. This is the problem:\n1+1=<|eot_id|><|startoftext|>"
    "<|start_header_id|>assistant<|end_header_id|>\n",
}


@pytest.mark.parametrize("recipe", sorted(PEERS))
def test_recipes_reproduce_the_peers_prompts(recipe):
    import os

    from dlmkern.cli import parse_run

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, cfg = parse_run(os.path.join(root, "configs", recipe),
                       [f"model={root}", f"dataset={root}"])  # paths that exist
    qwen = chat_tokenizer(CHATML.replace("{{ bos_token }}", ""))  # Qwen's ChatML: no BOS
    assert PromptFormat.from_config(cfg).text({"prompt": "1+1="}, qwen) == PEERS[recipe]


def test_a_prompt_the_tokenizer_cannot_encode_is_refused_before_work():
    with pytest.raises(ValueError, match=r"instruction: character 'B' of 'Box it.' is not in "
                                         r"the character tokenizer's alphabet"):
        PromptFormat(instruction="Box it.").check([{"prompt": "1+1="}], CharTokenizer())
