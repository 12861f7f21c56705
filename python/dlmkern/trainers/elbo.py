"""Masked-diffusion ELBO rows, one owner for SFT and VRPO: a prompt, its answer and which answer
tokens are masked become one packed sequence whose masked answer tokens are scored.

Full-attention models (LLaDA / Dream) see the noisy sequence (prompt clean, answer masked where
asked). Block-diffusion models (SDAR) see the BD3 layout [noisy | clean]: the noisy copy's block
b attends to itself and to the clean copy's earlier blocks, so each block's masked tokens are
predicted with the earlier blocks clean (the block-diffusion ELBO)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlmkern._host import HOST
from dlmkern.ops import layouts, masked_logprobs


@dataclass
class Packed:
    """One forward's inputs: ids [T] on `layout`, the scored rows [n] and their targets [n],
    and for each scored row the index of the (prompt, answer, mask) entry it belongs to."""

    ids: torch.Tensor
    layout: layouts.Layout
    rows: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor

    def to(self, device) -> Packed:
        return Packed(self.ids.to(device), self.layout.to(device), self.rows.to(device),
                      self.targets.to(device), self.owner.to(device))


def pack_masked(entries, config) -> Packed:
    """entries: (prompt ids, answer ids, masked: one bool per answer token). The noisy copy
    (answer tokens masked with config.mask_token_id) comes first; block-causal models add the
    clean copy after it ([noisy | clean], layouts.bd3), full-attention ones do not."""
    ids, rows, targets, owner, lens = [], [], [], [], []
    offset = 0
    for k, (p, a, masked) in enumerate(entries):
        masked = list(masked)
        if len(masked) != len(a):
            raise ValueError(f"entry {k}: {len(masked)} mask flags for {len(a)} answer tokens")
        seq = list(p) + list(a)
        noisy = list(p) + [config.mask_token_id if m else x for x, m in zip(a, masked, strict=True)]
        for j, m in enumerate(masked):
            if m:
                rows.append(offset + len(p) + j)  # the noisy copy comes first
                targets.append(a[j])
                owner.append(k)
        ids += noisy + seq if config.block_causal else noisy
        offset += 2 * len(seq) if config.block_causal else len(seq)
        lens.append(len(seq))
    lay = layouts.bd3(lens, config.block_size) if config.block_causal else layouts.full(lens)
    long = dict(dtype=torch.long, device=HOST)
    return Packed(torch.tensor(ids, **long), lay, torch.tensor(rows, **long),
                  torch.tensor(targets, **long), torch.tensor(owner, **long))


def masked_token_logprobs(model, packed: Packed) -> torch.Tensor:
    """log p(target) at every scored row [n] (fp32), from one forward of the model."""
    h = model(packed.ids, packed.layout)
    h = model.prediction_hidden(h, packed.layout.cu_seqlens)
    full_t = torch.zeros(packed.ids.numel(), dtype=torch.long, device=packed.ids.device)
    full_t[packed.rows] = packed.targets
    return masked_logprobs(h, model.output_weight(), full_t, rows=packed.rows)


def stratified_mask_counts(length: int, n: int, gen: torch.Generator) -> list[int]:
    """How many of `length` answer tokens each of n ELBO samples masks: one timestep per
    sample, the n timesteps stratified over {1..length} (k ~ U{1..length}, then k + i * length /
    n rounded, wrapped into 1..length): LLaDA's eval_llada.py discrete estimator, as DARE's
    _forward_process_vrpo draws it."""
    k = int(torch.randint(1, length + 1, (), generator=gen, device=HOST))
    xs = [round(k + i * length / n) for i in range(n)]
    return [(x - 1) % length + 1 for x in xs]


def stratified_masks(length: int, n: int, gen: torch.Generator) -> list[tuple[list[bool], float]]:
    """n (mask, weight) ELBO samples of an answer of `length` tokens: sample i masks x_i tokens
    (stratified_mask_counts) chosen uniformly without replacement, weight length / x_i (= 1 / t
    at t = x_i / length). One mask per timestep: VRPO's optimal allocation of a budget of n."""
    out = []
    for x in stratified_mask_counts(length, n, gen):
        chosen = torch.randperm(length, generator=gen, device=HOST)[:x].tolist()
        masked = [False] * length
        for j in chosen:
            masked[j] = True
        out.append((masked, length / x))
    return out
