"""CUDA attention over the paged KV cache (Triton kernels and flash attention) (the CPU keeps attention.py's plain path).

- rotary_store_kv: one launch applies the rotary embedding to this step's q and k (after Qwen3's per-head
  RMSNorms) and writes the rotated K and V rows into their slots; slot -1 (a padding row of a CUDA-graph batch)
  is skipped.
- paged_decode_attention: programs per (sequence, KV head) walk the sequence's block table and read the
  cached K/V in place (no gather into a [batch, max_len] copy), with an online softmax. The query heads of
  a GQA group share each K/V load. Small batches split each context over several programs (flash decoding)
  and combine their partial softmaxes in a second launch.
- varlen_prefill_attention: the prefill of a whole batch in one flash-attention call (not one per sequence); a
  prefill that does not start at position 0 attends to its context gathered from the cache (attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_ops import pdl, pdl_prologue

TILE = 64  # cached tokens per loop iteration


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, cos, sin, heads, norm_ptr, eps, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DIM_PAD: tl.constexpr, NORM: tl.constexpr):
    """Neox rotary on one token's heads (each row contiguous); stores to dst and returns the rotated rows. NORM:
    each head RMSNorm'd first (weight at norm_ptr), rounded as layers.RMSNorm rounds."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < heads) & (d < HEAD_DIM)
    dtype = dst_ptr.dtype.element_ty
    x = tl.load(src_ptr + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): element d reads d + D/2 (negated) in the first half, d - D/2 in the second
    half = HEAD_DIM // 2
    partner = tl.load(src_ptr + h * HEAD_DIM + (d + half) % HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.math.rsqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]
        w = tl.load(norm_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        w_partner = tl.load(norm_ptr + (d + half) % HEAD_DIM, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        x = (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        partner = (w_partner * (partner * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    rotated = tl.where(d < half, -partner, partner)
    out = ((x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(dst_ptr + h * HEAD_DIM + d, out, mask=mask)
    return out


@triton.jit
def _rotary_store_kv_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, positions_ptr,
                            slot_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, eps, q_stride, k_stride, v_stride,
                            heads, kv_heads, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
                            HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, STORE: tl.constexpr, NORM: tl.constexpr,
                            USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    d = tl.arange(0, DIM_PAD)[None, :]
    dtype = q_out_ptr.dtype.element_ty
    # The tables are float32; the eager path casts them to the model dtype first (as transformers does).
    cos = tl.load(cos_ptr + position * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + position * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * q_stride, q_out_ptr + token * heads * HEAD_DIM, cos, sin, heads, q_norm_ptr, eps,
                  HEADS_PAD, HEAD_DIM, DIM_PAD, NORM)
    k = _rotate_heads(k_ptr + token * k_stride, k_out_ptr + token * kv_heads * HEAD_DIM, cos, sin, kv_heads,
                      k_norm_ptr, eps, KV_HEADS_PAD, HEAD_DIM, DIM_PAD, NORM)
    if STORE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        h = tl.arange(0, KV_HEADS_PAD)[:, None]
        mask = (h < tl.where(slot >= 0, kv_heads, 0)) & (d < HEAD_DIM)  # slot -1: a padding row, no write
        offsets = slot * kv_heads * HEAD_DIM + h * HEAD_DIM + d
        tl.store(k_cache_ptr + offsets, k, mask=mask)
        tl.store(v_cache_ptr + offsets, tl.load(v_ptr + token * v_stride + h * HEAD_DIM + d, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["table_stride"])  # the longest sequence's block count: one compile, not three
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, partial_ptr,
                         scale, q_stride, table_stride, cache_block_stride, cache_slot_stride,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # This program's share of the context: whole tiles, the splits taking turns in order.
    tiles_per_split = tl.cdiv(tl.cdiv(context_len, TILE), SPLITS)
    first = split * tiles_per_split * TILE
    last = tl.minimum(first + tiles_per_split * TILE, context_len)
    rows = tl.arange(0, GROUP_PAD)  # the query heads of this KV head, padded to a dot's minimum size
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    q_offsets = seq * q_stride + heads[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=rows[:, None] < GROUP, other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(first, last, TILE):
        positions = start + tl.arange(0, TILE)
        valid = positions < last
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
    head_mask = rows[:, None] < GROUP
    if SPLITS == 1:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a padding row (context 0) gets zeros
        tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:  # float32 [batch, heads, SPLITS, HEAD_DIM + 2]: the unnormalised sum, then m and l
        row = ((seq * tl.num_programs(1) * GROUP + heads) * SPLITS + split) * (HEAD_DIM + 2)
        tl.store(partial_ptr + row[:, None] + dims[None, :], acc, mask=head_mask)
        tl.store(partial_ptr + row + HEAD_DIM, m, mask=rows < GROUP)
        tl.store(partial_ptr + row + HEAD_DIM + 1, l, mask=rows < GROUP)


@triton.jit
def _combine_splits_kernel(partial_ptr, out_ptr, q_stride, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
                           USE_PDL: tl.constexpr):
    """One (sequence, head): the splits' partial softmax sums rescaled to their common maximum and added."""
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    rows = ((seq * tl.num_programs(1) + head) * SPLITS + splits) * (HEAD_DIM + 2)
    m = tl.load(partial_ptr + rows + HEAD_DIM)
    l = tl.load(partial_ptr + rows + HEAD_DIM + 1)
    weight = tl.where(l > 0, tl.exp(m - tl.max(m, 0)), 0.0)  # an empty split (m = -inf) weighs nothing
    acc = tl.sum(tl.load(partial_ptr + rows[:, None] + dims[None, :]) * weight[:, None], 0)
    total = tl.sum(l * weight, 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * q_stride + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def supports(head_dim: int) -> bool:
    return triton.next_power_of_2(head_dim) == head_dim and head_dim >= 16


def rotary_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    norms: tuple[torch.Tensor, torch.Tensor, float] | None = None):
    """Rotary embedding of q and k, and the rotated k plus v written to their cache slots, in one launch.

    q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim] (rows may be strided, as split from the fused
    projection); cos/sin: float32 [max_positions, head_dim]. An empty cache stores nothing. norms: (q_norm weight,
    k_norm weight, eps): each head of q and k RMSNorm'd before the rotary (Qwen3). Returns the rotated q and k
    (contiguous)."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, f"{name}: each token's heads must be contiguous"
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_norm, k_norm, eps = norms or (q, k, 0.0)
    _rotary_store_kv_kernel[(tokens,)](
        q, k, v, q_out, k_out, k_cache, v_cache, positions, slot_mapping, cos, sin, q_norm, k_norm, eps, q.stride(0),
        k.stride(0), v.stride(0), heads, kv_heads, HEADS_PAD=triton.next_power_of_2(heads),
        KV_HEADS_PAD=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim),
        STORE=k_cache.numel() > 0, NORM=norms is not None, **pdl(q))
    return q_out, k_out


MAX_SPLITS = 16


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """How many programs share one sequence's context: enough to give every SM work when batch x KV heads is
    small (batch 1 of an 8B model is 8 programs on 132 SMs), a power of two, at most MAX_SPLITS. A function of
    the batch shape only, so a CUDA graph captured for a batch size keeps fitting as contexts grow."""
    per_program = _sm_count(device) // (batch * num_kv_heads)
    return min(MAX_SPLITS, 1 << (per_program.bit_length() - 1)) if per_program > 1 else 1


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           splits: int | None = None) -> torch.Tensor:
    """q: [batch, heads, head_dim], one new token per sequence; the cache already holds that token's K/V.
    splits: programs per (sequence, KV head) along the context (default num_splits()); above 1 a second
    launch combines their partial softmaxes (flash decoding)."""
    q = q.contiguous()
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    splits = splits or num_splits(batch, num_kv_heads, q.device)
    out = torch.empty_like(q)
    partial = torch.empty(batch, num_heads, splits, head_dim + 2, dtype=torch.float32, device=q.device) \
        if splits > 1 else out
    _paged_decode_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, partial, scale,
        q.stride(0), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], TILE=TILE, IEEE=q.dtype == torch.float32, SPLITS=splits, **pdl(q),
    )
    if splits > 1:
        _combine_splits_kernel[(batch, num_heads)](partial, out, q.stride(0), HEAD_DIM=head_dim, SPLITS=splits,
                                                   **pdl(q))
    return out


def varlen_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_len_q: int, max_len_k: int, scale: float) -> torch.Tensor:
    """Causal attention of every prefilled sequence in one flash-attention launch (GQA native; bf16/fp16).

    q: [tokens, heads, dim] packed back to back at cu_seqlens_q; k/v: [context tokens, kv_heads, dim] at
    cu_seqlens_k (int32). A sequence with more keys than queries (a chunk after the first, or the tokens after a
    cached prefix: its queries are the last positions of its context) gets flash attention's causal mask aligned
    to the bottom right: query i attends to keys <= i + (keys - queries)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_len_q, max_len_k, 0.0, True, False, scale=scale)[0]
