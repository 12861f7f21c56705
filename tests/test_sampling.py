"""Block sampler and unmasking rules (SPEC 3)."""

from collections import Counter

import pytest
import torch
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import layouts
from dlmkern.sampling import BlockSampler, SamplingConfig, choose, sample_tokens, transfer_schedule

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [3]]


def _model(block_size=4, seed=0):
    torch.manual_seed(seed)
    return DiffusionLM(tiny_config("sdar", block_size=block_size)).eval()


@pytest.mark.parametrize("block_size", [1, 4, 8])
@pytest.mark.parametrize("rule", ["static", "dynamic", "entropy_bounded", "sequential"])
def test_cached_sampler_equals_recomputing_sampler(block_size, rule):
    m = _model(block_size)
    cfg = SamplingConfig(rule=rule, steps=3, temperature=0, threshold=0.05, entropy_bound=8.0)
    a = BlockSampler(m, cfg, max_new_tokens=13).generate(PROMPTS)
    b = BlockSampler(m, cfg, max_new_tokens=13, use_cache=False).generate(PROMPTS)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.step_map == y.step_map
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


@torch.no_grad()
def _reference_generate(model, prompt, cfg, max_new, eos=None):
    """Independent reference: one sequence, greedy, the whole sequence recomputed every step,
    the rule applied with `choose` to the masked positions of the current block."""
    B, mask = model.config.block_size, model.config.mask_token_id
    toks, P, limit, step = list(prompt), len(prompt), len(prompt) + max_new, 0
    step_of = {}
    lp_of = {}
    while len(toks) < limit:
        a = len(toks) // B * B
        e = min(a + B, limit)
        toks += [mask] * (e - len(toks))
        todo = list(range(max(a, P), e))
        sched = transfer_schedule(len(todo), cfg.steps)
        k = 0
        while todo:
            hidden = model(torch.tensor(toks), layouts.block_causal([e], B))
            tok, conf, lp, ent = sample_tokens(model.logits(hidden[todo]), cfg, mask, None)
            n = sched[k] if k < len(sched) else len(todo)
            for j in sorted(choose(cfg, conf, ent, n).tolist(), reverse=True):
                pos = todo.pop(j)
                toks[pos], step_of[pos], lp_of[pos] = int(tok[j]), step, float(lp[j])
            step, k = step + 1, k + 1
        if eos is not None and eos in toks[max(a, P):e]:
            toks = toks[: toks.index(eos, P) + 1]
            break
    gen = range(P, len(toks))
    return toks[P:], [step_of[i] for i in gen], [lp_of[i] for i in gen]


