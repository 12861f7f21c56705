"""d-TreeRPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.sampling.rules import SamplingConfig
from dlmkern.trainers.rl_config import RLConfig, preset_sampling
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class DTreeRPOConfig(RLConfig):
    """d-TreeRPO ("d-TreeRPO: Towards More Reliable Policy Optimization for Diffusion Language
    Models", Pan et al. 2025, arXiv 2512.09675; code github.com/THU-BPM/d-TreeRPO; DARE's
    dtreerpo_algos.py, dtreerpo_llada_rollout.py, llada_dp_actor_dtreerpo.py). Each prompt grows
    a tree (dlmkern.sampling.tree): the root (all [MASK]) forks into tree_roots = 4 children,
    each denoises the first half of the step budget, then forks into tree_branching = 4 leaves
    that finish it (tree_depth 2: 16 leaves = group_size). Leaf rewards propagate up (an inner
    node's value: the mean of its children's); a node's local advantage is its value minus the
    mean of its siblings' values, itself left out (advantage: tree). A node's training segment
    is every token it unmasked, scored in ONE forward of its parent's canvas (estimator: tree),
    with the node's advantage; per token the PPO clip 0.4 / 0.4 and a k3 KL 0.01 to the frozen
    reference; the loss is the mean over segments of each segment's token mean (each segment is
    a loss sequence: reduction seq_mean). DARE's recipe: 256 tokens in blocks of 32, 128 steps
    (steps 16 per block), temperature 0.9, 12 ppo_epochs, weight decay 0.1, grad clip 0.2,
    16 prompts per step. Full-attention (LLaDA / Dream) and block (SDAR) models; on a block
    model (the paper has none) a segment's tokens are scored per block, each block as the
    parent had it (or as it began, for a block the parent had not started) after the clean
    blocks before it: the KV-reuse rows' one state per block.

    What differs: a segment shared by several leaves (an inner node's) is trained once, from its
    node's first leaf, exactly as DARE trains each (parent, child) pair once; a segment with no
    token left (EOS before it) is dropped, where DARE counts it in the mean with a zero loss;
    an inner node's segment trains its tokens up to its first leaf's EOS (the sampler stops a
    leaf at its EOS block; DARE cuts at the first EOS of the node's own canvas).
    Siblings share their ancestors by drawing the same uniforms until the fork (checked after
    sampling), rather than by copying the parent's canvas; a static step schedule runs over
    the whole budget (DARE re-plans the rest of the block at a fork: the same counts when they
    split evenly). The paper's
    time-scheduled self-distillation loss (DARE's enable_self_distillation, on in its recipe)
    is not included. Full weights at lr 5e-7 (DARE trains LoRA rank 128 at lr 3e-5). The
    reference stays the initial policy. Log-probs are scored at the sampler's temperature (DARE
    scores raw logits)."""

    algo: ClassVar[str] = "d_treerpo"
    # tree rollouts: group_size is the tree's leaf count, not a budget shared with the others
    own_sampling: ClassVar[bool] = True
    prompts_per_step: int = _same("prompts_per_step", 16)
    group_size: int = _same("group_size", 16)
    max_new_tokens: int = _same("max_new_tokens", 256)
    gen_block_length: int = _same("gen_block_length", 32)
    sampling: SamplingConfig = preset_sampling(steps=16, temperature=0.9)
    estimator: str = _same("estimator", "tree")
    advantage: str = _same("advantage", "tree")
    tree_depth: int = _same("tree_depth", 2)
    tree_roots: int = _same("tree_roots", 4)
    tree_branching: int = _same("tree_branching", 4)
    reduction: str = _same("reduction", "seq_mean")
    eps_low: float = _same("eps_low", 0.4)
    eps_high: float = _same("eps_high", 0.4)
    kl_coef: float = _same("kl_coef", 0.01)
    kl_kind: str = _same("kl_kind", "k3")
    kl_to: str = _same("kl_to", "ref")
    lr: float = _same("lr", 5e-7)
    weight_decay: float = _same("weight_decay", 0.1)
    max_grad_norm: float = _same("max_grad_norm", 0.2)
    ppo_epochs: int = _same("ppo_epochs", 12)
