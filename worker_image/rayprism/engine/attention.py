"""Paged attention: the plain, correct path (SDPA) used on CPU; CUDA uses the kernels of paged_attention.py.

The KV pool of a layer is [num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives
in slot block_table[t // block_size] * block_size + t % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """One step's batch: the prefilled sequences' new tokens first (a whole prompt, a chunk of it, or what follows a
    cached prefix), then one new token per decoding sequence. A step may hold either part or both (a mixed step)."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_prefill_tokens: int = 0
    cu_seqlens: torch.Tensor | None = None  # prefill part: int32 token offsets [0, n0, n0+n1, ...]
    max_prefill_len: int = 0
    # Prefill part, when some sequence's new tokens do not start at position 0: the cache slots of each one's whole
    # context (the new tokens included), back to back at cu_context_lens (int32). None: every prefill starts at 0.
    context_slots: torch.Tensor | None = None
    cu_context_lens: torch.Tensor | None = None
    max_context_len: int = 0
    block_tables: torch.Tensor | None = None  # decode part: [num_decode, max_blocks], padded with -1
    context_lens: torch.Tensor | None = None  # decode part: [num_decode] tokens in the cache, the new one included


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """(CUDA writes the cache in paged_attention.rotary_store_kv, fused with the rotary embedding.)"""
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v


def paged_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [tokens, heads, dim]; k, v: this step's [tokens, kv_heads, dim]. Returns [tokens, heads, dim]."""
    n = meta.num_prefill_tokens
    parts = []
    if n:
        parts.append(prefill_attention(q[:n], k[:n], v[:n], k_cache, v_cache, meta, scale))
    if meta.context_lens is not None:
        parts.append(decode_attention(q[n:], k_cache, v_cache, meta, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each prefilled sequence's new tokens over its context: this step's k/v where every
    sequence starts at position 0; else each one's context read back from the cache (this step's K/V are stored
    already), a query at position p attending to positions <= p (the causal mask aligned to the bottom right)."""
    cu_k, max_k = meta.cu_seqlens, meta.max_prefill_len
    if meta.context_slots is not None:
        k = k_cache.view(-1, *k_cache.shape[2:])[meta.context_slots]
        v = v_cache.view(-1, *v_cache.shape[2:])[meta.context_slots]
        cu_k, max_k = meta.cu_context_lens, meta.max_context_len
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from .paged_attention import varlen_prefill_attention  # one flash launch for the whole batch

        return varlen_prefill_attention(q, k, v, meta.cu_seqlens, cu_k, meta.max_prefill_len, max_k, scale)
    outs = []
    for q_start, q_end, k_start, k_end in zip(meta.cu_seqlens[:-1].tolist(), meta.cu_seqlens[1:].tolist(),
                                              cu_k[:-1].tolist(), cu_k[1:].tolist()):
        qs = q[q_start:q_end].transpose(0, 1).unsqueeze(0)
        ks, vs = (t[k_start:k_end].transpose(0, 1).unsqueeze(0) for t in (k, v))
        num_q, num_k = q_end - q_start, k_end - k_start
        mask = None if num_q == num_k else torch.ones(num_q, num_k, dtype=torch.bool, device=q.device).tril(
            num_k - num_q)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                   enable_gqa=True))
    return torch.cat([o.squeeze(0).transpose(0, 1) for o in outs])


def decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One new token per sequence against its cached context (the new token's K/V already stored)."""
    if q.is_cuda:  # reads the blocks in place instead of gathering them (paged_attention.py)
        from .paged_attention import paged_decode_attention, supports

        if supports(q.shape[-1]):
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    batch, max_blocks = meta.block_tables.shape
    block_size = k_cache.shape[1]
    blocks = meta.block_tables.clamp(min=0)
    keys = k_cache[blocks].view(batch, max_blocks * block_size, *k_cache.shape[2:]).transpose(1, 2)
    values = v_cache[blocks].view(batch, max_blocks * block_size, *v_cache.shape[2:]).transpose(1, 2)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    mask = (positions[None, :] < meta.context_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)
