"""CUDA attention over the paged KV cache (Triton kernels and flash attention) (the CPU keeps attention.py's plain path).

- rotary_store_kv: one launch applies the rotary embedding to this step's q and k and writes the rotated K
  and V rows into their slots; slot -1 (a padding row of a CUDA-graph batch) is skipped.
- paged_decode_attention: one program per (sequence, KV head) walks the sequence's block table and reads
  the cached K/V in place (no gather into a [batch, max_len] copy), with an online softmax. The query
  heads of a GQA group share each K/V load.
- varlen_prefill_attention: the prefill of a whole batch in one flash-attention call (not one per sequence).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 64  # cached tokens per loop iteration


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, cos, sin, heads, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DIM_PAD: tl.constexpr):
    """Neox rotary on one token's heads (each row contiguous); stores to dst and returns the rotated rows."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < heads) & (d < HEAD_DIM)
    dtype = dst_ptr.dtype.element_ty
    x = tl.load(src_ptr + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): element d reads d + D/2 (negated) in the first half, d - D/2 in the second
    half = HEAD_DIM // 2
    partner = tl.load(src_ptr + h * HEAD_DIM + (d + half) % HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where(d < half, -partner, partner)
    out = ((x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(dst_ptr + h * HEAD_DIM + d, out, mask=mask)
    return out


@triton.jit
def _rotary_store_kv_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, positions_ptr,
                            slot_ptr, cos_ptr, sin_ptr, q_stride, k_stride, v_stride, heads, kv_heads,
                            HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            DIM_PAD: tl.constexpr, STORE: tl.constexpr):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    d = tl.arange(0, DIM_PAD)[None, :]
    dtype = q_out_ptr.dtype.element_ty
    # The tables are float32; the eager path casts them to the model dtype first (as transformers does).
    cos = tl.load(cos_ptr + position * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + position * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * q_stride, q_out_ptr + token * heads * HEAD_DIM, cos, sin, heads, HEADS_PAD,
                  HEAD_DIM, DIM_PAD)
    k = _rotate_heads(k_ptr + token * k_stride, k_out_ptr + token * kv_heads * HEAD_DIM, cos, sin, kv_heads,
                      KV_HEADS_PAD, HEAD_DIM, DIM_PAD)
    if STORE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        h = tl.arange(0, KV_HEADS_PAD)[:, None]
        mask = (h < tl.where(slot >= 0, kv_heads, 0)) & (d < HEAD_DIM)  # slot -1: a padding row, no write
        offsets = slot * kv_heads * HEAD_DIM + h * HEAD_DIM + d
        tl.store(k_cache_ptr + offsets, k, mask=mask)
        tl.store(v_cache_ptr + offsets, tl.load(v_ptr + token * v_stride + h * HEAD_DIM + d, mask=mask), mask=mask)


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale,
                         q_stride, table_stride, cache_block_stride, cache_slot_stride,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    rows = tl.arange(0, GROUP_PAD)  # the query heads of this KV head, padded to a dot's minimum size
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    q_offsets = seq * q_stride + heads[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=rows[:, None] < GROUP, other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(0, context_len, TILE):
        positions = start + tl.arange(0, TILE)
        valid = positions < context_len
        blocks = tl.load(block_tables_ptr + seq * table_stride + positions // BLOCK_SIZE, mask=valid, other=0)
        offsets = (blocks.to(tl.int64) * cache_block_stride + (positions % BLOCK_SIZE) * cache_slot_stride
                   + kv_head * HEAD_DIM)
        k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a padding row (context 0) gets zeros
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < GROUP)


def supports(head_dim: int) -> bool:
    return triton.next_power_of_2(head_dim) == head_dim and head_dim >= 16


def rotary_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """Rotary embedding of q and k, and the rotated k plus v written to their cache slots, in one launch.

    q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim] (rows may be strided, as split from the fused
    projection); cos/sin: float32 [max_positions, head_dim]. An empty cache stores nothing. Returns the rotated
    q and k (contiguous)."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, f"{name}: each token's heads must be contiguous"
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                     device=k.device)
    _rotary_store_kv_kernel[(tokens,)](
        q, k, v, q_out, k_out, k_cache, v_cache, positions, slot_mapping, cos, sin, q.stride(0), k.stride(0),
        v.stride(0), heads, kv_heads, HEADS_PAD=triton.next_power_of_2(heads),
        KV_HEADS_PAD=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim),
        STORE=k_cache.numel() > 0)
    return q_out, k_out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [batch, heads, head_dim], one new token per sequence; the cache already holds that token's K/V."""
    q = q.contiguous()
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], TILE=TILE, IEEE=q.dtype == torch.float32,
    )
    return out


def varlen_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_len: int, scale: float) -> torch.Tensor:
    """Causal attention of every prefilled sequence in one flash-attention launch (GQA native; bf16/fp16).

    q: [tokens, heads, dim], k/v: [tokens, kv_heads, dim], sequences packed back to back at cu_seqlens (int32)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale)[0]