def test_graph_step_shapes_come_in_a_few_buckets():
    # 40 sequences finishing at different blocks: without buckets every distinct live-row count
    # would be its own graph. Padded rows live in dummy sequences and change nothing.
    m = _model(4)
    cfg = SamplingConfig(rule="static", steps=2, temperature=1.0)
    prompts = [[1 + i % 7] * (1 + i % 6) for i in range(20)]
    eager = BlockSampler(m, cfg, max_new_tokens=13, eos_token_id=5, cuda_graphs=False)
    graphs = BlockSampler(m, cfg, max_new_tokens=13, eos_token_id=5, cuda_graphs=True)
    a = eager.generate(prompts, n_samples=2, seed=3)
    b = graphs.generate(prompts, n_samples=2, seed=3)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.step_map for t in a] == [t.step_map for t in b]
    assert len({len(t.token_ids) for t in a}) > 3  # sequences did finish at different points
    g = 4 * -(-40 // 8)  # block_size * ceil(S / 8)
    assert all(n % g == 0 for n in graphs.step_shapes)
    assert len(graphs.step_shapes) <= 9


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("rule", ["static", "dynamic", "entropy_bounded", "sequential"])
@pytest.mark.parametrize("graphs", [False, True])
def test_batched_sampler_equals_a_one_sequence_reference(block_size, rule, graphs):
    """The batched, sync-free block loop (and its static-buffer CUDA-graph path, run eagerly
    here) against the per-sequence reference above: prompts of mixed lengths, EOS in a batch."""
    m = _model(block_size)
    cfg = SamplingConfig(rule=rule, steps=3, temperature=0, threshold=0.05, entropy_bound=8.0)
    eos = BlockSampler(m, cfg, max_new_tokens=11).generate([PROMPTS[1]])[0].token_ids[6]
    got = BlockSampler(m, cfg, max_new_tokens=11, eos_token_id=eos,
                       cuda_graphs=graphs).generate(PROMPTS)
    for p, t in zip(PROMPTS, got, strict=True):
        toks, steps, lps = _reference_generate(m, p, cfg, 11, eos)
        assert t.token_ids == toks and t.step_map == steps
        assert t.logprobs == pytest.approx(lps, abs=1e-5)
        assert t.finish_reason == ("eos" if toks[-1] == eos else "length")
    assert got[1].finish_reason == "eos"


def _per_block_counts(traj, prompt_len, block):
    """{block index: Counter(step -> tokens unmasked at that step)}."""
    out = {}
    for i, st in enumerate(traj.step_map):
        out.setdefault((prompt_len + i) // block, Counter())[st] += 1
    return out


def test_static_rule_unmasks_the_scheduled_count_each_step():
    m = _model(4)
    cfg = SamplingConfig(rule="static", steps=2, temperature=0)
    trajs = BlockSampler(m, cfg, max_new_tokens=14).generate(PROMPTS)
    for p, t in zip(PROMPTS, trajs, strict=True):
        assert len(t.token_ids) == 14 and all(s >= 0 for s in t.step_map)
        for b, counts in _per_block_counts(t, len(p), 4).items():
            n_masked = sum(counts.values())
            assert sorted(counts.values(), reverse=True) == \
                [c for c in transfer_schedule(n_masked, 2) if c > 0], (b, counts)
        # steps are global and increase block after block
        blocks = _per_block_counts(t, len(p), 4)
        keys = sorted(blocks)
        for b1, b2 in zip(keys, keys[1:], strict=False):
            assert max(blocks[b1]) < min(blocks[b2])


def test_sequential_rule_goes_left_to_right():
    m = _model(4)
    t = BlockSampler(m, SamplingConfig(rule="sequential", steps=4, temperature=0),
                     max_new_tokens=12).generate([[1, 2, 3, 4]])[0]
    assert t.step_map == sorted(t.step_map) and len(set(t.step_map)) == 12


def test_rules_on_hand_made_confidences():
    conf = torch.tensor([0.2, 0.95, 0.5, 0.95, 0.91])
    ent = torch.tensor([2.0, 0.1, 1.0, 0.3, 0.5])
    static = SamplingConfig(rule="static")
    assert choose(static, conf, ent, 2).tolist() == [1, 3]      # ties -> lower position
    assert choose(static, conf, ent, 3).tolist() == [1, 3, 4]
    dyn = SamplingConfig(rule="dynamic", threshold=0.9)
    assert choose(dyn, conf, ent, 1).tolist() == [1, 3, 4]      # every token above threshold
    assert choose(SamplingConfig(rule="dynamic", threshold=0.99), conf, ent, 1).tolist() == [1]
    eb = SamplingConfig(rule="entropy_bounded", entropy_bound=0.95)
    assert choose(eb, conf, ent, 1).tolist() == [1, 3, 4]       # 0.1 + 0.3 + 0.5 <= 0.95
    eb0 = SamplingConfig(rule="entropy_bounded", entropy_bound=0.0)
    assert choose(eb0, conf, ent, 1).tolist() == [1]            # at least one
    assert choose(SamplingConfig(rule="sequential"), conf, ent, 2).tolist() == [0, 1]
    assert transfer_schedule(7, 3) == [3, 2, 2] and transfer_schedule(2, 4) == [1, 1, 0, 0]


def test_mask_token_is_never_sampled():
    m = _model(4)
    with torch.no_grad():  # make the mask token by far the most likely output
        m.lm_head.weight[m.config.mask_token_id] = m.norm.weight * 50
    for temperature in (0.0, 1.0):
        cfg = SamplingConfig(temperature=temperature)
        for t in BlockSampler(m, cfg, max_new_tokens=12).generate(PROMPTS):
            assert m.config.mask_token_id not in t.token_ids


def test_sample_tokens_greedy_topk_topp():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 5.0]])  # index 4 is the mask token
    greedy = SamplingConfig(temperature=0)
    tok, conf, lp, _ = sample_tokens(logits, greedy, mask_token_id=4, uniforms=None)
    assert tok.item() == 1  # the mask (index 4) is the argmax but never produced
    p = torch.softmax(logits[0], 0)  # confidence and log-prob: the FULL distribution
    assert conf.item() == pytest.approx(p[1].item(), rel=1e-5)
    assert lp.item() == pytest.approx(p[1].log().item(), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    draw = lambda: 1.0 - torch.rand(1, generator=g)  # noqa: E731  (0, 1]
    # top-k / top-p keep only the mask (p = 0.84): the token comes from the same filters over
    # the other tokens (1 has p = 0.66 among them), its confidence is 0 (upstream's ranking)
    for cfg in (SamplingConfig(temperature=1.0, top_k=1),
                SamplingConfig(temperature=1.0, top_p=0.6)):
        outs = [sample_tokens(logits, cfg, 4, draw()) for _ in range(20)]
        assert {o[0].item() for o in outs} == {1} and all(o[1].item() == 0 for o in outs)
        assert outs[0][2].item() == pytest.approx(p[1].log().item(), rel=1e-5)
    topk2 = SamplingConfig(temperature=1.0, top_k=2)  # keeps the mask and 1: always 1
    tok, conf, _, _ = sample_tokens(logits, topk2, 4, draw())
    assert tok.item() == 1
    assert conf.item() == pytest.approx((p[1] / (p[1] + p[4])).item(), rel=1e-5)


def test_confidences_rank_on_the_full_distribution_not_the_renormalised_one():
    # Position 0: p(mask) = 0.65, best other token 0.30 (0.86 renormalised without the mask);
    # position 1: p = 0.60 for its best token and ~0 for the mask. Upstream (LLaDA's
    # low_confidence, Dream's maskgit_plus) ranks on the full distribution: position 1 first.
    probs = torch.tensor([[0.30, 0.05, 0.65], [0.60, 0.40, 1e-9]])
    logits = probs.log()
    tok, conf, _, _ = sample_tokens(logits, SamplingConfig(temperature=0), 2, None)
    assert tok.tolist() == [0, 0]
    torch.testing.assert_close(conf, torch.tensor([0.30, 0.60]))
    sel = choose(SamplingConfig(rule="static"), conf, torch.zeros(2), n_static=1)
    assert sel.tolist() == [1]  # renormalised confidences (0.86 vs 0.60) would pick 0
    renorm = probs[:, :2] / probs[:, :2].sum(-1, keepdim=True)
    assert choose(SamplingConfig(rule="static"), renorm.max(-1).values, torch.zeros(2),
                  n_static=1).tolist() == [0]
    margin = sample_tokens(logits, SamplingConfig(temperature=0, confidence="margin"), 2, None)[1]
    torch.testing.assert_close(margin, torch.tensor([0.65 - 0.30, 0.60 - 0.40]))


def test_eos_ends_the_sequence_after_its_block():
    m = _model(4)
    cfg = SamplingConfig(temperature=0)
    free = BlockSampler(m, cfg, max_new_tokens=12).generate([[1, 2, 3, 4]])[0]
    eos = free.token_ids[5]  # a token greedy decoding produces in the second block
    t = BlockSampler(m, cfg, max_new_tokens=12, eos_token_id=eos).generate([[1, 2, 3, 4]])[0]
    first = free.token_ids.index(eos)
    assert t.finish_reason == "eos"
    assert t.token_ids == free.token_ids[: first + 1]
    assert free.finish_reason == "length" and len(free.token_ids) == 12


def test_seeded_and_reproducible():
    m = _model(4)
    cfg = SamplingConfig(temperature=1.0, rule="static", steps=2)
    a = BlockSampler(m, cfg, max_new_tokens=12).generate(PROMPTS, n_samples=2, seed=3)
    b = BlockSampler(m, cfg, max_new_tokens=12).generate(PROMPTS, n_samples=2, seed=3)
    c = BlockSampler(m, cfg, max_new_tokens=12).generate(PROMPTS, n_samples=2, seed=4)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.token_ids for t in a] != [t.token_ids for t in c]
    assert len(a) == 2 * len(PROMPTS)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown unmasking rule"):
        SamplingConfig(rule="random")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SamplingConfig(steps=0)
    with pytest.raises(ValueError, match="needs a block-diffusion"):
        BlockSampler(DiffusionLM(tiny_config("llada")))


