"""FullSampler against LLaDA's and Dream's reference generate loops, re-implemented here."""

import pytest
import torch
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import layouts
from dlmkern.sampling import FullSampler, SamplingConfig


def _model(family):
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config(family)).eval()
    with torch.no_grad():  # the mask token takes much of the mass, as in trained models: then
        m.lm_head.weight[m.config.mask_token_id] *= 6  # full and renormalised confidences differ
    return m


def _logits(m, x):
    lay = layouts.full([len(x)])
    h = m(torch.tensor(x), lay)
    if m.config.logits_shift:  # Dream: cat([logits[:1], logits[:-1]])
        h = torch.cat([h[:1], h[:-1]])
    return m.logits(h).float()


def _argmax_not_mask(m, lg):
    """The token upstream would take, except that dlmkern never emits the mask token."""
    return lg.index_fill(-1, torch.tensor([m.config.mask_token_id]), float("-inf")).argmax(-1)


@torch.no_grad()
def llada_generate(m, prompt, steps_per_block, gen_length, block_length, confidence,
                   cfg_scale=0.0):
    """LLaDA's generate (greedy, 'low_confidence' remasking, optional classifier-free guidance)
    on one prompt."""
    mask = m.config.mask_token_id
    x = list(prompt) + [mask] * gen_length
    P = len(prompt)
    for b in range(gen_length // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n_mask = sum(t == mask for t in x[lo:hi])
        base, rem = divmod(n_mask, steps_per_block)
        for i in range(steps_per_block):
            k = base + (1 if i < rem else 0)
            lg = _logits(m, x)
            if cfg_scale > 0:  # the unconditional pass: the prompt masked
                un = _logits(m, [mask] * P + x[P:])
                lg = un + (cfg_scale + 1) * (lg - un)
            p = lg.softmax(-1)  # the full distribution, mask token included
            x0 = _argmax_not_mask(m, lg)
            if confidence == "prob":
                conf = p.gather(-1, x0[:, None]).squeeze(-1)
            else:  # margin
                top2 = p.topk(2, -1).values
                conf = top2[:, 0] - top2[:, 1]
            conf = torch.where(torch.tensor(x) == mask, conf, torch.tensor(-float("inf")))
            conf[hi:] = -float("inf")
            if k > 0:
                for j in conf.topk(k).indices.tolist():
                    x[j] = int(x0[j])
    return x[P:]


@torch.no_grad()
def dream_generate(m, prompt, steps, gen_length, eps=1e-3):
    """Dream's diffusion_generate (greedy, 'maskgit_plus') on one prompt."""
    mask = m.config.mask_token_id
    x = list(prompt) + [mask] * gen_length
    ts = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        idx = [j for j, t in enumerate(x) if t == mask]
        lg = _logits(m, x)[idx]
        p = lg.softmax(-1)
        x0 = _argmax_not_mask(m, lg)
        conf = p.gather(-1, x0[:, None]).squeeze(-1)
        t, s = ts[i], ts[i + 1]
        n = int(len(idx) * (1 - s / t)) if i < steps - 1 else len(idx)
        if n > 0:
            for j in conf.topk(n).indices.tolist():
                x[idx[j]] = int(x0[j])
    return x[len(prompt):]


@pytest.mark.parametrize("confidence", ["prob", "margin"])
def test_llada_low_confidence_matches_reference(confidence):
    m = _model("llada")
    cfg = SamplingConfig(rule="static", steps=3, temperature=0, confidence=confidence)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    trajs = FullSampler(m, cfg, gen_length=12, block_length=4).generate(prompts)
    for p, t in zip(prompts, trajs, strict=True):
        assert t.token_ids == llada_generate(m, p, 3, 12, 4, confidence)
        # 4 tokens a block over 3 steps: 2, 1, 1 per step
        counts = [t.step_map.count(s) for s in range(max(t.step_map) + 1)]
        assert counts == [2, 1, 1] * 3


def test_llada_classifier_free_guidance_matches_reference():
    m = _model("llada")
    cfg = SamplingConfig(rule="static", steps=2, temperature=0, cfg_scale=1.5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    trajs = FullSampler(m, cfg, gen_length=8, block_length=4).generate(prompts)
    plain = FullSampler(m, SamplingConfig(rule="static", steps=2, temperature=0),
                        gen_length=8, block_length=4).generate(prompts)
    for p, t in zip(prompts, trajs, strict=True):
        assert t.token_ids == llada_generate(m, p, 2, 8, 4, "prob", cfg_scale=1.5)
    assert [t.token_ids for t in trajs] != [t.token_ids for t in plain]  # guidance acts
    with pytest.raises(ValueError, match="cfg_scale needs use_cache=False"):
        FullSampler(m, cfg, use_cache=True)


def test_llada_total_steps_convention():
    # LLaDA's `steps` counts every block: steps=6 over 12 tokens in blocks of 4 is 2 per block.
    m = _model("llada")
    total = SamplingConfig(rule="static", steps_total=6, temperature=0)
    per_block = SamplingConfig(rule="static", steps=2, temperature=0)
    a = FullSampler(m, total, gen_length=12, block_length=4).generate([[1, 2, 3]])[0]
    b = FullSampler(m, per_block, gen_length=12, block_length=4).generate([[1, 2, 3]])[0]
    assert a.token_ids == b.token_ids and a.step_map == b.step_map
    assert max(a.step_map) == 5  # 6 steps in all
    with pytest.raises(ValueError, match="split evenly over the 3 blocks"):
        FullSampler(m, SamplingConfig(steps_total=5), gen_length=12, block_length=4)
    with pytest.raises(ValueError, match="BlockSampler counts `steps` per block"):
        from dlmkern.sampling import BlockSampler
        BlockSampler(_model_sdar(), SamplingConfig(steps_total=6))


def _model_sdar():
    torch.manual_seed(0)
    return DiffusionLM(tiny_config("sdar")).eval()


def test_dream_maskgit_plus_matches_reference():
    m = _model("dream")
    cfg = SamplingConfig(rule="static", steps=5, temperature=0, schedule="dream")
    prompts = [[1, 2, 3], [7, 8]]
    trajs = FullSampler(m, cfg, gen_length=10, block_length=10).generate(prompts)
    for p, t in zip(prompts, trajs, strict=True):
        assert t.token_ids == dream_generate(m, p, 5, 10)
        assert all(s >= 0 for s in t.step_map)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefix_cache_gives_the_uncached_tokens_where_it_is_exact(family, temperature):
    # The prefix cache (Fast-dLLM) keeps the k / v of everything before the current block from
    # the block's start. With full attention that is an approximation in general (a prefix
    # token's deeper-layer k / v depend on the changing block), but a 1-layer model's k / v are
    # projections of the token embeddings alone: there the cached sampler must choose exactly
    # the uncached sampler's tokens at exactly the same steps (same seeds), for every rule.
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config(family, num_layers=1)).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    for rule in ("static", "dynamic"):
        cfg = SamplingConfig(rule=rule, threshold=0.3, temperature=temperature, steps=2)
        runs = [FullSampler(m, cfg, gen_length=8, block_length=4, use_cache=cache).generate(
            prompts, n_samples=2, seed=3) for cache in (False, True)]
        for a, b in zip(*runs, strict=True):
            assert a.token_ids == b.token_ids and a.step_map == b.step_map, (rule, a, b)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                       atol=1e-5, rtol=1e-5)


def test_prefix_cache_mode_runs_and_fills_every_position():
    for family in ("llada", "dream"):
        m = _model(family)
        cfg = SamplingConfig(rule="dynamic", threshold=0.5, temperature=0)
        t = FullSampler(m, cfg, gen_length=8, block_length=4, use_cache=True).generate([[1, 2]])
        assert len(t[0].token_ids) == 8 and all(s >= 0 for s in t[0].step_map)
        assert m.config.mask_token_id not in t[0].token_ids


def test_full_sampler_eos_and_bad_model():
    m = _model("llada")
    cfg = SamplingConfig(temperature=0, steps=2)
    free = FullSampler(m, cfg, gen_length=8, block_length=4).generate([[1, 2]])[0]
    eos = free.token_ids[1]
    t = FullSampler(m, cfg, gen_length=8, block_length=4, eos_token_id=eos).generate([[1, 2]])[0]
    assert t.finish_reason == "eos" and t.token_ids[-1] == eos
    assert eos not in t.token_ids[:-1]
    with pytest.raises(ValueError, match="full-attention"):
        FullSampler(DiffusionLM(tiny_config("sdar")))
