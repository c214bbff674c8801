"""Linear layers at decode batches of 1-4 rows: a weight-streaming matrix-vector kernel (used on CUDA).

At batch 1 a linear layer reads its whole weight to make one row of output, so it can only be as fast as the
weight streams from memory. cuBLAS picks tiles made for larger batches: on the 8B model's per-rank qkv and
o_proj weights under tensor parallel 2 it reached 2.5-2.7 TB/s on an H200 whose copies reach 4.2, and it split
some of them over K with a second reduce launch. Here each program owns BLOCK_N output features, walks K in
BLOCK_K steps and reduces its products once per step, so the grid covers every SM even for a 3072-feature
weight and the weight is read once, in one launch.

For the MLP's down projection the kernel also takes the gate/up projection's output and computes
silu(gate) * up as it loads it (rounded to the model dtype where the SiLU kernel rounds), replacing that launch.
Accumulation is float32, as cuBLAS's; only the order of the sum differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 4  # larger batches go to cuBLAS (where it was as fast: bench/gemv_bench.py)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, rows, n, k, x_stride, out_stride, GATED: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + features[:, None] * k + ks[None, :], mask=(features[:, None] < n) & (ks[None, :] < k),
                    other=0.0, eviction_policy="evict_first")  # read once: keep the activations in L2
        x_mask = (batch[:, None] < rows) & (ks[None, :] < k)
        x = tl.load(x_ptr + batch[:, None] * x_stride + ks[None, :], mask=x_mask, other=0.0)
        if GATED:  # x is [gate | up] of width 2k: the input is silu(gate) * up, rounded as silu_and_mul rounds
            up = tl.load(x_ptr + batch[:, None] * x_stride + k + ks[None, :], mask=x_mask, other=0.0)
            gate = x.to(tl.float32)
            x = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up.to(tl.float32)).to(dtype)
        acc += tl.sum(w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=features < n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + batch[:, None] * out_stride + features[None, :], acc.to(dtype),
             mask=(batch[:, None] < rows) & (features[None, :] < n))


def launch_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an n x k weight."""
    return 8, 1024, 4, 1


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False):
    """x @ weight.T (+ bias) for up to GEMV_MAX_ROWS rows of x; with `gated`, x is [gate | up] and the product
    is taken with silu(gate) * up."""
    rows = x.reshape(-1, x.shape[-1])
    n, k = weight.shape
    if rows.shape[1] != (2 * k if gated else k) or rows.shape[0] > GEMV_MAX_ROWS or rows.stride(-1) != 1:
        raise ValueError(f"gemv: x of shape {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                         f"(gated={gated}, at most {GEMV_MAX_ROWS} rows, contiguous rows)")
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    launch(rows, weight, bias, out, gated, launch_config(n, k))
    return out.view(*x.shape[:-1], n)


def launch(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, gated: bool,
           config: tuple[int, int, int, int]) -> None:
    """One kernel launch with the given launch_config (bench/gemv_bench.py sweeps them)."""
    (n, k), (block_n, block_k, num_warps, num_stages) = weight.shape, config
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        rows, weight, bias if bias is not None else weight, out, rows.shape[0], n, k, rows.stride(0), out.stride(0),
        GATED=gated, HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(rows.shape[0]), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
