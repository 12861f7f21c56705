"""RL estimators (dlmkern.rl.estimators, issue #18): the registry and a new estimator through the
shared rows builder, Rows.cat / layouts.cat / packed_copies, the block models' prompt masking of
diffu_grpo, and host-only tensors. (The rows against the pre-refactor loops:
tests/test_rows_equivalence.py.)"""

from dataclasses import dataclass

import pytest
import torch
from dlmkern.ops import block_attention, layouts
from dlmkern.rl import (
    ESTIMATORS,
    Estimator,
    Rows,
    RowSpec,
    baseline_rows,
    batch_rows,
    block_rows,
    full_rows,
    get_estimator,
)
from dlmkern.rl.estimators.base import trained_copies
from dlmkern.sampling import Trajectory

M = 63
T = Trajectory([1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [0] * 7)


def test_diffu_grpo_masks_the_prompt_of_block_models():
    # The prompt mask applies to the clean stream's prompt AND to the prompt tail inside the first
    # noisy block (prompt 5, block 4: position 4 is in both), the same mask in both.
    t = T
    P = len(t.prompt_ids)
    pm = torch.rand(P, generator=torch.Generator().manual_seed(1)) < 0.5  # the draw it makes
    assert pm.any() and not pm.all() and pm[4]
    rows = baseline_rows("diffu_grpo", [t], M, torch.Generator().manual_seed(1), 4,
                         prompt_mask_ratio=0.5)
    lay = rows.layout
    prompt = torch.tensor(t.prompt_ids)
    expect = torch.where(pm, M, prompt)
    clean_prompt = (lay.stream == 0) & (lay.position_ids < P)
    assert rows.input_ids[clean_prompt].tolist() == expect.tolist()
    tail = (lay.stream == 1) & (lay.position_ids < P)
    assert lay.position_ids[tail].tolist() == [4]
    assert rows.input_ids[tail].tolist() == expect[4:].tolist()
    # every response token trained, from an all-[MASK] response
    assert sorted(rows.gen_index.tolist()) == list(range(7))
    assert torch.all(rows.input_ids[rows.train_rows] == M)
    # ratio 0: nothing masked in the prompt
    rows0 = baseline_rows("diffu_grpo", [t], M, torch.Generator().manual_seed(1), 4,
                          prompt_mask_ratio=0.0)
    assert rows0.input_ids[:P].tolist() == t.prompt_ids


def test_registry():
    assert list(ESTIMATORS) == ["trace", "random_mask", "coupled", "diffu_grpo", "elbo_mc",
                                "quadrature", "blockwise", "stratified", "block_stratified",
                                "tree", "mdpo"]
    assert "coupled" in ESTIMATORS and "nope" not in ESTIMATORS
    for name, cls in ESTIMATORS.items():
        est = get_estimator(name)
        assert isinstance(est, cls) and est.name == name
        assert est.trace_steps == (name == "trace")
        assert est.random == (name not in ("trace", "tree", "mdpo"))
    assert not get_estimator("diffu_grpo", prompt_mask_ratio=0.0).random
    with pytest.raises(ValueError, match="unknown estimator 'nope'; known: trace, random_mask, "
                                         "coupled, diffu_grpo, elbo_mc, quadrature, blockwise, "
                                         "stratified, block_stratified, tree, mdpo"):
        get_estimator("nope")
    with pytest.raises(ValueError, match="unknown estimator"):
        baseline_rows("nope", [T], M, torch.Generator(), 4)
    with pytest.raises(ValueError, match="pass a torch.Generator"):
        get_estimator("coupled").rows(T, RowSpec(M, 4))


@dataclass(frozen=True)
class EveryOther(Estimator):
    """A new estimator is one file like this plus one registry line: copy 0 trains the even
    generated tokens, copy 1 the odd ones."""

    name = "every_other"
    trace_steps = False
    random = False

    def copies(self, traj, spec, gen):
        even = torch.arange(len(traj.token_ids)) % 2 == 0
        return trained_copies([even, ~even])


def test_a_registered_estimator_runs_through_the_shared_builder(monkeypatch):
    monkeypatch.setitem(ESTIMATORS, "every_other", EveryOther)
    t = T
    rows = baseline_rows("every_other", [t, t], M, None, block_size=4)
    assert rows.num_trajectories == 2 and rows.traj.tolist() == [0] * 7 + [1] * 7
    one = rows.input_ids[:rows.num_tokens // 2].tolist()
    assert one == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16,
                   5, M, 11, M, 13, M, 15, M,    # copy 1 (step 0): blocks 1, 2
                   5, 10, M, 12, M, 14, M, 16]   # copy 2 (step 1)
    assert rows.step.tolist() == [0, 0, 0, 0, 1, 1, 1] * 2
    assert rows.gen_index.tolist() == [0, 2, 4, 6, 1, 3, 5] * 2
    full = get_estimator("every_other").rows(t, RowSpec(M, None))
    assert full.layout.full and full.layout.cu_seqlens.tolist() == [0, 12, 24]
    assert full.input_ids.tolist() == [1, 2, 3, 4, 5, M, 11, M, 13, M, 15, M,
                                       1, 2, 3, 4, 5, 10, M, 12, M, 14, M, 16]
    assert full.train_rows.tolist() == [5, 7, 9, 11, 18, 20, 22]


def test_copies_hold_only_the_blocks_they_mask():
    class FirstToken(EveryOther):
        def copies(self, traj, spec, gen):
            return trained_copies([torch.arange(len(traj.token_ids)) == 0])

    t = T
    rows = FirstToken().rows(t, RowSpec(M, 4))
    # block 1 only (prompt tail 5 unmasked); block 2 is not repeated
    assert rows.input_ids.tolist()[12:] == [5, M, 11, 12]
    assert rows.layout.position_ids.tolist()[12:] == [4, 5, 6, 7]
    assert rows.train_rows.tolist() == [13]


def _same_rows(a, b):
    for f in ("input_ids", "train_rows", "targets", "traj", "step", "gen_index"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for f in ("block", "stream", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(a.layout, f), getattr(b.layout, f)), f
    assert (a.layout.max_seqlen, a.layout.full, a.num_trajectories) == (
        b.layout.max_seqlen, b.layout.full, b.num_trajectories)
    assert (a.copy_weight is None) == (b.copy_weight is None)
    assert a.copy_weight is None or torch.equal(a.copy_weight, b.copy_weight)


def _trajs():
    return [Trajectory([1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [1, 0, 0, 3, 2, 2, 3]),
            Trajectory([7, 8], [], []),
            Trajectory([9, 10, 11, 12], [20, 21, 22, 23, 24], [4, 3, 2, 1, 0]),
            Trajectory([1], [30, 31], [0, 0])]


@pytest.mark.parametrize("block_size", [4, None])
def test_rows_cat_equals_rows_built_together(block_size):
    trajs = _trajs()
    build = {"trace": lambda ts: (block_rows(ts, block_size, M) if block_size
                                  else full_rows(ts, M, 1)),
             "coupled": lambda ts: baseline_rows(
                 "coupled", ts, M, [torch.Generator().manual_seed(len(t.prompt_ids)) for t in ts],
                 block_size)}
    for make in build.values():
        whole = make(trajs)
        assert whole.num_trajectories == 4
        _same_rows(Rows.cat([make([t]) for t in trajs]), whole)
        _same_rows(Rows.cat([make(trajs[:1]), make(trajs[1:])]), whole)
        assert int(whole.input_ids[whole.train_rows].ne(M).sum()) == 0
    with pytest.raises(ValueError, match="no rows"):
        Rows.cat([])
    empty = block_rows([], 4, M) if block_size else full_rows([], M)
    assert empty.num_tokens == 0 and empty.num_trajectories == 0
    assert empty.layout.full == (block_size is None)


def test_layouts_cat_is_validated_once():
    a = layouts.packed_rounds([5, 2], [12, 9], 4, [[2, 1], [1, 3, 1]])
    b = layouts.tracerl([3], [10], 4)
    both = layouts.cat([a, b])
    assert both.cu_seqlens.tolist() == [0, *(a.cu_seqlens[1:].tolist()),
                                        a.num_tokens + b.num_tokens]
    assert both.max_seqlen == max(a.max_seqlen, b.max_seqlen)
    assert torch.equal(both.position_ids, torch.cat([a.position_ids, b.position_ids]))
    full = layouts.cat([layouts.full([3, 4]), layouts.full([5])])
    assert full.full and full.cu_seqlens.tolist() == layouts.full([3, 4, 5]).cu_seqlens.tolist()
    with pytest.raises(ValueError, match="cannot mix"):
        layouts.cat([a, layouts.full([3])])
    with pytest.raises(ValueError, match="no layouts"):
        layouts.cat([])
    # trusted: block_attention skips its host-side value checks on the concatenation
    checks = torch.ops.dlmkern._attention_value_checks
    q = torch.randn(both.num_tokens, 2, 16)
    before = checks()
    out, _ = block_attention(q, q, q, both)
    assert checks() == before
    ref, _ = block_attention(q, q, q, layouts.Layout(both.block.clone(), both.stream.clone(),
                                                     both.position_ids, both.cu_seqlens.clone(),
                                                     both.max_seqlen))
    torch.testing.assert_close(out, ref)


def test_packed_copies_checks_its_blocks():
    with pytest.raises(ValueError, match="increasing"):
        layouts.packed_copies([9], 4, [[[1, 0]]])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        layouts.packed_copies([9], 4, [[[3]]])
    lay = layouts.packed_copies([9], 4, [[[0, 2], [], [1]]])
    assert lay.stream.tolist() == [0] * 9 + [1] * 5 + [3] * 4
    assert layouts.response_block_span(5, 12, 4) == (1, 2)
    assert layouts.response_block_span(8, 12, 4) == (2, 1)
    assert layouts.response_block_span(8, 8, 4) == (2, 0)


@pytest.mark.parametrize("name", ["trace", "random_mask", "coupled", "diffu_grpo", "elbo_mc",
                                  "quadrature"])
@pytest.mark.parametrize("block_size", [4, None])
def test_rows_make_no_tensor_on_the_default_device(name, block_size):
    def make():
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        return batch_rows(get_estimator(name), _trajs(), RowSpec(M, block_size), gens)

    want = make()
    with torch.device("meta"):
        got = make()
    _same_rows(got, want)
