"""Linear layers at decode batch 1: a weight-streaming matrix-vector kernel (used on CUDA).

At batch 1 a linear layer reads its whole weight to make one row of output, so it can only be as fast as the
weight streams from memory. cuBLAS picks tiles made for larger batches: on the 8B model's per-rank qkv and
o_proj weights under tensor parallel 2 it reached 2.2-2.4 TB/s on an H200 whose copies reach 4.2, and it split
some of them over K with a second reduce launch. Here each program owns BLOCK_N output features and walks K
in BLOCK_K steps, so the grid covers every SM even for a 3072-feature weight and the weight is read once, in one
launch. From 2 rows on cuBLAS was as fast or faster (bench/gemv_bench.py), so only single rows come here.

For the MLP's down projection the kernel also takes the gate/up projection's output and computes
silu(gate) * up as it loads it (rounded to the model dtype where the SiLU kernel rounds), replacing that launch.
Accumulation is float32, as cuBLAS's; only the order of the sum differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, n, k, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + features[:, None] * k + ks[None, :], mask=(features[:, None] < n) & (ks[None, :] < k),
                    other=0.0, eviction_policy="evict_first")  # read once: keep the activations in L2
        x = tl.load(x_ptr + ks, mask=ks < k, other=0.0)
        if GATED:  # x is [gate | up] of width 2k: the input is silu(gate) * up, rounded as silu_and_mul rounds
            gate, up = x.to(tl.float32), tl.load(x_ptr + k + ks, mask=ks < k, other=0.0).to(tl.float32)
            x = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=features < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + features, acc.to(dtype), mask=features < n)


def launch_config(n: int, k: int, gated: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the best of bench/gemv_bench.py's sweep, or within 3% of it, for
    every 8B weight at tensor parallel 1 and 2 on an H200 (gemv_20261127T054216.json)."""
    return (8 if gated else 4), min(2048, triton.next_power_of_2(k) // 2), 4, 1


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False):
    """x @ weight.T (+ bias) for one row x; with `gated`, x is [gate | up] and the product is taken with
    silu(gate) * up."""
    n, k = weight.shape
    if x.numel() != (2 * k if gated else k) or not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError(f"gemv: x of shape {tuple(x.shape)} is not one contiguous row for weight "
                         f"{tuple(weight.shape)} (gated={gated})")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    launch(x, weight, bias, out, gated, launch_config(n, k, gated))
    return out


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, gated: bool,
           config: tuple[int, int, int, int]) -> None:
    """One kernel launch with the given launch_config (bench/gemv_bench.py sweeps them)."""
    (n, k), (block_n, block_k, num_warps, num_stages) = weight.shape, config
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else weight, out, n, k, GATED=gated,
                                             HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=num_warps, num_stages=num_stages)
