"""What the sampler saw after a completion's EOS (SPEC 4.1): the rest of the EOS block (block
models) or of the whole canvas (full attention) stays in the trace rows as context
(Trajectory.after_eos_ids / after_eos_steps), so the trainer's old log-probs reproduce the
sampler's on completions that end with EOS too. Before, rows held prompt + completion only and
every token of an EOS-ended completion was trained in a context the sampler never had."""

import dataclasses

import pytest
import torch
from dlmkern import TraceRL
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import layouts
from dlmkern.rl import baseline_rows, block_rows, full_rows
from dlmkern.sampling import NOT_DECODED, BlockSampler, FullSampler, SamplingConfig, Trajectory

from .rl_helpers import rl_config

TOK = CharTokenizer()
EOS, M = TOK.eos_token_id, TOK.mask_token_id
# prompts of 4 and 5 tokens: with blocks of 4 the response starts on a boundary and mid-block
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(20) for b in range(10)]
PROMPTS = [TOK.encode(p) for p in ("9+8=", "10+1=", "7+3=", "12+5=")]
HOT = SamplingConfig(temperature=1.0, steps=2)
DYNAMIC = SamplingConfig(temperature=1.0, rule="dynamic", threshold=0.3)


def _eos_model(family, seed=0):
    """A tiny model that emits EOS often, not always first: EOS gets the output row of the two
    tokens the model likes best (mean logit over a canvas), so it competes with both."""
    torch.manual_seed(seed)
    model = DiffusionLM(tiny_config(family, vocab_size=TOK.vocab_size, mask_token_id=M)).eval()
    ids = PROMPTS[0] + [M] * 8
    lay = layouts.block_causal([len(ids)], 4) if family == "sdar" else layouts.full([len(ids)])
    with torch.no_grad():
        mean = model.logits(model(torch.tensor(ids), lay)).mean(0)
        mean[[EOS, M]] = float("-inf")
        a, b = mean.topk(2).indices.tolist()
        w = model.lm_head.weight
        w[EOS] = w[a] + 0.5 * w[b]
    return model


