"""Linear layers at decode batch 1: a weight-streaming matrix-vector kernel (used on CUDA).

At batch 1 a linear layer reads its whole weight to make one row of output, so it can only be as fast as the
weight streams from memory. cuBLAS picks tiles made for larger batches: on the 8B model's per-rank qkv and
o_proj weights under tensor parallel 2 it reached 2.2-2.4 TB/s on an H200 whose copies reach 4.2, and it split
some of them over K with a second reduce launch. Here each program owns BLOCK_N output features and walks K
in BLOCK_K steps, so the grid covers every SM even for a 3072-feature weight and the weight is read once, in one
launch. From 2 rows on cuBLAS was as fast or faster (bench/gemv_bench.py), so only single rows come here.

An FP8 weight (quant.py) streams here too, half the bytes: each tile is converted to float32 in registers and the
per-output-channel scale multiplies the finished dot product (sum(w_fp8 * x) * scale = sum(w * x)); the activation
stays in the model dtype.

The weights are no kernel's output, so under programmatic dependent launch (fused_ops.pdl) each program loads its
first weight tile before it waits for the previous kernel: the layer's weights start streaming while the
previous kernel (an all-reduce waiting on the peer GPU, a norm) still runs. Accumulation is float32, as
cuBLAS's; only the order of the sum differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_ops import _send_lines, pdl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, n, k, buffer_ptrs, calls_ptr, slot_words,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SEND: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # read once: evict_first keeps the activations in L2
    w = tl.load(w_ptr + features[:, None] * k + ks[None, :], mask=(features[:, None] < n) & (ks[None, :] < k),
                other=0.0, eviction_policy="evict_first")
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        x = tl.load(x_ptr + start + ks, mask=start + ks < k, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        following = start + BLOCK_K + ks  # the next tile (past the end: masked, nothing read)
        w = tl.load(w_ptr + features[:, None] * k + following[None, :],
                    mask=(features[:, None] < n) & (following[None, :] < k), other=0.0, eviction_policy="evict_first")
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + features, mask=features < n, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=features < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + features, acc.to(out_ptr.dtype.element_ty), mask=features < n)
    if SEND:  # this program's outputs, read back as words, to the peers as lines (fused_ops._send_lines)
        tl.debug_barrier()  # every thread's outputs are stored before any thread reads them back
        WORDS: tl.constexpr = BLOCK_N * out_ptr.dtype.element_ty.primitive_bitwidth // 32
        words = tl.program_id(0) * WORDS + tl.arange(0, WORDS)
        _send_lines(out_ptr.to(tl.pointer_type(tl.uint32)), words, words < n * WORDS // BLOCK_N, 0, buffer_ptrs,
                    tl.load(calls_ptr), slot_words, RANK, WORLD)


def launch_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the best of bench/gemv_bench.py's sweep, or within 3% of it, for
    every 8B weight at tensor parallel 1 and 2 on an H200 (gemv_20261127T054216.json)."""
    return 4, max(16, min(2048, triton.next_power_of_2(k) // 2)), 4, 1


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One contiguous row x for a contiguous weight of under 2**31 elements (the kernel's offsets are 32-bit)."""
    return (x.numel() == x.shape[-1] == weight.shape[1] and x.is_contiguous() and weight.is_contiguous()
            and weight.numel() < 2**31)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, lines: tuple | None = None,
         weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for one row x (see supports), into `out` (contiguous) if given. weight_scale: float32
    [N] for an FP8 weight, which is then dequantized as weight * weight_scale[:, None].

    lines: (buffer_ptrs, calls, slot_words, rank, world_size) of comm's fused all-reduce + norm: each program
    also sends its outputs to the peers as that all-reduce's lines for its next call (row 0: counter calls[0]),
    as soon as they are computed; that call then only waits for the peers' lines."""
    if not supports(x, weight):
        raise ValueError(f"gemv: x of shape {tuple(x.shape)} is not one contiguous row for the contiguous weight "
                         f"{tuple(weight.shape)} of under 2**31 elements")
    n, k = weight.shape
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    launch(x, weight, bias, out, launch_config(n, k), lines, weight_scale)
    return out


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
           config: tuple[int, int, int, int], lines: tuple | None = None,
           weight_scale: torch.Tensor | None = None) -> None:
    """One kernel launch with the given launch_config (bench/gemv_bench.py sweeps them)."""
    (n, k), (block_n, block_k, num_warps, num_stages) = weight.shape, config
    buffer_ptrs, calls, slot_words, rank, world_size = lines or (0, out, 0, 0, 1)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, weight_scale if weight_scale is not None else weight,
                                             bias if bias is not None else weight, out, n, k, buffer_ptrs, calls,
                                             slot_words, HAS_SCALE=weight_scale is not None,
                                             HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                             SEND=lines is not None, RANK=rank, WORLD=world_size,
                                             num_warps=num_warps, num_stages=num_stages, **pdl(x))
