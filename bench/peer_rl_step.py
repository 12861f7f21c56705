"""The TraceRL step as the research codebases write it, for bench_rl_step.py: one padded row per
round ([prompt | clean | noisy_r]), a dense boolean [L, L] mask per row through PyTorch's SDPA in
the model dtype, and the full-vocabulary logits [rows, L, V] before log_softmax and gather. Same
weights as the dlmkern model (its modules are called directly), same trained positions and loss,
so the two losses agree (checked before timing)."""

from __future__ import annotations

import common  # bench/ is on sys.path wherever this module is imported from
import torch
import torch.nn.functional as F
from dlmkern.ops import layouts, policy_value_loss


def padded_batch(rows, device):
    """Per-round rows (dlmkern.rl.Rows, packed) as the peers hold them: ids / positions [R, L]
    padded to the longest row, the dense mask [R, 1, L, L] (the block-diffusion visibility rule,
    padding hidden; a padding query sees itself so no row is empty), and the (row, column) of
    every trained position."""
    cu = rows.layout.cu_seqlens.tolist()
    lens = [e - s for s, e in zip(cu[:-1], cu[1:], strict=True)]
    R, L = len(lens), max(lens)
    ids = torch.zeros(R, L, dtype=torch.long)
    pos = torch.zeros(R, L, dtype=torch.long)
    blk = torch.full((R, L), -1, dtype=torch.long)
    strm = torch.full((R, L), -1, dtype=torch.long)
    for r, (s, e) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        ids[r, : e - s] = rows.input_ids[s:e]
        pos[r, : e - s] = rows.layout.position_ids[s:e].long()
        blk[r, : e - s] = rows.layout.block[s:e].long()
        strm[r, : e - s] = rows.layout.stream[s:e].long()
    valid = blk >= 0
    mask = layouts.visible(blk[:, :, None], strm[:, :, None], blk[:, None, :], strm[:, None, :])
    mask = (mask & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
    sel = rows.train_rows
    row = torch.searchsorted(torch.tensor(cu[1:]), sel, right=True)
    col = sel - torch.tensor(cu[:-1])[row]
    return (ids.to(device), pos.to(device), mask[:, None].to(device), row.to(device),
            col.to(device))


def forward(model, ids, pos, mask):
    """The model's layers over [R, L] with dense-mask SDPA (GQA through enable_gqa)."""
    c, (R, L) = model.config, ids.shape
    x = model.embed(ids)
    for layer in model.layers:
        h = layer.attn_norm(x).reshape(R * L, -1)
        q, k, v = layer.attn.qkv(h, pos.reshape(-1))
        q, k, v = (t.view(R, L, -1, c.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + layer.attn.wo(out.transpose(1, 2).reshape(R, L, -1))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.norm(x)


def step_fn(model, opt, rows, device, adv):
    """One step on the peers' path (forward, loss, backward, optimizer)."""
    ids, pos, mask, row, col = padded_batch(rows, device)
    mask = mask.to(device)
    targets = rows.targets.to(device)

    def loss_fn():
        logits = model.lm_head(forward(model, ids, pos, mask))  # [R, L, V]: every position
        logp = torch.log_softmax(logits.float(), -1)[row, col].gather(
            -1, targets[:, None]).squeeze(-1)
        loss, _ = policy_value_loss(logp, logp.detach(), adv, torch.ones_like(adv, dtype=bool))
        return loss

    return common.optimizer_step(opt, loss_fn)
