"""Mixture-of-experts on CUDA: the routing and the experts' SwiGLU MLPs as Triton kernels (moe.py holds the torch
reference, which the CPU runs).

One MoE layer is a few launches, none with a host sync or a data-dependent shape, so the decode CUDA graphs
(cuda_graphs.py) capture it whole:
1. `route`: per token, the softmax of the router's logits, the top k experts (the first of equal ones) and their
   weights, renormalised if asked: one launch.
2. Few (token, expert) pairs (batch-1 decode, small batches: `use_gemv`): every pair streams its expert's rows as
   gemv.py streams a weight: `_gemv_gate_up_kernel` gives each pair's silu(gate) * up, `_gemv_down_kernel` each
   token's sum over its experts of weight * down(...): two launches; an expert's weights are read once per pair,
   no sorting.
3. More pairs: the pairs sorted by expert, each expert's run padded to BLOCK_M (`align`: `_count_kernel` counts
   each chunk's pairs per expert, `_sort_kernel` places every pair), then the grouped GEMMs of vLLM's and SGLang's
   fused_moe: each program multiplies BLOCK_M rows of one expert (tl.dot), `_gate_up_kernel` with the SiLU and
   product fused in, `_down_kernel` with the routing weight; then a sum over each token's k rows: five launches.
   The sorted index buffer is sized for the worst case (every expert's run padded), and programs past the last
   expert's run return at once.
Roundings follow the torch path (moe.fused_experts_torch): each projection's output to the model dtype, the SiLU
and the product as fused_ops.silu_and_mul, each expert's weighted output to the model dtype; only the order of the
float32 sums differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_ops import pdl, pdl_prologue


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, weights_ptr, num_experts, stride, TOP_K: tl.constexpr, E_PAD: tl.constexpr,
                  RENORMALIZE: tl.constexpr, ROUND: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    token = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + token * stride + experts, mask=experts < num_experts,
                     other=float("-inf")).to(tl.float32)
    p = tl.exp(logits - tl.max(logits, 0))
    p = p / tl.sum(p, 0)
    total = 1.0
    if RENORMALIZE:  # the sum of the top k first (the choice below repeats this one)
        left = p
        total = 0.0
        for _ in tl.static_range(TOP_K):
            best = tl.max(left, 0)
            total += best
            left = tl.where(experts == tl.min(tl.where(left == best, experts, E_PAD), 0), -1.0, left)
    left = p
    for j in tl.static_range(TOP_K):
        best = tl.max(left, 0)
        first = tl.min(tl.where(left == best, experts, E_PAD), 0)  # the first of equal ones
        left = tl.where(experts == first, -1.0, left)
        weight = best / total
        if ROUND:  # Qwen3-MoE's weights are rounded to the model dtype
            weight = weight.to(logits_ptr.dtype.element_ty).to(tl.float32)
        tl.store(ids_ptr + token * TOP_K + j, first)
        tl.store(weights_ptr + token * TOP_K + j, weight)


@triton.jit
def _silu_mul(gate, up, dtype: tl.constexpr):
    """silu(gate) * up from float32 accumulators, rounded as the unfused ops round (fused_ops.silu_and_mul)."""
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    return ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)


@triton.jit
def _gemv_gate_up_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, n, k, expert_stride, TOP_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (pair, column block): silu(gate) * up of BLOCK_N columns for one (token, expert) pair."""
    pdl_prologue(USE_PDL)
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    gate_rows = w_ptr + expert * expert_stride + cols[:, None] * k
    up_rows = gate_rows + n * k
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * k
    acc_gate = tl.zeros([BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        mask = (cols[:, None] < n) & (start + ks[None, :] < k)
        x = tl.load(x_row + start + ks, mask=start + ks < k, other=0.0).to(tl.float32)[None, :]
        gate = tl.load(gate_rows + start + ks[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        up = tl.load(up_rows + start + ks[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        acc_gate += tl.sum(gate.to(tl.float32) * x, 1)
        acc_up += tl.sum(up.to(tl.float32) * x, 1)
    act = _silu_mul(acc_gate, acc_up, out_ptr.dtype.element_ty)
    tl.store(out_ptr + pair.to(tl.int64) * n + cols, act, mask=cols < n)


@triton.jit
def _gemv_down_kernel(act_ptr, w_ptr, ids_ptr, weights_ptr, out_ptr, n, k, expert_stride, TOP_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (token, column block): BLOCK_N outputs of sum over the token's experts of weight * down(act)."""
    pdl_prologue(USE_PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = w_ptr + expert * expert_stride + cols[:, None] * k
        act_row = act_ptr + pair.to(tl.int64) * k
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, k, BLOCK_K):
            mask = (cols[:, None] < n) & (start + ks[None, :] < k)
            a = tl.load(act_row + start + ks, mask=start + ks < k, other=0.0).to(tl.float32)[None, :]
            w = tl.load(rows + start + ks[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
            acc += tl.sum(w.to(tl.float32) * a, 1)
        total += (acc.to(dtype).to(tl.float32) * tl.load(weights_ptr + pair)).to(dtype).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * n + cols, total.to(dtype), mask=cols < n)


@triton.jit
def _count_kernel(ids_ptr, chunk_counts_ptr, num_pairs, CHUNK: tl.constexpr, E_PAD: tl.constexpr,
                  USE_PDL: tl.constexpr):
    """Program c: how many of pairs [c * CHUNK, (c + 1) * CHUNK) each expert has, into row c of chunk_counts."""
    pdl_prologue(USE_PDL)
    chunk = tl.program_id(0)
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    hits = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    tl.store(chunk_counts_ptr + chunk * E_PAD + tl.arange(0, E_PAD), tl.sum(hits, 0))


@triton.jit
def _sort_kernel(ids_ptr, chunk_counts_ptr, sorted_ptr, ends_ptr, counts_ptr, num_pairs, num_chunks, num_experts,
                 CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, USE_PDL: tl.constexpr):
    """Program c places the pairs of chunk c: expert e's run starts at the padded runs of the experts before it,
    and within it the pairs keep their order (those of earlier chunks first). Program 0 also writes every run's
    padded end and its count of pairs."""
    pdl_prologue(USE_PDL)
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], tl.int32)
    before = tl.zeros([E_PAD], tl.int32)  # pairs of each expert in the chunks before this one
    for first_row in range(0, num_chunks, 16):  # 16 chunks' counts a step
        rows = first_row + tl.arange(0, 16)[:, None]
        counts = tl.load(chunk_counts_ptr + rows * E_PAD + experts[None, :], mask=rows < num_chunks, other=0)
        total += tl.sum(counts, 0)
        before += tl.sum(tl.where(rows < chunk, counts, 0), 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    if chunk == 0:
        tl.store(ends_ptr + experts, ends, mask=experts < num_experts)
        tl.store(counts_ptr + experts, total, mask=experts < num_experts)
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=valid, other=-1)
    hits = (ids[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(hits, 0) * hits, 1) - 1  # earlier pairs of the same expert in this chunk
    first = tl.sum(hits * (ends - padded + before)[None, :], 1)
    tl.store(sorted_ptr + first + rank, pairs, mask=valid)


@triton.jit
def _block_rows(sorted_ptr, ends_ptr, counts_ptr, num_experts, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's expert (num_experts past the last run), its BLOCK_M pairs and which of them are real (the
    rest pad the expert's run)."""
    block_start = tl.program_id(0) * BLOCK_M
    experts = tl.arange(0, E_PAD)
    ends = tl.load(ends_ptr + experts, mask=experts < num_experts, other=2147483647)
    expert = tl.sum((ends <= block_start).to(tl.int32), 0)
    count = tl.load(counts_ptr + expert, mask=expert < num_experts, other=0)
    end = tl.load(ends_ptr + expert, mask=expert < num_experts, other=0)
    rows = block_start + tl.arange(0, BLOCK_M)
    valid = rows < end - (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M + count
    pairs = tl.load(sorted_ptr + rows, mask=valid, other=0)
    return expert, pairs, valid


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, ends_ptr, counts_ptr, n, k, num_experts, expert_stride,
                    TOP_K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (row block, column block): silu(gate) * up of BLOCK_N columns for BLOCK_M pairs of one expert."""
    pdl_prologue(USE_PDL)
    expert, pairs, valid = _block_rows(sorted_ptr, ends_ptr, counts_ptr, num_experts, E_PAD, BLOCK_M)
    if expert >= num_experts:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (pairs // TOP_K).to(tl.int64)[:, None] * k + ks[None, :]
    gate_cols = w_ptr + expert.to(tl.int64) * expert_stride + cols[None, :] * k + ks[:, None]  # [BLOCK_K, BLOCK_N]
    up_cols = gate_cols + n * k
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        k_mask = start + ks < k
        x = tl.load(x_rows + start, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & (cols[None, :] < n)
        gate = tl.load(gate_cols + start, mask=w_mask, other=0.0)
        up = tl.load(up_cols + start, mask=w_mask, other=0.0)
        if IEEE:
            acc_gate = tl.dot(x, gate, acc_gate, input_precision="ieee")
            acc_up = tl.dot(x, up, acc_up, input_precision="ieee")
        else:
            acc_gate = tl.dot(x, gate, acc_gate)
            acc_up = tl.dot(x, up, acc_up)
    act = _silu_mul(acc_gate, acc_up, out_ptr.dtype.element_ty)
    tl.store(out_ptr + pairs.to(tl.int64)[:, None] * n + cols[None, :], act,
             mask=valid[:, None] & (cols[None, :] < n))


@triton.jit
def _down_kernel(act_ptr, w_ptr, weights_ptr, out_ptr, sorted_ptr, ends_ptr, counts_ptr, n, k, num_experts,
                 expert_stride, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (row block, column block): weight * down(act) of BLOCK_N columns for BLOCK_M pairs of one expert,
    each into its pair's row."""
    pdl_prologue(USE_PDL)
    expert, pairs, valid = _block_rows(sorted_ptr, ends_ptr, counts_ptr, num_experts, E_PAD, BLOCK_M)
    if expert >= num_experts:
        return
    dtype = out_ptr.dtype.element_ty
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    act_rows = act_ptr + pairs.to(tl.int64)[:, None] * k + ks[None, :]
    w_cols = w_ptr + expert.to(tl.int64) * expert_stride + cols[None, :] * k + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        k_mask = start + ks < k
        a = tl.load(act_rows + start, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + start, mask=k_mask[:, None] & (cols[None, :] < n), other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
    out = (acc.to(dtype).to(tl.float32) * weight[:, None]).to(dtype)
    tl.store(out_ptr + pairs.to(tl.int64)[:, None] * n + cols[None, :], out, mask=valid[:, None] & (cols[None, :] < n))


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, round_weights: bool):
    """moe.select_experts in one launch: (float32 weights, int32 expert ids), each [tokens, top_k]."""
    tokens, num_experts = router_logits.shape
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=router_logits.device)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    _route_kernel[(tokens,)](router_logits, ids, weights, num_experts, router_logits.stride(0), TOP_K=top_k,
                             E_PAD=triton.next_power_of_2(num_experts), RENORMALIZE=renormalize,
                             ROUND=round_weights, **pdl(router_logits))
    return weights, ids


def align(ids: torch.Tensor, num_experts: int, block_m: int):
    """The pairs (token * top_k + slot) of `ids` sorted by expert, each expert's run padded to a multiple of
    block_m: (sorted pairs, each run's padded end, each expert's count of pairs), int32. Entries of the padding
    are left unset (the GEMMs mask them by the counts)."""
    num_pairs = ids.numel()
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, 8192 // e_pad))
    num_chunks = triton.cdiv(num_pairs, chunk)
    device = ids.device
    chunk_counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(num_pairs + min(num_experts, num_pairs) * (block_m - 1), dtype=torch.int32,
                               device=device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    _count_kernel[(num_chunks,)](ids, chunk_counts, num_pairs, CHUNK=chunk, E_PAD=e_pad, **pdl(ids))
    _sort_kernel[(num_chunks,)](ids, chunk_counts, sorted_pairs, ends, counts, num_pairs, num_chunks, num_experts,
                                CHUNK=chunk, E_PAD=e_pad, BLOCK_M=block_m, **pdl(ids))
    return sorted_pairs, ends, counts


def use_gemv(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether the (token, expert) pairs stream their experts one by one (few pairs: each expert is likely chosen
    once) rather than sorted into grouped GEMMs. A function of the shape only: a decode graph keeps its path."""
    return tokens * top_k <= max(top_k, num_experts // 4)


GEMV_BLOCK_N = 4


def gemv_block_k(k: int) -> int:
    return max(16, min(2048, triton.next_power_of_2(k) // 2))  # as gemv.launch_config


def gemm_config(tokens: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the grouped GEMMs: vLLM's defaults (short runs per
    expert: 16 rows)."""
    if tokens <= num_experts:
        return 16, 64, 64, 4, 3
    return 64, 64, 64, 4, 3


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, gemv: bool | None = None) -> torch.Tensor:
    """moe.fused_experts_torch on CUDA (x: [tokens, hidden]; weights, ids: [tokens, top_k]). gemv: force the
    path (default use_gemv)."""
    x = x.contiguous()
    tokens, hidden = x.shape
    num_experts, n = gate_up.shape[0], gate_up.shape[1] // 2
    top_k = ids.shape[1]
    ids, weights = ids.to(torch.int32).contiguous(), weights.float().contiguous()
    act = torch.empty(tokens * top_k, n, dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32
    if use_gemv(tokens, top_k, num_experts) if gemv is None else gemv:
        out = torch.empty_like(x)
        _gemv_gate_up_kernel[(tokens * top_k, triton.cdiv(n, GEMV_BLOCK_N))](
            x, gate_up, ids, act, n, hidden, gate_up.stride(0), TOP_K=top_k, BLOCK_N=GEMV_BLOCK_N,
            BLOCK_K=gemv_block_k(hidden), num_warps=4, **pdl(x))
        _gemv_down_kernel[(tokens, triton.cdiv(hidden, GEMV_BLOCK_N))](
            act, down, ids, weights, out, hidden, n, down.stride(0), TOP_K=top_k, BLOCK_N=GEMV_BLOCK_N,
            BLOCK_K=gemv_block_k(n), num_warps=4, **pdl(x))
        return out
    block_m, block_n, block_k, num_warps, num_stages = gemm_config(tokens, num_experts)
    sorted_pairs, ends, counts = align(ids, num_experts, block_m)
    row_blocks = triton.cdiv(sorted_pairs.numel(), block_m)
    e_pad = triton.next_power_of_2(num_experts)
    _gate_up_kernel[(row_blocks, triton.cdiv(n, block_n))](
        x, gate_up, act, sorted_pairs, ends, counts, n, hidden, num_experts, gate_up.stride(0), TOP_K=top_k,
        E_PAD=e_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=num_warps,
        num_stages=num_stages, **pdl(x))
    partial = torch.empty(tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(row_blocks, triton.cdiv(hidden, block_n))](
        act, down, weights, partial, sorted_pairs, ends, counts, hidden, n, num_experts, down.stride(0),
        E_PAD=e_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=num_warps,
        num_stages=num_stages, **pdl(x))
    return partial.view(tokens, top_k, hidden).sum(dim=1)


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, router_logits: torch.Tensor, top_k: int,
              renormalize: bool, round_weights: bool) -> torch.Tensor:
    """One MoE layer's experts (moe.FusedMoE.forward on CUDA)."""
    weights, ids = route(router_logits, top_k, renormalize, round_weights)
    return fused_experts(x, gate_up, down, weights, ids)
