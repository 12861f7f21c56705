"""The vectorised rows (estimator registry + one shared builder) against the pre-refactor
per-token loops kept in tests/rows_reference.py (issue #18), on many random trajectories: prompts
ending mid-block and on a block boundary, empty responses, shrinkage 1/2/3, block sizes 1/3/4 and
full attention."""

import random

import pytest
import torch
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import layouts, masked_logprobs
from dlmkern.rl import baseline_rows, block_rows, full_rows, response_blocks, shrink, trace_rounds
from dlmkern.sampling import Trajectory

from . import rows_reference as ref

M = 63


def _trajs(seed, count=24, block_size=4):
    rng = random.Random(seed)
    out = []
    for k in range(count):
        P = rng.choice([0, 1, 2, 5, 7, 11, block_size, 2 * block_size, 3 * block_size])
        n = 0 if k % 7 == 3 else rng.randint(1, 14)
        out.append(Trajectory([rng.randrange(60) for _ in range(P)],
                              [rng.randrange(60) for _ in range(n)],
                              [rng.randrange(6) + (i // 3) * rng.randint(0, 2) for i in range(n)]))
    return out


def _same_layout(a, b):
    for f in ("block", "stream", "position_ids", "cu_seqlens"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert (a.max_seqlen, a.full) == (b.max_seqlen, b.full)


def _same(new, old):
    for f in ("input_ids", "train_rows", "targets", "traj", "step", "gen_index"):
        x, y = getattr(new, f), getattr(old, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert torch.equal(new.input_ids[new.train_rows], old.input_ids[old.train_rows])
    _same_layout(new.layout, old.layout)


@pytest.mark.parametrize("seed", range(3))
def test_trace_ranks_match_the_reference_shrink_and_rounds(seed):
    def fields(rounds):
        return [[r.__dict__ for r in g] for g in rounds]

    for t in _trajs(seed, block_size=3):
        P, n = len(t.prompt_ids), len(t.token_ids)
        assert response_blocks(P, n, 3) == ref.response_blocks(P, n, 3)
        for groups in (response_blocks(P, n, 3), [list(range(n))]):
            for s in (1, 2, 3):
                steps = shrink(t.step_map, groups, s)
                assert steps == ref.shrink(t.step_map, groups, s)
                assert fields(trace_rounds(steps, groups)) == fields(
                    ref.trace_rounds(steps, groups))


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("shrinkage", [1, 2, 3])
def test_block_rows_equal_the_loops(block_size, shrinkage):
    trajs = _trajs(block_size * 10 + shrinkage, block_size=block_size)
    _same(block_rows(trajs, block_size, M, shrinkage),
          ref.block_rows(trajs, block_size, M, shrinkage))
    for t in trajs:  # one at a time too (the empty responses alone)
        _same(block_rows([t], block_size, M, shrinkage), ref.block_rows([t], block_size, M,
                                                                         shrinkage))
    _same(block_rows([], block_size, M), ref.block_rows([], block_size, M))


@pytest.mark.parametrize("shrinkage", [1, 2, 3, 8])
def test_full_rows_equal_the_loops(shrinkage):
    trajs = _trajs(shrinkage)
    _same(full_rows(trajs, M, shrinkage), ref.full_rows(trajs, M, shrinkage))
    _same(full_rows([], M), ref.full_rows([], M))


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_layout_builders_equal_the_loops(block_size):
    trajs = _trajs(block_size, block_size=block_size)
    P = [len(t.prompt_ids) for t in trajs]
    L = [len(t.prompt_ids) + len(t.token_ids) for t in trajs]
    rng = random.Random(block_size)
    rounds = [[rng.randint(0, 3) for _ in response_blocks(p, n - p, block_size)]
              for p, n in zip(P, L, strict=True)]
    _same_layout(layouts.packed_rounds(P, L, block_size, rounds),
                 ref.packed_rounds(P, L, block_size, rounds))
    _same_layout(layouts.tracerl(P, L, block_size), ref.tracerl(P, L, block_size))


def _gens(seed, n, shared):
    if shared:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


@pytest.mark.parametrize("kind", ["random_mask", "coupled", "diffu_grpo"])
@pytest.mark.parametrize("shared", [True, False])
def test_full_attention_baselines_equal_the_loops(kind, shared):
    trajs = _trajs(5)
    _same(baseline_rows(kind, trajs, M, _gens(1, len(trajs), shared)),
          ref.baseline_rows(kind, trajs, M, _gens(1, len(trajs), shared)))


def _trained(rows):
    return sorted(zip(rows.traj.tolist(), rows.gen_index.tolist(), rows.step.tolist(),
                      rows.targets.tolist(), strict=True))


def _context(rows):
    """Per trained token (traj, gen_index, step): its position and token, and the (position,
    token, clean?) of every key it attends to - what its log-prob depends on."""
    lay, ids = rows.layout, rows.input_ids
    vis = layouts.dense_mask(lay)
    out = {}
    for k, r in enumerate(rows.train_rows.tolist()):
        keys = vis[r].nonzero().squeeze(1)
        out[(int(rows.traj[k]), int(rows.gen_index[k]), int(rows.step[k]))] = (
            int(lay.position_ids[r]), int(ids[r]),
            sorted(zip(lay.position_ids[keys].tolist(), ids[keys].tolist(),
                       (lay.stream[keys] == 0).tolist(), strict=True)))
    return out


@pytest.mark.parametrize("kind", ["random_mask", "coupled", "diffu_grpo"])
@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("shared", [True, False])
def test_block_baselines_train_the_same_tokens_from_the_same_inputs(kind, block_size, shared):
    # Copies no longer repeat the blocks they mask nothing in: the trained tokens and everything
    # their log-probs depend on are unchanged, the rows only get shorter. (diffu_grpo with prompt
    # masking differs on purpose: test_estimators.py covers it.)
    trajs = _trajs(block_size + 7, block_size=block_size)
    kw = {"prompt_mask_ratio": 0.0} if kind == "diffu_grpo" else {}
    new = baseline_rows(kind, trajs, M, _gens(2, len(trajs), shared), block_size, **kw)
    old = ref.baseline_rows(kind, trajs, M, _gens(2, len(trajs), shared), block_size, **kw)
    assert _trained(new) == _trained(old)
    assert _context(new) == _context(old)
    assert new.num_tokens <= old.num_tokens and new.layout.num_tokens == new.num_tokens
    _same_layout(layouts.cat([new.layout]), new.layout)


@pytest.mark.parametrize("kind", ["random_mask", "coupled"])
def test_block_baselines_give_the_same_logprobs(kind):
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config("sdar")).eval()
    trajs = _trajs(11, count=6)
    out = {}
    for name, rows in (("new", baseline_rows(kind, trajs, M, _gens(3, 6, False), 4)),
                       ("old", ref.baseline_rows(kind, trajs, M, _gens(3, 6, False), 4))):
        targets = torch.zeros(rows.num_tokens, dtype=torch.long)
        targets[rows.train_rows] = rows.targets
        with torch.no_grad():
            lp = masked_logprobs(m(rows.input_ids, rows.layout), m.lm_head.weight, targets,
                                 rows=rows.train_rows)
        out[name] = dict(zip(zip(rows.traj.tolist(), rows.gen_index.tolist(), strict=True),
                             lp.tolist(), strict=True))
    assert out["new"].keys() == out["old"].keys()
    for k, v in out["new"].items():
        assert v == pytest.approx(out["old"][k], abs=1e-5)
