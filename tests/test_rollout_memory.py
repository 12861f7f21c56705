"""Rollout memory (issue 25): chunked rollouts give the same tokens as one batch, each chunk's KV
cache is freed before the next (peak measured with torch's MemTracker), and the rule step keeps
at most two [rows, vocab] fp32 buffers of temporaries."""

import pytest
import torch
from dlmkern.doctor import e2e_checks as e2e
from dlmkern.plan import StageTracker
from dlmkern.sampling import BlockSampler, FullSampler, SamplingConfig, rules, sample_tokens
from torch.distributed._tools.mem_tracker import MemTracker

PROMPTS = [e2e.TOK.encode(r["prompt"]) for r in e2e.DATA[:3]]


def _run(kind, max_seqs, **cfg):
    family = {"block": "sdar", "graphs": "sdar", "llada": "llada", "dream": "dream"}[kind]
    torch.manual_seed(0)
    model = e2e.model("cpu", family)
    sc = SamplingConfig(max_seqs=max_seqs, **cfg)
    if family == "sdar":
        s = BlockSampler(model, sc, max_new_tokens=10, eos_token_id=e2e.TOK.eos_token_id,
                         cuda_graphs=True if kind == "graphs" else None)
    else:
        s = FullSampler(model, sc, gen_length=8, block_length=4,
                        eos_token_id=e2e.TOK.eos_token_id)
    return s.generate(PROMPTS, n_samples=3, seed=11)


@pytest.mark.parametrize("kind", ["block", "graphs", "llada", "dream"])
@pytest.mark.parametrize("cfg", [dict(temperature=1.0, steps=2),
                                 dict(temperature=0.0, rule="dynamic", threshold=0.3),
                                 dict(temperature=0.8, top_k=4, top_p=0.9, steps=3)])
def test_chunked_rollout_equals_one_batch(kind, cfg):
    if kind == "dream":
        cfg = dict(cfg, schedule="dream") if cfg.get("rule", "static") == "static" else cfg
    whole = _run(kind, 0, **cfg)
    for max_seqs in (1, 2, 4):
        chunked = _run(kind, max_seqs, **cfg)
        assert [(t.token_ids, t.step_map, t.after_eos_ids, t.finish_reason) for t in chunked] \
            == [(t.token_ids, t.step_map, t.after_eos_ids, t.finish_reason) for t in whole]
        for a, b in zip(chunked, whole, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6)


def _rollout_peak(max_seqs: int) -> int:
    model = e2e.model("cpu")
    sampler = BlockSampler(model, SamplingConfig(temperature=1.0, steps=2, max_seqs=max_seqs),
                           max_new_tokens=24)
    mt = StageTracker()  # torch's MemTracker, letting the model run once per step
    mt.track_external(model)
    with mt:
        sampler.generate(PROMPTS * 4, n_samples=2, seed=3)
    snap = mt.get_tracker_snapshot("peak")[torch.device("cpu")]
    return snap["Total"] - snap["Parameter"] - snap["Buffer"]


def test_chunks_free_their_cache_before_the_next():
    # 24 sequences: one cache of 24 rows vs caches of 4 rows one after the other
    whole, chunked = _rollout_peak(0), _rollout_peak(4)
    cfg = e2e.model("cpu").config
    row = 2 * cfg.num_layers * (max(len(p) for p in PROMPTS) + 24 + cfg.block_size) * \
        cfg.num_kv_heads * cfg.head_dim * 4  # one sequence's k and v, fp32
    assert whole - chunked >= 0.8 * (24 - 4) * row, (whole, chunked, row)


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0),
                                 SamplingConfig(temperature=0.7, top_k=50, top_p=0.9),
                                 SamplingConfig(temperature=0.0, confidence="margin"),
                                 SamplingConfig(temperature=1.0, confidence="neg_entropy")])
@pytest.mark.parametrize("n", [1, 7, 256])
def test_rule_step_keeps_at_most_two_vocabulary_buffers(cfg, n):
    V = 4096
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, V, generator=g).to(torch.bfloat16)
    u = 1.0 - torch.rand(n, generator=g)
    mt = MemTracker()
    mt.track_external(logits, u)
    with mt:
        out = sample_tokens(logits, cfg, 5, u)
    peak = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    temporaries = peak - logits.nbytes - u.nbytes
    # two [n, V] buffers; a step of fewer rows than its chunks cannot be cut finer than one row
    rows = max(2 * n, rules._PEAK_BUFFERS)
    assert temporaries <= rows * V * 4 + 4096, temporaries / (n * V * 4)
    # the chunks compute what one pass over all rows computes
    one = rules._PEAK_BUFFERS
    try:
        rules._PEAK_BUFFERS = rules._RULE_BUFFERS  # a single chunk
        ref = sample_tokens(logits, cfg, 5, u)
    finally:
        rules._PEAK_BUFFERS = one
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)


def test_max_seqs_is_checked():
    with pytest.raises(ValueError, match="max_seqs"):
        SamplingConfig(max_seqs=-1)
