"""Models: HF round trip, packed-round equivalence, prefill + decode, dense references, loading
errors (issue: models)."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from dlmkern.models import DiffusionLM, KVCache, ValueModel, load, tiny_config, upstream_name
from dlmkern.ops import layouts

FAMILIES = ["sdar", "llada", "dream"]


def _model(family, **kw):
    torch.manual_seed(0)
    return DiffusionLM(tiny_config(family, **kw)).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, family, tied):
    m = _model(family, tie_word_embeddings=tied)
    m.save_pretrained(str(tmp_path))
    m2 = load(str(tmp_path))
    assert m2.config == m.config
    for (k1, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(a, b), k1
    if tied:
        assert m2.lm_head.weight.data_ptr() == m2.embed.weight.data_ptr()
    lay = layouts.block_causal([20], 4)
    ids = torch.randint(0, 63, (20,))
    assert torch.equal(m(ids, lay), m2(ids, lay))


def test_upstream_names():
    assert upstream_name("sdar", "layers.3.attn.q_norm.weight") == \
        "model.layers.3.self_attn.q_norm.weight"
    assert upstream_name("dream", "layers.0.attn.wq.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert upstream_name("llada", "layers.1.mlp.w_gate.weight") == \
        "model.transformer.blocks.1.ff_proj.weight"
    assert upstream_name("llada", "lm_head.weight") == "model.transformer.ff_out.weight"
    assert upstream_name("llada", "embed.weight") == "model.transformer.wte.weight"


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
def test_value_model_round_trip_and_zero_init(tmp_path, family):
    policy = _model(family)
    vm = ValueModel.from_policy(policy)
    lay = layouts.block_causal([12], 4) if family == "sdar" else layouts.full([12])
    ids = torch.randint(0, 63, (12,))
    assert torch.all(vm(ids, lay) == 0)  # zero-initialised head
    with torch.no_grad():
        vm.value_head.bias.fill_(0.5)
        vm.value_head.weight.normal_()
    vm.save_pretrained(str(tmp_path))
    vm2 = load(str(tmp_path))
    assert isinstance(vm2, ValueModel)
    assert torch.equal(vm(ids, lay), vm2(ids, lay))
    # The trunk is the policy's.
    assert torch.equal(vm2.trunk(ids, lay), policy(ids, lay))


def _noisy_ids(clean, lay, mask_id, g):
    """Noisy copies hold the clean tokens, some replaced by the mask token."""
    ids = clean[lay.position_ids].clone()
    noisy = lay.stream > 0
    ids[noisy & (torch.rand(ids.shape, generator=g) < 0.5)] = mask_id
    return ids


@pytest.mark.parametrize("prompt, length", [(5, 31), (8, 24)])
def test_packed_rounds_equal_one_row_per_round(prompt, length):
    m = _model("sdar")
    B = m.config.block_size
    n_blocks = (length + B - 1) // B - prompt // B
    rounds = [1 + (j % 3) for j in range(n_blocks)]
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 62, (length,), generator=g)
    packed = layouts.packed_rounds([prompt], [length], B, [rounds])
    ids = _noisy_ids(clean, packed, m.config.mask_token_id, g)
    hidden = m(ids, packed)
    logits = m.logits(hidden)
    first = (prompt // B) * B
    for r in range(1, max(rounds) + 1):
        # This round as its own TraceRL row [prompt | clean | noisy_r]; blocks without round r
        # carry arbitrary noisy tokens (they do not influence the blocks compared below).
        row = layouts.tracerl([prompt], [length], B)
        row_ids = clean[row.position_ids].clone()
        sel = (packed.stream == r).nonzero().squeeze(1)
        pos_r = packed.position_ids[sel]
        noisy_start = length  # row layout: clean copy first, then positions first..length-1
        row_ids[noisy_start + (pos_r - first)] = ids[sel]
        row_logits = m.logits(m(row_ids, row))
        torch.testing.assert_close(logits[sel], row_logits[noisy_start + (pos_r - first)],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[:length], row_logits[:length], atol=1e-5, rtol=1e-5)


def test_noisy_copies_share_clean_positions():
    lay = layouts.packed_rounds([6], [20], 4, [[2, 1, 2, 1]])
    clean = lay.stream == 0
    assert torch.equal(lay.position_ids[clean], torch.arange(20))
    for r in (1, 2):
        pos = lay.position_ids[lay.stream == r]
        assert torch.equal(lay.block[lay.stream == r], (pos // 4).to(torch.int32))
    # A noisy block at the clean block's positions gives the clean block's output when it holds
    # the same tokens (same rule, same RoPE positions).
    m = _model("sdar")
    ids = torch.randint(0, 62, (20,))
    lay1 = layouts.tracerl([4], [20], 4)  # noisy copy of blocks 1..4 (positions 4..19)
    out = m(ids[lay1.position_ids], lay1)
    # noisy block b sees clean blocks < b and itself; clean block b sees clean blocks <= b.
    torch.testing.assert_close(out[20:], out[4:20], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt", [8, 6])
def test_prefill_then_decode_equals_block_causal_forward(prompt):
    m = _model("sdar")
    B, L = m.config.block_size, 26
    ids = torch.randint(0, 62, (L,))
    full = m(ids, layouts.block_causal([L], B))
    cache = KVCache.empty(m.config, 1, 64, "cpu", torch.float32)
    start = (prompt // B) * B  # a prompt ending mid-block starts the first decoded block
    h = m.prefill(ids[:start], torch.tensor([0, start], dtype=torch.int32), cache)
    torch.testing.assert_close(h, full[:start], atol=1e-5, rtol=1e-5)
    pos = start
    while pos < L:
        end = min(L, (pos // B + 1) * B)
        cu = torch.tensor([0, end - pos], dtype=torch.int32)
        # several denoising steps on the block, then commit
        hb = m.decode(ids[pos:end], torch.arange(pos, end), cu, cache)
        hb2 = m.decode(ids[pos:end], torch.arange(pos, end), cu, cache, commit=True)
        torch.testing.assert_close(hb, full[pos:end], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hb2, hb)
        pos = end
    assert int(cache.lengths[0]) == L


def _dense_reference(m, ids):
    """A plain bidirectional transformer forward written out with torch ops (one sequence)."""
    c = m.config
    T = ids.shape[0]
    x = m.embed.weight[ids]
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rms(v, w, eps=c.rms_norm_eps):
        return w * (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps))

    def rot(v):  # [H, T, D]
        a, b = v[..., : c.head_dim // 2], v[..., c.head_dim // 2:]
        return v * cos + torch.cat([-b, a], -1) * sin

    for layer in m.layers:
        at = layer.attn
        h = rms(x, layer.attn_norm.weight)
        q = F.linear(h, at.wq.weight, at.wq.bias).view(T, c.num_heads, -1).transpose(0, 1)
        k = F.linear(h, at.wk.weight, at.wk.bias).view(T, c.num_kv_heads, -1).transpose(0, 1)
        v = F.linear(h, at.wv.weight, at.wv.bias).view(T, c.num_kv_heads, -1).transpose(0, 1)
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = (rot(q) @ rot(k).transpose(1, 2)) / math.sqrt(c.head_dim)
        o = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
        x = x + o @ at.wo.weight.T
        h = rms(x, layer.mlp_norm.weight)
        mlp = layer.mlp
        x = x + (F.silu(h @ mlp.w_gate.weight.T) * (h @ mlp.w_up.weight.T)) @ mlp.w_down.weight.T
    return rms(x, m.norm.weight)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_full_attention_models_match_dense_reference(family):
    m = _model(family)
    for L in (7, 33):
        ids = torch.randint(0, 62, (L,))
        # the layout's block metadata is ignored by full-attention families
        out = m(ids, layouts.block_causal([L], 4))
        torch.testing.assert_close(out, _dense_reference(m, ids), atol=1e-5, rtol=1e-5)


def test_dream_predicts_from_previous_position():
    m = _model("dream")
    h = torch.arange(10.0)[:, None].expand(10, 4)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    ph = m.prediction_hidden(h, cu)
    assert ph[:, 0].tolist() == [0, 0, 1, 2, 4, 4, 5, 6, 7, 8]
    assert torch.equal(_model("sdar").prediction_hidden(h, cu), h)


def test_gradient_checkpointing_gives_same_gradients():
    m1, m2 = _model("sdar").train(), _model("sdar").train()
    m2.gradient_checkpointing = True
    lay = layouts.bd3([17], 4)
    ids = torch.randint(0, 62, (34,))
    m1(ids, lay).square().sum().backward()
    m2(ids, lay).square().sum().backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=n)


def _corrupt(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    _model("sdar").save_pretrained(str(tmp_path))
    f = os.path.join(str(tmp_path), "model.safetensors")
    t = load_file(f)
    edit(t)
    save_file(t, f)


def test_missing_misnamed_misshaped_tensors_fail_clearly(tmp_path):
    name = "model.layers.1.self_attn.k_norm.weight"
    _corrupt(tmp_path / "a", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"lacks tensor 'model.layers.1.self_attn.k_norm.weight'"):
        load(str(tmp_path / "a"))
    _corrupt(tmp_path / "b", lambda t: t.update({"model.layers.1.attn.k_norm.weight": t.pop(name)}))
    with pytest.raises(ValueError, match=r"lacks tensor|unexpected tensor"):
        load(str(tmp_path / "b"))
    _corrupt(tmp_path / "c", lambda t: t.update({name: torch.ones(7)}))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.self_attn.k_norm.weight' has "
                                         r"shape \(7,\), expected \(16,\)"):
        load(str(tmp_path / "c"))


def test_config_errors(tmp_path):
    m = _model("sdar")
    m.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'"):
        load(str(tmp_path))
    cfg["model_type"] = "sdar"
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing required key 'hidden_size'"):
        load(str(tmp_path))


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model("llada")
    m.save_pretrained(str(tmp_path))
    t = load_file(str(tmp_path / "model.safetensors"))
    names = sorted(t)
    half = len(names) // 2
    save_file({k: t[k] for k in names[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    os.remove(tmp_path / "model.safetensors")
    index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                            for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    m2 = load(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  m2.state_dict().values(), strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_forward_close_to_fp32(family):
    m = _model(family)
    lay = layouts.bd3([24], 4)
    ids = torch.randint(0, 62, (48,))
    ref = m(ids, lay)
    out = m.to(torch.bfloat16)(ids, lay)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_value_model_from_policy_checkpoint(tmp_path):
    policy = _model("dream")
    policy.save_pretrained(str(tmp_path))
    vm = ValueModel.from_policy_checkpoint(str(tmp_path))
    lay = layouts.block_causal([9], 4)
    ids = torch.randint(0, 62, (9,))
    assert torch.equal(vm.trunk(ids, lay), policy(ids, lay))
    assert torch.all(vm(ids, lay) == 0)


def test_tokenizer_loads_from_a_local_directory_and_travels_with_checkpoints(tmp_path,
                                                                            monkeypatch):
    pytest.importorskip("transformers")
    from dlmkern import SFT
    from dlmkern.cli import make_tokenizer
    from dlmkern.models import load_tokenizer
    from dlmkern.trainers import SFTConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the network
    vocab = {"[UNK]": 0, "<eos>": 1, "one": 2, "plus": 3, "two": 4, "is": 5, "three": 6}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="[UNK]")
    d = tmp_path / "ckpt"
    model = _model("sdar")
    model.save_pretrained(str(d))
    fast.save_pretrained(str(d))
    tok = load_tokenizer(str(d))
    assert tok.encode("one plus two", add_special_tokens=False) == [2, 3, 4]
    assert tok.eos_token_id == 1 and tok.decode([6]) == "three"
    assert make_tokenizer(str(d)).encode("is three", add_special_tokens=False) == [5, 6]
    # a trainer's checkpoint export carries the tokenizer: model/ loads as model + tokenizer
    sft = SFT(model, tok, [{"prompt": "one plus two is", "answer": "three"}],
              SFTConfig(batch_size=2, total_steps=1, progress_bar=False,
                        output_dir=str(tmp_path / "run")))
    sft.train()
    export = tmp_path / "run" / "final" / "model"
    assert load_tokenizer(str(export)).encode("three", add_special_tokens=False) == [6]
    assert isinstance(load(str(export)), DiffusionLM)
