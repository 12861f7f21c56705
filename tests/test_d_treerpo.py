"""d-TreeRPO (issue #28): tree rollouts, bottom-up values and local advantages, segments scored in
the parent's state.

The sampler's tree: siblings share their ancestors' tokens and steps exactly, and differ after
the fork. The values and local advantages equal a hand computation. The loss and gradient through
the real trainer path (tree rollout -> segment rows -> update) equal a plain-torch implementation
of the paper's loss written here (as DARE's llada_dp_actor_dtreerpo.py computes it): for every
non-root node, one forward of its parent's canvas, the tokens the node unmasked scored there, the
PPO clip at 0.4 with the node's local advantage, a k3 KL to the reference, a token mean per
segment and a mean over segments. The states are rebuilt from the leaves' records (step map,
after-EOS steps), never from dlmkern's rows or loss code. One trainer step trains; refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from dlmkern.doctor.update_checks import advantages_order_as_rewards
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import layouts
from dlmkern.rl.advantages import tree_advantages
from dlmkern.sampling import BlockSampler, FullSampler, SamplingConfig
from dlmkern.sampling.tree import TreeSpec
from dlmkern.trainers import PRESETS, DTreeRPOConfig, RLConfig, RLTrainer
from dlmkern.trainers.plan import plan_step

from .test_rl_stages import DATA, TOK, _model


def alternate(prompts, completions, **_):  # a reward spread in every tree
    return [float((i * 7 // 3) % 2) for i in range(len(completions))]


def _config(tmp_path, **over):
    """2 prompts, a depth-3 binary tree (8 leaves each) of 8 tokens in 2 blocks of 4, 4 steps per
    block: branch steps 8 // 3 = 2 and 16 // 3 = 5, both inside a block."""
    sampling = over.pop("sampling", {})
    base = dict(prompts_per_step=2, group_size=8, tree_depth=3, tree_roots=2, tree_branching=2,
                max_new_tokens=8, gen_block_length=4, total_steps=1, output_dir=str(tmp_path),
                progress_bar=False, lr=1e-3, max_grad_norm=1e9, ppo_epochs=1)
    return DTreeRPOConfig(**{**base, **over}, sampling=SamplingConfig(
        **{"rule": "static", "steps": 4, "temperature": 0.9, **sampling}))


def _canvas(t):
    return (list(t.token_ids) + list(t.after_eos_ids),
            list(t.step_map) + list(t.after_eos_steps))


# ---- the sampler's tree ------------------------------------------------------------------------


def _sampler(family, use_cache, gen):
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config(family)).eval()
    cfg = SamplingConfig(steps=4, temperature=1.0)
    if family == "sdar":  # blocks of 4 at absolute positions
        return BlockSampler(m, cfg, max_new_tokens=gen, use_cache=use_cache)
    return FullSampler(m, cfg, gen_length=gen, block_length=4, use_cache=use_cache)


@pytest.mark.parametrize("family", ["llada", "sdar"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_siblings_share_their_prefix_exactly_and_differ_after(family, use_cache):
    s = _sampler(family, use_cache, 12)
    spec = TreeSpec((3, 2), (5,))  # the fork at step 5: inside the second block
    leaves = s.generate_tree([[1, 2, 3], [4, 5]], spec, seed=7)
    assert len(leaves) == 12 and [t.tree.path for t in leaves[:6]] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    differ = 0
    for p in range(2):
        for node in range(3):
            a, b = (_canvas(leaves[p * 6 + node * 2 + k]) for k in range(2))
            # the same tokens at the same steps before the fork, at the same positions
            pre = [[(x, st) if st < 5 else None for x, st in zip(*c, strict=True)]
                   for c in (a, b)]
            assert pre[0] == pre[1]
            assert {st for st in a[1] if st < 5} == set(range(5))
            differ += a != b
    assert differ > 0  # the children drew their own uniforms after the fork
    # the root's children differ from step 0 on
    assert _canvas(leaves[0]) != _canvas(leaves[2])


def test_tree_sampling_leaves_plain_sampling_unchanged():
    torch.manual_seed(0)
    m = DiffusionLM(tiny_config("llada")).eval()
    s = FullSampler(m, SamplingConfig(steps=4, temperature=1.0), gen_length=8, block_length=4)
    a = s.generate([[1, 2, 3]], n_samples=2, seeds=[11, 12])
    b = s.generate([[1, 2, 3]], n_samples=2, seeds=[11, 12])
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert all(t.tree is None for t in a)


# ---- values and local advantages ---------------------------------------------------------------


def test_values_propagate_up_and_local_advantages_leave_the_node_out():
    # one prompt, 2 x 2 leaves with rewards 1, 0 | 1, 1: depth-1 values 0.5 and 1
    got = tree_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), (2, 2))
    want = torch.tensor([[0.5 - 1.0, 1.0 - 0.0],     # node 0: 0.5 - 1; leaf: 1 - 0
                         [0.5 - 1.0, 0.0 - 1.0],
                         [1.0 - 0.5, 1.0 - 1.0],
                         [1.0 - 0.5, 1.0 - 1.0]])
    torch.testing.assert_close(got, want)
    # three siblings: a node's advantage is against the mean of the two others
    got = tree_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0]), (3,))
    torch.testing.assert_close(got, torch.tensor([[1.0], [-0.5], [-0.5],
                                                  [-1.5], [-1.5], [3.0]]))
    # depth 3, 2 x 2 x 2: the root's children are the means of their four leaves
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    got = tree_advantages(r, (2, 2, 2))
    assert got[0].tolist() == pytest.approx([0.25 - 0.75, 0.5 - 0.0, 1.0])
    assert got[7].tolist() == pytest.approx([0.75 - 0.25, 0.5 - 1.0, -1.0])