def _parity(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def _without_after_eos(t):
    return dataclasses.replace(t, after_eos_ids=[], after_eos_steps=[])


# ---- the samplers keep what they had after EOS -----------------------------------------------


@pytest.mark.parametrize("mode", ["cached", "uncached", "graph_buffers"])
def test_block_sampler_keeps_the_rest_of_the_eos_block(mode):
    # 10 new tokens: the last block is cut by max_new_tokens (prompt 4: positions 12..13 of
    # block [12, 16); prompt 5: 13..14): an EOS there keeps only what the sampler had, to limit
    m, B, new = _eos_model("sdar"), 4, 10
    kw = dict(max_new_tokens=new, use_cache=mode != "uncached",
              cuda_graphs=True if mode == "graph_buffers" else None)
    seen = 0
    for seed, cfg in ((0, HOT), (1, HOT), (2, DYNAMIC)):
        trajs = BlockSampler(m, cfg, eos_token_id=EOS, **kw).generate(PROMPTS, n_samples=4,
                                                                      seed=seed)
        # the same draws without EOS run past it: what the sampler had in the EOS block
        free = BlockSampler(m, cfg, **kw).generate(PROMPTS, n_samples=4, seed=seed)
        for t, f in zip(trajs, free, strict=True):
            P, n, A = len(t.prompt_ids), len(t.token_ids), len(t.after_eos_ids)
            assert len(t.after_eos_steps) == A
            if t.finish_reason == "length":
                assert A == 0 and n == new
                continue
            seen += A > 0
            assert t.token_ids[-1] == EOS and EOS not in t.token_ids[:-1]
            end = min((P + n - 1) // B * B + B, P + new)  # the EOS block's end, or the limit
            assert P + n + A == end  # never crosses the EOS block
            assert t.token_ids + t.after_eos_ids == f.token_ids[:n + A]
            assert t.step_map + t.after_eos_steps == f.step_map[:n + A]
            assert t.logprobs == f.logprobs[:n]
    assert seen


@pytest.mark.parametrize(("family", "mode"), [("llada", "uncached"), ("llada", "cached"),
                                             ("llada", "cfg"), ("dream", "uncached"),
                                             ("dream", "cached")])
def test_full_sampler_keeps_the_rest_of_the_canvas(family, mode):
    m, gen = _eos_model(family), 10
    guidance = 0.5 if mode == "cfg" else 0.0
    kw = dict(gen_length=gen, block_length=4, use_cache=mode == "cached")
    seen = 0
    for seed, rule in ((0, HOT), (1, DYNAMIC)):
        cfg = dataclasses.replace(rule, cfg_scale=guidance)
        trajs = FullSampler(m, cfg, eos_token_id=EOS, **kw).generate(PROMPTS, n_samples=4,
                                                                     seed=seed)
        free = FullSampler(m, cfg, **kw).generate(PROMPTS, n_samples=4, seed=seed)
        for t, f in zip(trajs, free, strict=True):
            n, A = len(t.token_ids), len(t.after_eos_ids)
            if t.finish_reason == "length":
                assert A == 0 and t.after_eos_steps == [] and n == gen
                continue
            assert n + A == gen  # the whole canvas
            hi = min(-(-n // 4) * 4, gen)  # the EOS block's end
            seen += hi < gen
            decoded = hi - n
            assert t.token_ids + t.after_eos_ids[:decoded] == f.token_ids[:hi]
            assert t.step_map + t.after_eos_steps[:decoded] == f.step_map[:hi]
            assert t.after_eos_ids[decoded:] == [M] * (gen - hi)  # never generated
            assert t.after_eos_steps[decoded:] == [NOT_DECODED] * (gen - hi)
    assert seen


# ---- rows: the context is placed, masked as the sampler had it, never trained -----------------


def _noisy(rows, stream, positions):
    """Block rows: the input ids of `stream` (0: clean, k: noisy copy k) at `positions`."""
    lay = rows.layout
    at = [int(((lay.stream == stream) & (lay.position_ids == p)).nonzero()) for p in positions]
    return rows.input_ids[at].tolist()


def test_block_rows_hold_the_eos_block_context():
    # prompt 2, block 4: block 0 = prompt + tokens 0..1 (steps 0, 1); block 1 = EOS (step 3) then
    # the after-EOS context decoded at steps 2, 3, 4. Round 1 of block 1 is step 3: the sampler
    # had the step-2 token and masks at the step-3 and step-4 positions.
    t = Trajectory([1, 2], [10, 11, EOS], [0, 1, 3], [0.0] * 3, "eos",
                   after_eos_ids=[20, 21, 22], after_eos_steps=[2, 3, 4])
    rows, bare = block_rows([t], 4, M), block_rows([_without_after_eos(t)], 4, M)
    assert rows.num_tokens == bare.num_tokens + 3 + 3  # clean stream and copy 1's block 1
    for f in ("targets", "traj", "step", "gen_index"):
        assert torch.equal(getattr(rows, f), getattr(bare, f)), f
    assert _noisy(rows, 1, range(4, 8)) == [M, 20, M, M]
    assert _noisy(bare, 1, range(4, 5)) == [M]
    # trained rows read the same inputs except what the context adds
    assert rows.input_ids[rows.train_rows].tolist() == bare.input_ids[bare.train_rows].tolist()


def test_block_rows_refuse_a_context_past_the_eos_block():
    t = Trajectory([1, 2], [10, EOS], [0, 1], [0.0] * 2, "eos",
                   after_eos_ids=[20, 21, 22], after_eos_steps=[2, 3, 4])
    with pytest.raises(ValueError, match="crosses the EOS block"):
        block_rows([t], 4, M)


@pytest.mark.parametrize("shrinkage", [1, 2])
def test_full_rows_cover_the_whole_canvas(shrinkage):
    # token 10 decoded at step 2, EOS at step 0; after EOS one token decoded at step 1 and one
    # position never decoded (its block was never generated)
    t = Trajectory([1, 2], [10, EOS], [2, 0], [0.0] * 2, "eos",
                   after_eos_ids=[20, M], after_eos_steps=[1, NOT_DECODED])
    rows, bare = full_rows([t], M, shrinkage), full_rows([_without_after_eos(t)], M, shrinkage)
    for f in ("targets", "traj", "step", "gen_index"):
        assert torch.equal(getattr(rows, f), getattr(bare, f)), f
    if shrinkage == 1:  # rounds at steps 0 and 2: at step 2 the sampler had the step-1 token
        want = [[1, 2, M, M, M, M], [1, 2, M, EOS, 20, M]]
    else:  # one round from step 0 (steps 0..2 merged): everything after the prompt masked
        want = [[1, 2, M, M, M, M]]
    assert rows.layout.cu_seqlens.tolist() == [6 * k for k in range(len(want) + 1)]
    cu = rows.layout.cu_seqlens.tolist()
    assert [rows.input_ids[a:b].tolist() for a, b in zip(cu, cu[1:], strict=False)] == want
    assert bare.num_tokens == 4 * len(want)


def test_rows_of_length_ended_and_after_eos_free_trajectories_are_unchanged():
    t = Trajectory([1, 2, 3], [10, 11, 12, 13, 14], [0, 2, 1, 3, 3])
    for a, b in ((block_rows([t], 4, M), block_rows([_without_after_eos(t)], 4, M)),
                 (full_rows([t], M, 1), full_rows([_without_after_eos(t)], M, 1))):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.train_rows, b.train_rows)


@pytest.mark.parametrize("kind", ["random_mask", "coupled", "diffu_grpo"])
@pytest.mark.parametrize("block_size", [4, None])
def test_baselines_stay_on_prompt_and_completion(kind, block_size):
    # their masks do not reproduce a sampler step: the after-EOS context is left out
    t = Trajectory([1, 2], [10, 11, EOS], [0, 1, 3], [0.0] * 3, "eos",
                   after_eos_ids=[20, 21, 22], after_eos_steps=[2, 3, 4])
    a, b = (baseline_rows(kind, [x], M, torch.Generator().manual_seed(0), block_size)
            for x in (t, _without_after_eos(t)))
    for f in ("input_ids", "train_rows", "targets", "step", "gen_index"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


# ---- the trainer: sampler and trainer log-probs agree with EOS on ----------------------------


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
def test_sampler_logp_gap_is_zero_on_completions_that_end_with_eos(tmp_path, family):
    # before: 2.4e-3 (sdar), 1.2e-2 (llada), 1.5e-2 (dream) here; now ~1e-7 (fp32 noise)
    cfg = rl_config(prompts_per_step=2, group_size=4, max_new_tokens=10, gen_block_length=4,
                    shrinkage=1, steps_per_block=2, temperature=1.0, total_steps=1,
                    output_dir=str(tmp_path), progress_bar=False, lr=1e-3, pass_rate_low=0.0,
                    pass_rate_high=1.0)
    tr = TraceRL(_eos_model(family), TOK, DATA[96:104], _parity, cfg)
    sampled = []
    rollout = tr.rollout

    def recording(*args, **kw):
        batch = rollout(*args, **kw)
        sampled.extend(batch.trajs)
        return batch

    tr.rollout = recording
    log = tr.train_step()
    assert any(t.finish_reason == "eos" and t.after_eos_ids for t in sampled), [
        (t.token_ids, t.finish_reason) for t in sampled]
    assert log["sampler_logp_gap"] < 1e-4, log