def test_prompt_tail_is_never_resampled():
    m = _model(4)
    mask = m.config.mask_token_id
    prompt = [1, 2, 3, 4, 5, mask]  # even a mask-token id inside the prompt tail stays as given
    t = BlockSampler(m, SamplingConfig(temperature=0), max_new_tokens=6).generate([prompt])[0]
    assert len(t.token_ids) == 6 and mask not in t.token_ids and all(s >= 0 for s in t.step_map)


def test_a_sequence_does_not_depend_on_its_batch():
    m = _model(4)
    cfg = SamplingConfig(temperature=1.0, rule="static", steps=2)
    s = BlockSampler(m, cfg, max_new_tokens=12)
    both = s.generate([[1, 2, 3], [4, 5, 6, 7, 8]], seeds=[11, 12])
    alone = s.generate([[4, 5, 6, 7, 8]], seeds=[12])
    assert both[1].token_ids == alone[0].token_ids
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 sequences"):
        s.generate([[1], [2]], seeds=[1])


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["static", "dynamic"])
def test_cuda_graph_sampler_equals_eager(rule):
    """On a GPU: the CUDA-graph sampler equals the eager one token for token (same kernels, same
    draws) and replays reproducibly; every block finishes."""
    torch.manual_seed(0)
    gpu = DiffusionLM(tiny_config("sdar", head_dim=64, hidden_size=128)).cuda()
    gpu = gpu.to(torch.bfloat16).eval()
    for temperature in (0.0, 1.0):
        cfg = SamplingConfig(rule=rule, steps=2, temperature=temperature, threshold=0.05)
        runs = [BlockSampler(gpu, cfg, max_new_tokens=13, cuda_graphs=g).generate(
            PROMPTS, n_samples=2, seed=1) for g in (True, False, True)]
        for a, b, c in zip(*runs, strict=True):
            assert a.token_ids == b.token_ids == c.token_ids and a.step_map == b.step_map
            assert all(s >= 0 for s in a.step_map) and len(a.token_ids) == 13