# ---- the paper's loss, written here ------------------------------------------------------------


def _hand_advantages(rewards, factors):
    """Per (prompt, depth d, node index at depth d) the local advantage, by plain recursion."""
    L, out = math.prod(factors), {}
    for p in range(len(rewards) // L):
        def value(d, node, p=p):  # node: index among depth-d nodes of prompt p
            if d == len(factors):
                return float(rewards[p * L + node])
            k = factors[d]
            return sum(value(d + 1, node * k + c) for c in range(k)) / k
        for d in range(1, len(factors) + 1):
            k = factors[d - 1]
            for node in range(math.prod(factors[:d])):
                sib = [value(d, node // k * k + c) for c in range(k) if c != node % k]
                out[p, d, node] = value(d, node) - sum(sib) / len(sib)
    return out


def _offset(i, j):
    return 0.35 * math.sin(1.7 + 2.3 * i + 1.1 * j)


def _score(model, ids, positions, targets, block_size, temperature):
    """log softmax(logits / temperature)[target] of the plain model on one sequence."""
    x = torch.tensor(ids)
    lay = layouts.full([len(ids)]) if block_size is None else layouts.block_causal(
        [len(ids)], block_size)
    logits = model.logits(model(x, lay)[torch.tensor(positions)]).float() / temperature
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None]).squeeze(-1)


def _segment_logps(model, leaf, start, js, block_size, temperature):
    """The tokens js, scored in the parent's state: the prompt, every position unmasked before
    `start`, [MASK] elsewhere, in one forward of the whole canvas (full attention). Block
    models: per block of js, that block as the parent had it (or as it started, for a block
    the parent had not begun) after the clean blocks before it, cut after the block (the
    sampler's state when the block's first segment step ran). Returns (js in scoring order,
    their log-probs)."""
    toks, steps = _canvas(leaf)
    P, mask = len(leaf.prompt_ids), model.config.mask_token_id
    if block_size is None:
        ids = list(leaf.prompt_ids) + [x if s < start else mask
                                       for x, s in zip(toks, steps, strict=True)]
        return js, _score(model, ids, [P + j for j in js], [toks[j] for j in js], None,
                          temperature)
    order, out = [], []
    for kb in sorted({(P + j) // block_size for j in js}):
        ids = list(leaf.prompt_ids) + [
            x if s < start or (P + i) // block_size < kb else mask
            for i, (x, s) in enumerate(zip(toks, steps, strict=True))]
        mine = [j for j in js if (P + j) // block_size == kb]
        order += mine
        out.append(_score(model, ids[:(kb + 1) * block_size], [P + j for j in mine],
                          [toks[j] for j in mine], block_size, temperature))
    return order, torch.cat(out)


def d_treerpo_loss(model, leaves, rewards, spec, temperature, block_size, eps=0.4, beta=0.01):
    """For every non-root node: its parent's canvas, read from the node's LAST leaf; the tokens
    the node unmasked (steps in [b_{d-1}, b_d)) up to the EOS of the node's first leaf, scored
    there (_segment_logps): -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta (exp(ref - lp) -
    (ref - lp) - 1), a token mean per segment, a mean over segments. old / ref log-probs: lp
    plus fixed offsets."""
    L, D = spec.leaves, spec.depth
    adv = _hand_advantages(rewards, spec.factors)
    starts, ends = spec.starts, (*spec.branch_steps, 1 << 40)
    terms = []
    for p in range(len(leaves) // L):
        for d in range(1, D + 1):
            below = math.prod(spec.factors[d:])
            for node in range(math.prod(spec.factors[:d])):
                last, first = leaves[p * L + (node + 1) * below - 1], leaves[p * L + node * below]
                steps = _canvas(last)[1]
                js = [j for j, s in enumerate(steps) if starts[d - 1] <= s < ends[d - 1]
                      and j < len(first.token_ids)]
                if not js:
                    continue
                js, lp = _segment_logps(model, last, starts[d - 1], js, block_size, temperature)
                k = p * L + node * below  # the first leaf: the trainer's item of this segment
                old = lp.detach() + torch.tensor([_offset(k, j) for j in js])
                ref = lp.detach() - torch.tensor([_offset(k + 3, j) for j in js])
                a = adv[p, d, node]
                r = torch.exp(lp - old)
                pg = -torch.minimum(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)
                delta = ref - lp
                terms.append((pg + beta * (torch.exp(delta) - delta - 1)).mean())
    return torch.stack(terms).mean()


def _grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_loss_and_gradient_equal_the_papers_segment_loss(tmp_path, family):
    tr = RLTrainer(_model(family), TOK, DATA, alternate, _config(tmp_path))
    batch = tr.rollout(DATA[:2])
    c = tr.model.config
    B = c.block_size if c.block_causal else None
    spec = tr.cfg.tree_spec(B)
    assert spec == TreeSpec((2, 2, 2), (2, 5))
    assert batch.advantages.shape == (16, 3)
    advantages_order_as_rewards(batch)  # the doctor's check reads a leaf's own column
    rows, trajs, _, adv, rewards = tr._copy_items(batch.trajs, list(range(16)),
                                                  batch.advantages, batch.rewards)
    item_leaf = [batch.trajs.index(t) for t in trajs]
    (mb,) = plan_step(list(range(len(rows))), len(rows), rows, tr.cfg.reduction, 1, 0)
    prep = tr.updater.prepare(mb, rows, trajs, adv, rewards, False)
    r = prep[0].rows
    leaf = [item_leaf[i] for i in r.traj.tolist()]
    prep[0].old_logp = prep[0].old_logp + torch.tensor(
        [_offset(k, j) for k, j in zip(leaf, r.gen_index.tolist(), strict=True)])
    prep[0].ref_logp = prep[0].ref_logp - torch.tensor(
        [_offset(k + 3, j) for k, j in zip(leaf, r.gen_index.tolist(), strict=True)])
    tr.model.zero_grad(set_to_none=True)
    want_loss = d_treerpo_loss(tr.model, batch.trajs, batch.rewards.tolist(), spec, 0.9, B)
    want_loss.backward()
    want = _grads(tr.model)
    tr.model.zero_grad(set_to_none=True)
    got, step = [], tr.opt.step
    tr.opt.step = lambda: got.extend(_grads(tr.model)) or step()
    stats = tr.updater.step(mb, prep)
    assert stats["clip_frac"] > 0  # the offsets put ratios outside the clip
    assert stats["loss"] == pytest.approx(want_loss.item(), rel=1e-4, abs=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    # every segment of every node is trained exactly once: one item per node with tokens
    assert len(rows) <= 2 * (2 + 4 + 8) and len(rows) > 2 * 8


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_one_trainer_step_trains(tmp_path, family):
    tr = RLTrainer(_model(family), TOK, DATA, alternate, _config(tmp_path, ppo_epochs=2))
    before = [p.detach().clone() for p in tr.model.parameters()]
    log = tr.train_step()
    assert "skipped" not in log and math.isfinite(log["loss"]), log
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))


# ---- the preset and its refusals ---------------------------------------------------------------


def test_the_preset_is_registered_with_the_papers_defaults():
    c = PRESETS["d_treerpo"]().validate()
    assert PRESETS["d_treerpo"] is DTreeRPOConfig
    assert (c.tree_depth, c.tree_roots, c.tree_branching, c.group_size) == (2, 4, 4, 16)
    assert c.tree_spec() == TreeSpec((4, 4), (64,))  # DARE: branch points 128, 64, 0
    assert (c.eps_low, c.eps_high, c.kl_coef, c.kl_kind, c.kl_to) == (0.4, 0.4, 0.01, "k3", "ref")
    assert (c.estimator, c.advantage, c.reduction) == ("tree", "tree", "seq_mean")
    assert (c.sampling.temperature, c.sampling.steps, c.max_new_tokens) == (0.9, 16, 256)


@pytest.mark.parametrize("over, keys", [
    ({"group_size": 8}, ("group_size", "tree_roots")),
    ({"estimator": "trace"}, ("estimator", "tree_depth")),
    ({"advantage": "zscore"}, ("advantage", "tree_depth")),
    ({"tree_branching": 1}, ("tree_branching",)),
    ({"sampling": SamplingConfig(rule="dynamic", temperature=0.9)}, ("tree_depth",
                                                                    "sampling.rule")),
    ({"use_value_model": True}, ("use_value_model", "estimator")),
])
def test_settings_that_break_the_tree_are_refused_at_config_time(over, keys):
    with pytest.raises(ValueError) as e:
        DTreeRPOConfig(**over).validate()
    for k in keys:
        assert k in str(e.value)


def test_a_tree_without_the_preset_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match="estimator=tree with tree_depth=0"):
        RLConfig(estimator="tree").validate()
    with pytest.raises(ValueError, match="advantage=tree with tree_depth=0"):
        RLConfig(advantage="tree").validate()
