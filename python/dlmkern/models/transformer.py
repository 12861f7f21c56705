"""The diffusion language model: one transformer for SDAR / TraDo (block-causal), LLaDA and Dream
(bidirectional). Attention goes through dlmkern.ops.block_attention (training, prefill) and
dlmkern.ops.decode_attention (sampling with a KV cache) only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dlmkern._host import on_host
from dlmkern.models.config import ModelConfig
from dlmkern.models.lora import Linear
from dlmkern.ops import block_attention, decode_attention
from dlmkern.ops.layouts import Layout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, scaling: dict | None = None,
         max_positions: int = 0) -> torch.Tensor:
    """Rotary embedding (rotate-half convention), x [T, H, D], positions [T], base `theta`;
    `scaling` a config's rope_scaling (linear, dynamic, yarn, llama3: the frequencies and yarn's
    cos / sin factor of models.config.rope_frequencies)."""
    from dlmkern.models.config import rope_frequencies

    inv, scale = rope_frequencies(x.shape[-1], theta, positions.to(x.device), scaling,
                                  max_positions)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


@dataclass
class KVCache:
    """Per-layer caches [S, max_len, Hkv, D] and per-layer filled lengths [S] int32 (each layer's
    decode_attention(commit=True) advances its own)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seqlens: list[torch.Tensor]

    @classmethod
    def empty(cls, config: ModelConfig, num_seqs: int, max_len: int, device, dtype):
        shape = (num_seqs, max_len, config.num_kv_heads, config.head_dim)
        n = config.num_layers
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
                   [torch.zeros(num_seqs, device=device, dtype=torch.int32) for _ in range(n)])

    @property
    def lengths(self) -> torch.Tensor:
        return self.seqlens[0]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.wq = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.wk = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wv = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.wo = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def qkv(self, x, positions):
        c, T = self.c, x.shape[0]
        q = self.wq(x).view(T, c.num_heads, c.head_dim)
        k = self.wk(x).view(T, c.num_kv_heads, c.head_dim)
        v = self.wv(x).view(T, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        spec = (c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        return rope(q, positions, *spec), rope(k, positions, *spec), v

    def forward(self, x, layout: Layout):
        q, k, v = self.qkv(x, layout.position_ids)
        out, _ = block_attention(q, k, v, layout)
        return self.wo(out.reshape(x.shape[0], self.c.num_heads * self.c.head_dim))

    def prefill(self, x, layout: Layout, cache: KVCache, layer: int, slots):
        """Block-causal attention over the prompts; their k / v go to the cache in one scatter
        (``slots``: each token's (cache row, position) on the device, see DiffusionLM.prefill)."""
        q, k, v = self.qkv(x, layout.position_ids)
        out, _ = block_attention(q, k, v, layout)
        cache.k[layer].index_put_(slots, k.to(cache.k[layer].dtype))
        cache.v[layer].index_put_(slots, v.to(cache.v[layer].dtype))
        return self.wo(out.reshape(x.shape[0], self.c.num_heads * self.c.head_dim))

    def decode(self, x, positions, cu_seqlens_q, cache: KVCache, layer: int, commit: bool):
        q, k, v = self.qkv(x, positions)
        out = decode_attention(q, k, v, cache.k[layer], cache.v[layer], cache.seqlens[layer],
                               cu_seqlens_q, commit=commit)
        return self.wo(out.reshape(x.shape[0], self.c.num_heads * self.c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.w_gate = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w_up = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w_down = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Layer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, layout):
        x = x + self.attn(self.attn_norm(x), layout)
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x, layout, cache, layer, slots):
        x = x + self.attn.prefill(self.attn_norm(x), layout, cache, layer, slots)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x, positions, cu, cache, layer, commit):
        x = x + self.attn.decode(self.attn_norm(x), positions, cu, cache, layer, commit)
        return x + self.mlp(self.mlp_norm(x))


class DiffusionLM(nn.Module):
    """Token ids -> hidden states; ``logits`` on request. Tokens are packed ([T], varlen) and the
    attention pattern comes from a :class:`Layout` (block-causal families use its block / stream
    metadata; LLaDA / Dream are bidirectional per sequence whatever the layout says)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False
        self.apply(self._init)

    def save_pretrained(self, path: str) -> None:
        from dlmkern.models.io import save_pretrained

        save_pretrained(self, path)

    def _init(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def _layout(self, layout: Layout) -> Layout:
        if self.config.block_causal or layout.full:
            return layout
        return Layout(layout.block, layout.stream, layout.position_ids, layout.cu_seqlens,
                      layout.max_seqlen, full=True)

    def forward(self, input_ids: torch.Tensor, layout: Layout, rows: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Training / prefill forward: input_ids [T] on a layout -> final hidden states [T, H];
        with ``rows`` / ``targets`` ([n] each), the log-probabilities [n] of ``targets`` at those
        rows under softmax(logits / ``temperature``) instead (the fused masked_logprobs: no
        [n, V] logits; computed inside forward, so sharded (FSDP) weights are gathered)."""
        if rows is not None:
            from dlmkern.ops import masked_logprobs

            hidden = self.prediction_hidden(self(input_ids, layout), layout.cu_seqlens)
            full_targets = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
            full_targets[rows] = targets
            return masked_logprobs(hidden, self.output_weight(), full_targets, rows=rows,
                                   temperature=temperature)
        layout = self._layout(layout)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def output_weight(self) -> torch.Tensor:
        """The output head's weight [V, H] as the fused log-prob path takes it (with a LoRA
        adapter on lm_head: W + s B A, models.lora)."""
        return self.lm_head.merged_weight()

    def prediction_hidden(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The hidden state that predicts each position: itself, or (Dream) the previous position
        of the same sequence (a sequence's first position predicts itself)."""
        if not self.config.logits_shift:
            return hidden
        T = hidden.shape[0]
        # a buffer of T + 1 takes the starts of empty trailing sequences (== T): no host sync
        first = torch.zeros(T + 1, dtype=torch.long, device=hidden.device)
        first.index_fill_(0, cu_seqlens[:-1].long(), 1)
        return hidden[torch.arange(T, device=hidden.device) - 1 + first[:T]]

    @torch.no_grad()
    def prefill(self, input_ids, cu_seqlens, cache: KVCache) -> torch.Tensor:
        """Runs the prompts (packed [T], prompt i into cache row i) with the training attention
        pattern (block-causal for SDAR, bidirectional for LLaDA / Dream) and stores their k / v
        in the cache: rows 0..S-1 are refilled from position 0 (their lengths set to the
        prompts'), the other rows are left as they are. Returns the final hidden states [T, H].

        ``cu_seqlens``: the prompts' offsets [S + 1], a list of ints or an int tensor. Give them
        on the host (a list or a CPU tensor: the caller builds them there): a device tensor is
        read back once. Nothing else is read from the device, in any layer."""
        from dlmkern.ops import layouts

        cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        lens = _prefill_lengths(cu, input_ids.shape[0], cache)
        lay = self._layout(layouts.block_causal(lens, self.config.block_size))
        dev = input_ids.device
        slots, lengths = _prefill_slots(lens, lay)
        slots, lengths = tuple(slots.to(dev).unbind(0)), lengths.to(dev)
        for seqlens in cache.seqlens:
            seqlens[: len(lens)].copy_(lengths)
        lay = lay.to(dev)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer.prefill(x, lay, cache, i, slots)
        return self.norm(x)

    @torch.no_grad()
    def decode(self, input_ids, positions, cu_seqlens_q, cache: KVCache,
               commit=False) -> torch.Tensor:
        """One denoising step: the current block of each sequence (packed [T], positions [T])
        against the cache; commit=True appends the block's k / v. Block-causal families see the
        cached prefix plus their own block bidirectionally, exactly as in training."""
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer.decode(x, positions, cu_seqlens_q, cache, i, commit)
        return self.norm(x)


@on_host
def _prefill_slots(lens: list[int], lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (cache row, position) [2, T], the one scatter per layer writes them all,
    and the rows' lengths [S] int32 (host tensors)."""
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
    return (torch.stack([seq, lay.position_ids.long()]),
            torch.tensor(lens, dtype=torch.int32))


def _prefill_lengths(cu: list, num_tokens: int, cache: KVCache) -> list[int]:
    """The prompt lengths of prefill's offsets, checked against the tokens and the cache (host
    values only)."""
    lens = [int(e) - int(s) for s, e in zip(cu[:-1], cu[1:], strict=True)]
    rows, max_len = cache.k[0].shape[:2]
    if not cu or int(cu[0]) != 0 or int(cu[-1]) != num_tokens or min(lens, default=0) < 0:
        raise ValueError(f"prefill: `cu_seqlens` must rise from 0 to the {num_tokens} tokens of "
                         f"`input_ids`, got {cu}")
    if len(lens) > rows or max(lens, default=0) > max_len:
        raise ValueError(f"prefill: {len(lens)} prompts of up to {max(lens, default=0)} tokens "
                         f"do not fit a cache of {rows} rows x {max_len} positions")
    return lens


class ValueModel(nn.Module):
    """A policy trunk with a scalar head (zero-initialised, so training starts from V = 0)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.trunk = DiffusionLM(config)
        self.value_head = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: DiffusionLM) -> ValueModel:
        """A value model whose trunk is a copy of ``policy``'s (base) weights, in its dtype on its
        device, and whose head is zero: built on the meta device and filled from the policy's
        tensors (no random init of a model, no fp32 copy)."""
        from dlmkern.models.io import materialize

        p = next(policy.parameters())
        with torch.device("meta"):
            trunk = DiffusionLM(policy.config)
        trunk = materialize(trunk, p.dtype, p.device)
        # a LoRA policy's base weights (its adapters are the policy's own)
        trunk.load_state_dict({k: v for k, v in policy.state_dict().items()
                               if ".lora_" not in k})
        return cls.around(trunk)

    @classmethod
    def around(cls, trunk: DiffusionLM) -> ValueModel:
        """A value model whose trunk IS ``trunk`` (its tensors, not a copy), with a zero head in
        the trunk's dtype on its device."""
        p = next(trunk.parameters())
        with torch.device("meta"):  # the trunk built here is replaced: nothing allocated
            vm = cls(trunk.config)
        vm.trunk = trunk
        vm.value_head = vm.value_head.to(p.dtype).to_empty(device=p.device)
        with torch.no_grad():
            vm.value_head.weight.zero_()
            vm.value_head.bias.zero_()
        return vm

    @classmethod
    def from_policy_checkpoint(cls, path: str, dtype=None, device=None) -> ValueModel:
        """A value model whose trunk starts from the policy saved at ``path`` (loaded once,
        straight into the trunk: dlmkern.models.io.load's dtype / device rules)."""
        from dlmkern.models.io import load

        policy = load(path, dtype=dtype, device=device)
        if not isinstance(policy, DiffusionLM):
            raise ValueError(f"{path}: holds a value model, not a policy; load it with load()")
        return cls.around(policy)

    def save_pretrained(self, path: str) -> None:
        from dlmkern.models.io import save_pretrained

        save_pretrained(self, path)

    def forward(self, input_ids, layout: Layout) -> torch.Tensor:
        """Values [T] fp32 at every position of the layout."""
        return self.value_head(self.trunk(input_ids, layout)).squeeze(-1).float()
