"""IGPO's inpainting step of the rollout (Zhao et al. 2025, "Inpainting-Guided Policy Optimization
for Diffusion Large Language Models", arXiv 2509.10396; code github.com/facebookresearch/igpo).

A group whose completions all fail (every reward < pass_threshold) has no reward spread and
trains nothing. IGPO re-samples the group with part of the prompt's reference solution written
into the response (inpainted: fixed from the first step, never masked nor sampled), and lets up to
``inpaint_replacements`` of the re-sampled completions that pass replace the group's first
completions: the group then has a spread. The hints are cut from the solution's tokens in chunks
of ``inpaint_chunk_min``..``inpaint_chunk_max`` tokens; each re-sampled completion reveals a share
of the chunks drawn uniformly in [inpaint_share_low, inpaint_share_high] (sorted over the group),
at the chunks' own offsets in the response. The trajectories list the inpainted positions
(Trajectory.inpainted), so the rows never train them (dlmkern.rl.rows)."""

from __future__ import annotations

import torch

from dlmkern._host import HOST, on_host
from dlmkern.data.prompts import encode_plain

SEED_OFFSET = 1 << 48  # the re-sampled completions' seeds: the originals' + this


def solution_hint(solution: list[int], share: float, chunk_min: int, chunk_max: int,
                  limit: int, gen: torch.Generator) -> dict[int, int]:
    """{response index: token}: the solution's first `limit` tokens cut into consecutive chunks
    of chunk_min..chunk_max tokens (a remainder shorter than chunk_min is dropped: too short to
    inpaint, as the authors' code does); all but int(chunks * (1 - share)) chunks, drawn at
    random, are revealed at their own offsets."""
    ids, chunks, i = solution[:limit], [], 0
    while i < len(ids):
        size = min(int(torch.randint(chunk_min, chunk_max + 1, (), generator=gen)), len(ids) - i)
        if size < chunk_min:
            break
        chunks.append((i, i + size))
        i += size
    n_hidden = int(len(chunks) * (1 - share))
    shown = torch.randperm(len(chunks), generator=gen)[: len(chunks) - n_hidden].tolist()
    return {j: ids[j] for k in sorted(shown) for j in range(*chunks[k])}


@on_host
def failed_groups(rewards: torch.Tensor, group_size: int, threshold: float) -> list[int]:
    """The groups whose completions all fail (reward < threshold)."""
    fail = (rewards.view(-1, group_size) < threshold).all(-1)
    return fail.nonzero().flatten().tolist()


def group_hints(solution: list[int], cfg, gen: torch.Generator) -> list[dict[int, int]]:
    """One hint per completion of a group, the shares drawn in [low, high] and sorted."""
    lo, hi = cfg.inpaint_share_low, cfg.inpaint_share_high
    shares = sorted((lo + (hi - lo) * torch.rand(cfg.group_size, generator=gen)).tolist())
    return [solution_hint(solution, s, cfg.inpaint_chunk_min, cfg.inpaint_chunk_max,
                          cfg.max_new_tokens, gen) for s in shares]


def inpaint_failed(rollout, sampler, rows: list[dict], prompts: list[list[int]], trajs: list,
                   rewards: torch.Tensor, seeds: list[int]) -> tuple[list, torch.Tensor]:
    """IGPO on one rollout (rollout: dlmkern.trainers.rollout.Rollout, its config, tokenizer
    and rewards): re-sample the all-fail groups with hints from the row's `inpaint_column`,
    score them, and put up to inpaint_replacements passing ones in place of each group's first
    completions (a group whose solution yields no hint, shorter than one chunk, is not
    re-sampled). Returns the trajectories and rewards (new lists / tensor)."""
    cfg, g = rollout.cfg, rollout.cfg.group_size
    failed = failed_groups(rewards, g, cfg.pass_threshold)
    if not failed or cfg.inpaint_replacements == 0:
        return trajs, rewards
    key = cfg.inpaint_column
    missing = [gi for gi in failed if rows[gi].get(key) in (None, "")]
    if missing:
        raise ValueError(f"inpaint_column={key!r}: row {missing[0]} of this step has no "
                         f"reference solution in column {key!r} (IGPO inpaints it)")
    hints, hinted = [], []
    for gi in failed:
        gen = torch.Generator(device=HOST).manual_seed(seeds[gi * g] + SEED_OFFSET)
        group = group_hints(encode_plain(rollout.tok, str(rows[gi][key])), cfg, gen)
        if any(group):  # a solution shorter than one chunk gives no hint: left as it is
            hints += group
            hinted.append(gi)
    failed = hinted
    if not failed:
        return trajs, rewards
    new = sampler.generate([prompts[gi] for gi in failed], n_samples=g,
                           seeds=[seeds[gi * g + k] + SEED_OFFSET for gi in failed
                                  for k in range(g)], inpaint=hints)
    new_r = rollout.score([rows[gi] for gi in failed], new)
    trajs, rewards = list(trajs), rewards.clone()
    for j, gi in enumerate(failed):
        passing = [k for k in range(g) if float(new_r[j * g + k]) >= cfg.pass_threshold]
        for slot, k in enumerate(passing[: cfg.inpaint_replacements]):
            trajs[gi * g + slot], rewards[gi * g + slot] = new[j * g + k], new_r[j * g + k]
    return trajs, rewards
