"""VRPO (LLaDA 1.5, Zhu et al. 2025): the loss and its gradient against DPO on ELBOs written here
in plain torch, each ELBO computed by hand from the tiny model's logits at the trainer's masks
(block model: each block predicted with the earlier blocks clean, one forward per block;
full-attention model: the noisy sequence); antithetic masks and the per-timestep budget;
preference rows refused before work; a few steps raise the margin; `dlmkern config vrpo` and
`dlmkern train` with algo: vrpo."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, load, tiny_config
from dlmkern.ops import layouts
from dlmkern.trainers import VRPO, VRPOConfig
from dlmkern.trainers.elbo import stratified_mask_counts

TOK = CharTokenizer("0123456789+=")
ROWS = [{"prompt": "12+3=", "chosen": "015", "rejected": "014"},
        {"prompt": "7+8=", "chosen": "015", "rejected": "05"},
        {"prompt": "40+9=", "chosen": "049", "rejected": "0409"}]


def _model(family, seed=0):
    torch.manual_seed(seed)
    return DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id))


def _trainer(tmp_path, family, rows=ROWS, **kw):
    model = _model(family)
    ref = copy.deepcopy(model)
    cfg = VRPOConfig(**{**dict(batch_size=len(rows), elbo_samples=3, beta=0.5, lr=1e-3,
                               output_dir=str(tmp_path / "out"), progress_bar=False), **kw})
    return VRPO(model, TOK, rows, cfg), ref


# ---- the formula, by hand --------------------------------------------------------------------

def _token_logps(model, prompt, answer, masked):
    """log p(answer_j | noisy) at each masked j, from plain logits (log_softmax)."""
    c = model.config
    clean = prompt + answer
    noisy = prompt + [c.mask_token_id if m else x for x, m in zip(answer, masked, strict=True)]
    out = {}
    if not c.block_causal:  # one bidirectional forward of the noisy sequence
        logits = model.logits(model(torch.tensor(noisy), layouts.full([len(noisy)])))
        lp = F.log_softmax(logits.float(), -1)
        return [lp[len(prompt) + j, answer[j]] for j, m in enumerate(masked) if m]
    B = c.block_size
    for b in range((len(clean) + B - 1) // B):  # block b noisy, the blocks before it clean
        ids = clean[:b * B] + noisy[b * B:(b + 1) * B]
        logits = model.logits(model(torch.tensor(ids), layouts.block_causal([len(ids)], B)))
        lp = F.log_softmax(logits.float(), -1)
        for pos in range(b * B, len(ids)):
            j = pos - len(prompt)
            if j >= 0 and masked[j]:
                out[j] = lp[pos, answer[j]]
    return [out[j] for j in sorted(out)]


def _elbo(model, prompt, answer, masks):
    """(1 / n) sum_i (L / x_i) sum_{masked j} log p(y_j | masked y, x): t_i = x_i / L."""
    L = len(answer)
    terms = [sum(_token_logps(model, prompt, answer, m)) * L / sum(m) for m in masks]
    return sum(terms) / len(terms)


def _dpo_on_elbos(tr, policy, ref, rows, seeds):
    """-log sigmoid(beta ((B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l)))), mean."""
    entries, _, elbo_of = tr.noised(rows, seeds)
    n = tr.cfg.elbo_samples
    assert elbo_of == [k // n for k in range(len(entries))]  # row i: chosen's n, rejected's n
    losses = []
    for i in range(len(rows)):
        b = {}
        for c in (0, 1):
            group = entries[(2 * i + c) * n:(2 * i + c + 1) * n]
            p, a = group[0][0], group[0][1]
            masks = [m for _, _, m in group]
            b[c] = (_elbo(policy, p, a, masks), _elbo(ref, p, a, masks))
        margin = (b[0][0] - b[0][1]) - (b[1][0] - b[1][1])
        losses.append(-F.logsigmoid(tr.cfg.beta * margin))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_loss_and_gradient_equal_dpo_on_hand_made_elbos(tmp_path, family):
    tr, ref = _trainer(tmp_path, family)
    with torch.no_grad():  # the policy moved away from the reference
        for p in tr.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seeds = [11, 12, 13]
    ours = tr.loss(ROWS, seeds)
    ours.backward()
    g_ours = [p.grad.clone() for p in tr.model.parameters()]
    tr.model.zero_grad()
    theirs = _dpo_on_elbos(tr, tr.model, ref, ROWS, seeds)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert abs(ours.item() - math.log(2)) > 1e-3  # not the trivial equal-models value
    for a, b in zip(g_ours, [p.grad for p in tr.model.parameters()], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert sum(float(g.abs().sum()) for g in g_ours) > 0


# ---- antithetic sampling and the budget ------------------------------------------------------

@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_policy_and_reference_see_the_same_masks(tmp_path, family):
    tr, _ = _trainer(tmp_path, family)
    seen = {}
    for name, m in (("policy", tr.model), ("ref", tr.ref_model)):
        m.register_forward_hook(lambda mod, args, out, name=name:
                                seen.setdefault(name, []).append(args[0].clone()))
    pi, ref = tr.elbos(ROWS, [5, 6, 7])
    assert len(seen["policy"]) == len(seen["ref"]) == 1
    assert torch.equal(seen["policy"][0], seen["ref"][0])  # same timesteps, same masks
    assert (seen["policy"][0] == TOK.mask_token_id).any()
    # equal models: zero ELBO differences exactly, a loss of exactly log 2
    assert torch.equal(pi, ref) and torch.equal(pi - ref, torch.zeros_like(pi))
    assert tr.loss(ROWS, [5, 6, 7]).item() == pytest.approx(math.log(2), abs=1e-7)
    assert (pi < 0).all()  # a real ELBO: a sum of log-probabilities / t


def test_budget_is_one_mask_per_stratified_timestep(tmp_path):
    tr, _ = _trainer(tmp_path, "llada", elbo_samples=4)
    rows = [{"prompt": "1+1=", "chosen": "0000002", "rejected": "0000003"}]  # + EOS: L = 8
    entries, weights, elbo_of = tr.noised(rows, [3])
    assert elbo_of == [0] * 4 + [1] * 4  # n = 4 samples per completion, nothing more
    for c in (0, 1):
        group = entries[4 * c:4 * c + 4]
        counts = sorted(sum(m) for _, _, m in group)
        # four distinct timesteps t = x / 8, one in each stratum (2j, 2j + 2] of 1..8
        assert [(x - 1) // 2 for x in counts] == [0, 1, 2, 3]
        for (_, a, m), w in zip(group, weights[4 * c:4 * c + 4], strict=True):
            assert w == pytest.approx(len(a) / sum(m) / 4)  # 1 / (t n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # any length and budget: n counts in 1..L, stratified
        L, n = int(torch.randint(1, 20, ())), int(torch.randint(1, 9, ()))
        xs = stratified_mask_counts(L, n, gen)
        assert len(xs) == n and all(1 <= x <= L for x in xs)
        if n <= L:
            assert len(set(xs)) == n


# ---- data refusals ---------------------------------------------------------------------------

def _write(tmp_path, rows, name="prefs.jsonl"):
    p = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(p))
    else:
        p.write_text("\n".join(json.dumps(r) for r in rows))
    return str(p)


@pytest.mark.parametrize("bad, match", [
    ({"prompt": "1+1=", "chosen": "2"}, r"row 1, column 'rejected': missing"),
    ({"prompt": "1+1=", "chosen": 2, "rejected": "3"}, r"row 1, column 'chosen': expected text"),
    ({"prompt": "1+1=", "chosen": "  ", "rejected": "3"}, r"row 1, column 'chosen': .*empty"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, r"row 1: columns 'chosen' and "
                                                          r"'rejected' hold the same"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "x"}, r"row 1, column 'rejected': .*'x'"),
    ({"prompt": "1+1=", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"},
     r"row 1, column 'chosen': a chat list must end with an assistant message"),
])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_rows_are_refused_before_work_naming_file_row_and_column(tmp_path, bad, match,
                                                                      fmt):
    if fmt == "parquet" and isinstance(bad.get("chosen"), (int, list)):
        pytest.skip("a parquet column holds one type")
    path = _write(tmp_path, [ROWS[0], bad], f"prefs.{fmt}")
    model = _model("sdar")
    with pytest.raises(ValueError, match=match) as e:
        VRPO(model, TOK, path, VRPOConfig(output_dir=str(tmp_path / "out"),
                                          progress_bar=False))
    assert path in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_chat_completions_and_column_mapping_are_read(tmp_path):
    rows = [{"question": "1+1=", "good": [{"role": "user", "content": "1+1="},
                                          {"role": "assistant", "content": "002"}],
             "bad": "003"}]
    tr = VRPO(_model("llada"), TOK, _write(tmp_path, rows),
              VRPOConfig(columns={"prompt": "question", "chosen": "good", "rejected": "bad"},
                         output_dir=str(tmp_path / "out"), progress_bar=False))
    assert (tr.data[0]["chosen"], tr.data[0]["rejected"]) == ("002", "003")


# ---- learning, CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_a_few_steps_raise_the_chosen_minus_rejected_margin(tmp_path, family):
    rows = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b:03d}", "rejected": f"{a + b + 1:03d}"}
            for a in range(4) for b in range(3)]
    tr, _ = _trainer(tmp_path, family, rows, lr=1e-2, beta=1.0, total_steps=12, log_every=1)
    seeds = list(range(100, 100 + len(rows)))

    def margin():
        with torch.no_grad():
            pi, ref = tr.elbos(rows, seeds)
        d = pi - ref
        return float((d[:, 0] - d[:, 1]).mean())

    assert margin() == 0.0
    tr.train()
    after = margin()
    assert after > 0.25
    log = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert log[0]["margin"] == pytest.approx(0.0, abs=1e-6) and log[-1]["margin"] > 0
    assert log[-1]["reward_accuracy"] > 0.5
    assert (tmp_path / "out" / "final" / "model").is_dir()


def test_config_vrpo_lists_its_keys_and_validate_names_them(capsys):
    assert main(["config", "vrpo"]) == 0
    out = capsys.readouterr().out
    for key in ("beta", "elbo_samples", "lr", "batch_size", "micro_batch_tokens", "output_dir"):
        assert f"\n{key} " in out
    assert "5e-07" in out and "LLaDA 1.5" in out
    with pytest.raises(ValueError, match="beta must be > 0"):
        VRPOConfig(beta=0.0).validate()
    with pytest.raises(ValueError, match="elbo_samples must be >= 1"):
        VRPOConfig(elbo_samples=0).validate()


def test_train_runs_algo_vrpo_and_resumes(tmp_path):
    torch.manual_seed(0)
    model_dir, char = str(tmp_path / "model"), CharTokenizer()  # the run file's "char"
    DiffusionLM(tiny_config("sdar", vocab_size=char.vocab_size,
                            mask_token_id=char.mask_token_id)).save_pretrained(model_dir)
    data = _write(tmp_path, ROWS)
    run = tmp_path / "run.yaml"
    run.write_text(f"algo: vrpo\nmodel: {model_dir}\ndataset: {data}\ntokenizer: char\n"
                   "trainer:\n  batch_size: 2\n  lr: 1.0e-3\n  progress_bar: false\n"
                   "  log_every: 1\n")
    out = tmp_path / "out"
    assert main(["train", str(run), "total_steps=2", f"output_dir={out}", "save_every=1"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and "margin" in log[0]
    after = load(str(out / "final" / "model")).state_dict()
    before = load(model_dir).state_dict()
    assert any(not torch.equal(p, before[n]) for n, p in after.items())
    out2 = tmp_path / "out2"
    assert main(["train", str(run), "total_steps=3", f"output_dir={out2}",
                 f"resume={out / 'checkpoint-1'}"]) == 0
    assert [json.loads(x)["step"] for x in (out2 / "log.jsonl").read_text().splitlines()] == [1, 2]
    bad = _write(tmp_path, [ROWS[0], {"prompt": "1=", "chosen": "1"}], "bad.jsonl")
    assert main(["train", str(run), f"dataset={bad}", f"output_dir={tmp_path / 'o3'}"]) == 2
    assert not (tmp_path / "o3").exists()


def test_demo_pairs_reject_the_models_own_wrong_samples():
    from dlmkern.demo import ALPHABET, DemoSize, addition_task, build_model
    from dlmkern.demo_vrpo import preference_pairs

    tok = CharTokenizer(ALPHABET)
    train, _ = addition_task(20, 5, seed=0, drop_carry=0.5)
    torch.manual_seed(0)
    model = build_model(tok, DemoSize())  # untrained: its samples are almost all wrong
    pairs = preference_pairs(model, tok, train, seed=0, tries=2)
    assert pairs and len({p["prompt"] for p in pairs}) == len(pairs)
    by_prompt = {r["prompt"]: r for r in train}
    for p in pairs:
        assert p["chosen"] == by_prompt[p["prompt"]]["answer"]  # the true sum, not the teacher's
        assert p["rejected"] != p["chosen"] and set(p["rejected"]) <= set(ALPHABET)
    assert pairs == preference_pairs(model, tok, train, seed=0, tries=2)  # seeded


def test_the_finished_runs_eval_command_scores_preference_rows_against_chosen(tmp_path):
    from dlmkern.run_layout import finished_lines

    lines = finished_lines(str(tmp_path), VRPOConfig(), "prefs.jsonl", "1+1=", "exact")
    assert "--data prefs.jsonl --column answer=chosen --reward exact" in lines[-1]
