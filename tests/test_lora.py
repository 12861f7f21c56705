"""LoRA (issue #30): the adapters' arithmetic against a plain-torch W + s B A written here, the
fused log-prob path with an adapted lm_head, merged export, the KL reference as the model with
adapters disabled, PEFT's format (loaded by peft itself when installed), exact resume, and the
config's refusals."""

import math
import os

import pytest
import torch
from dlmkern import TraceRL
from dlmkern.cli import main
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, load, tiny_config
from dlmkern.models.lora import TARGETS, LoRAConfig, adapted, adapters_disabled, apply_lora
from dlmkern.models.lora_io import load_adapter, save_adapter
from dlmkern.ops import layouts
from dlmkern.trainers import SFT, SFTConfig, TraceRLConfig, build_config
from dlmkern.trainers.plan import plan_step
from dlmkern.trainers.update import selected_logp

from .rl_helpers import rl_config

TOK = CharTokenizer()
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def parity(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def _model(family="sdar", seed=0, **kw):
    torch.manual_seed(seed)
    return DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id, **kw))


def _randomize_adapters(model, seed=1):
    """B starts at zero (the adapter is then the identity): give every B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def _inputs(model, n=2, length=9):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size - 1, (n * length,), generator=g)
    c = model.config
    lay = layouts.block_causal([length] * n, c.block_size) if c.block_causal else \
        layouts.full([length] * n)
    return ids, lay


def _logits(model, ids, lay):
    with torch.no_grad():
        return model.logits(model(ids, lay))


# ---- the arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_every_targeted_layer_computes_w_plus_s_b_a_forward_and_backward(rslora):
    model = _model("dream")  # q / k / v with biases
    lora = LoRAConfig(rank=4, alpha=8.0, rslora=rslora, targets=",".join(TARGETS))
    names = apply_lora(model, lora)
    assert len(names) == 7 * model.config.num_layers + 1  # every linear layer, lm_head too
    _randomize_adapters(model)
    s = 8.0 / (math.sqrt(4) if rslora else 4)
    for short in TARGETS:
        name = next(n for n in names if n.rsplit(".", 1)[-1] == short)
        layer = model.get_submodule(name)
        x = torch.randn(5, layer.in_features, requires_grad=True)
        y = layer(x)
        W, A, B = layer.weight, layer.lora_A.weight, layer.lora_B.weight
        b = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        # the formula, from the tensors: y = x W^T + b + s (x A^T) B^T
        Wd, Ad, Bd = (t.detach().clone().requires_grad_(True) for t in (W, A, B))
        xd = x.detach().clone().requires_grad_(True)
        ref = xd @ Wd.T + b.detach() + s * (xd @ Ad.T) @ Bd.T
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        go = torch.randn_like(ref)
        (y * go).sum().backward()
        (ref * go).sum().backward()
        for ours, theirs in ((A.grad, Ad.grad), (B.grad, Bd.grad), (x.grad, xd.grad)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert W.grad is None  # frozen
        torch.testing.assert_close(layer.merged_weight(), Wd + s * Bd @ Ad)


def test_the_fused_logprob_path_scores_the_adapted_lm_head_without_logits():
    model = _model()
    apply_lora(model, LoRAConfig(rank=4, targets="wq,lm_head"))
    _randomize_adapters(model)
    ids, lay = _inputs(model)
    rows = torch.tensor([1, 4, 7, 10, 16])
    tgt = torch.tensor([3, 9, 0, 17, 5])
    ours = model(ids, lay, rows=rows, targets=tgt, temperature=0.7)
    head = model.lm_head
    A = head.lora_A.weight.detach().clone().requires_grad_(True)
    B = head.lora_B.weight.detach().clone().requires_grad_(True)
    h = model(ids, lay).detach()[rows]
    W = head.weight.detach() + head.lora_scale * B @ A
    ref = torch.log_softmax(h @ W.T / 0.7, -1).gather(1, tgt[:, None]).squeeze(1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(head.lora_A.weight.grad, A.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.lora_B.weight.grad, B.grad, rtol=1e-4, atol=1e-6)
    assert model.layers[0].attn.wq.lora_A.weight.grad is not None  # through the hidden states


def test_adapters_disabled_is_the_base_model_and_b_zero_starts_there():
    base = _model()
    model = _model()
    apply_lora(model, LoRAConfig(rank=4))
    ids, lay = _inputs(model)
    torch.testing.assert_close(_logits(model, ids, lay), _logits(base, ids, lay))  # B = 0
    _randomize_adapters(model)
    assert not torch.allclose(_logits(model, ids, lay), _logits(base, ids, lay))
    with adapters_disabled(model):
        torch.testing.assert_close(_logits(model, ids, lay), _logits(base, ids, lay))
    assert not torch.allclose(_logits(model, ids, lay), _logits(base, ids, lay))  # back on


# ---- export, PEFT's format -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_merged_export_gives_the_adapter_models_logits(tmp_path, family):
    base = _model(family)
    base.save_pretrained(str(tmp_path / "base"))
    model = load(str(tmp_path / "base"))
    apply_lora(model, LoRAConfig(rank=4, alpha=6.0, targets="wq,wv,wo,w_down,lm_head"))
    _randomize_adapters(model)
    save_adapter(model, str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    assert main(["export", str(tmp_path / "adapter"), "--merge",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load(str(tmp_path / "merged"))
    assert not any(".lora_" in k for k in merged.state_dict())
    ids, lay = _inputs(model)
    torch.testing.assert_close(_logits(merged, ids, lay), _logits(model, ids, lay),
                               rtol=1e-5, atol=1e-5)
    # and back: the PEFT directory loads onto a fresh base with the same logits
    again = load(str(tmp_path / "base"))
    load_adapter(again, str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(again, ids, lay), _logits(model, ids, lay))


def test_merged_export_keeps_the_base_dtype(tmp_path):
    _model().to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    model = load(str(tmp_path / "base"))
    apply_lora(model, LoRAConfig(rank=2))
    save_adapter(model, str(tmp_path / "adapter"))  # no base recorded: --base gives it
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]) == 2
    assert main(["export", str(tmp_path / "adapter"), "--merge", "--out", str(tmp_path / "m"),
                 "--base", str(tmp_path / "base")]) == 0
    assert next(load(str(tmp_path / "m")).parameters()).dtype == torch.bfloat16


def test_adapter_files_use_peft_names_and_config_fields(tmp_path):
    from safetensors import safe_open

    model = _model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets="wq,layers.1.mlp.w_up",
                                 rslora=True))
    save_adapter(model, str(tmp_path))
    import json

    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (
        "LORA", 4, 8.0, True)
    # q_proj in every layer: its short name; up_proj in layer 1 only: its path
    assert cfg["target_modules"] == ["q_proj", "model.layers.1.mlp.up_proj"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 3


def _qwen3(config):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3Config(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size,
                     num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                     num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                     rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False,
                     max_position_embeddings=config.max_position_embeddings,
                     attention_bias=False, rope_theta=config.rope_theta,
                     rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    return Qwen3ForCausalLM(hf).eval()


def test_peft_loads_dlmkerns_adapters_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    # SDAR is Qwen3; with block size 1 its block-causal attention is Qwen3's causal attention
    base = _model(block_size=1)
    base.save_pretrained(str(tmp_path / "base"))
    hf = _qwen3(base.config)
    hf.load_state_dict(load_file(str(tmp_path / "base" / "model.safetensors")), strict=True)
    ids = torch.randint(0, TOK.vocab_size - 1, (11,), generator=torch.Generator().manual_seed(3))
    lay = layouts.block_causal([11], 1)
    with torch.no_grad():
        hf_logits = hf(ids[None]).logits[0]
    torch.testing.assert_close(hf_logits, _logits(base, ids, lay), rtol=1e-4, atol=1e-4)

    model = load(str(tmp_path / "base"))
    apply_lora(model, LoRAConfig(rank=4, alpha=12.0, targets=",".join(TARGETS)))
    _randomize_adapters(model)
    save_adapter(model, str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids[None]).logits[0]
    ours = _logits(model, ids, lay)
    assert not torch.allclose(ours, hf_logits, atol=1e-3)  # the adapters change something
    torch.testing.assert_close(peft_logits, ours, rtol=1e-4, atol=1e-4)


# ---- trainers ------------------------------------------------------------------------------


def _rl_cfg(tmp_path, **kw):
    base = dict(prompts_per_step=2, group_size=4, max_new_tokens=8, total_steps=1,
                output_dir=str(tmp_path), progress_bar=False, lr=1e-3, pass_rate_low=0.0,
                pass_rate_high=1.0, lora=LoRAConfig(rank=4))
    return rl_config(TraceRLConfig, **{**base, **kw})


def test_kl_to_ref_with_adapters_disabled_equals_kl_to_a_loaded_base_copy(tmp_path):
    tr = TraceRL(_model(), TOK, DATA, parity, _rl_cfg(tmp_path, kl_coef=0.1, kl_to="ref"))
    assert tr.ref_model is None  # no copy of the weights
    _randomize_adapters(tr.model)
    batch = tr.rollout(DATA[:2])
    rows = tr.rows(batch.trajs)
    positions = list(range(len(batch.trajs)))
    plan = plan_step(positions, len(positions), rows, tr.cfg.reduction, 1, 0, 1.0)
    prep = tr.updater.prepare(plan[0], rows, batch.trajs, batch.advantages, batch.rewards,
                              True)[0]
    copy = _model().eval()  # the base, loaded separately
    with torch.no_grad():
        want = selected_logp(copy, prep.rows, tr.device, temperature=tr.objective.temperature)
    torch.testing.assert_close(prep.ref_logp, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(prep.old_logp, want, atol=1e-3)  # the adapters are on for old
    log = tr.train_step()
    assert math.isfinite(log["loss"]) and log["kl"] > 0


def test_rl_with_lora_trains_only_the_adapters_and_a_value_lora_shares_the_base(tmp_path):
    tr = TraceRL(_model(), TOK, DATA, parity, _rl_cfg(tmp_path, use_value_model=True))
    base = {k: v.clone() for k, v in tr.model.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in tr.model.state_dict().items() if ".lora_" in k}
    vm = tr.value_model
    assert vm.trunk.layers[0].attn.wq.weight is tr.model.layers[0].attn.wq.weight  # shared
    assert vm.trunk.layers[0].attn.wq.lora_A is not tr.model.layers[0].attn.wq.lora_A
    n_opt = sum(p.numel() for g in tr.opt.param_groups for p in g["params"])
    assert n_opt == sum(v.numel() for v in adapters.values())
    head = vm.value_head.weight.clone()
    tr.train_step()
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(not torch.equal(after[k], v) for k, v in adapters.items())
    assert not torch.equal(vm.value_head.weight, head)


def test_sft_with_lora_resumes_adapters_and_optimizer_exactly(tmp_path):
    def sft(out, **kw):
        cfg = SFTConfig(**{"batch_size": 4, "total_steps": 2, "lr": 1e-2, "output_dir": str(out),
                           "progress_bar": False,
                           "lora": LoRAConfig(rank=4, targets="w*,lm_head"), **kw})
        return SFT(_model(), TOK, DATA, cfg)

    a = sft(tmp_path / "a").train()
    final = tmp_path / "a" / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    ids, lay = _inputs(a.model)
    merged = load(str(final / "model"))  # model/: the merged weights
    torch.testing.assert_close(_logits(merged, ids, lay), _logits(a.model, ids, lay),
                               rtol=1e-5, atol=1e-5)
    b = sft(tmp_path / "b", total_steps=3)
    b.resume(str(final))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for i in oa:
        assert all(torch.equal(oa[i][k], ob[i][k]) for k in oa[i])
    a.train_step()
    b.train_step()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- config ----------------------------------------------------------------------------------


def test_lora_keys_have_help_and_bad_settings_are_refused_at_config_time(tmp_path, capsys):
    assert main(["config", "tracerl"]) == 0
    out = capsys.readouterr().out
    for key in ("lora.rank", "lora.alpha", "lora.dropout", "lora.targets", "lora.rslora"):
        assert key in out
    cfg = build_config(TraceRLConfig, {}, ["lora.rank=8", "lora.targets=wq,w_up"])
    assert (cfg.lora.rank, cfg.lora.patterns()) == (8, ["wq", "w_up"])
    with pytest.raises(ValueError, match=r"lora.targets: 'q_proj'.*'wq' here"):
        build_config(SFTConfig, {}, ["lora.rank=8", "lora.targets=q_proj"])
    with pytest.raises(ValueError, match=r"lora.dropout must lie in"):
        build_config(SFTConfig, {}, ["lora.rank=8", "lora.dropout=1.5"])
    with pytest.raises(ValueError, match=r"unknown key 'lora.rnak'"):
        build_config(SFTConfig, {}, ["lora.rnak=8"])
    # a layer the model does not have: refused before any step, naming the key and the depth
    with pytest.raises(ValueError, match=r"lora.targets: 'layers.7.attn.wq'.*2 layers"):
        TraceRL(_model(), TOK, DATA, parity,
                _rl_cfg(tmp_path, lora=LoRAConfig(rank=4, targets="layers.7.attn.wq")))
    with pytest.raises(ValueError, match=r"lm_head.*ties"):
        TraceRL(_model(tie_word_embeddings=True), TOK, DATA, parity,
                _rl_cfg(tmp_path, lora=LoRAConfig(rank=4, targets="lm_head")))
    with pytest.raises(ValueError, match=r"lm_head with lora.dropout"):
        TraceRL(_model(), TOK, DATA, parity,
                _rl_cfg(tmp_path, lora=LoRAConfig(rank=4, targets="lm_head", dropout=0.1)))
    assert not os.path.exists(tmp_path / "curves.png")


def test_compare_reports_a_lora_section_as_json():
    import json

    from dlmkern.compare import _own_keys

    cfg = build_config(TraceRLConfig, {}, ["lora.rank=8"])
    own = _own_keys(cfg, set())
    assert own["lora"]["rank"] == 8
    json.dumps(own)  # the table's file
