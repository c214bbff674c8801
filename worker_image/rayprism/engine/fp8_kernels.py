"""Per-token FP8 quantization of activations in one launch (CUDA): what quant.quantize_rows does in five torch ops.

One program per row: a first pass finds the row's largest magnitude, a second (from L2) writes x / scale as
float8_e4m3fn. The division is IEEE-rounded (div_rn) and the conversion rounds to nearest, as torch's, so the
result is quant.quantize_rows' bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import FP8, FP8_MAX, MIN_SCALE


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, k, x_row_stride, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, k, BLOCK):
        x = tl.load(x_ptr + row * x_row_stride + start + columns, mask=start + columns < k, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), FP8_MAX), MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for start in range(0, k, BLOCK):
        x = tl.load(x_ptr + row * x_row_stride + start + columns, mask=start + columns < k, other=0.0)
        q = tl.clamp(tl.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * k + start + columns, q.to(q_ptr.dtype.element_ty), mask=start + columns < k)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows may be strided, columns contiguous) -> (x_fp8 [M, K] contiguous, scale [M] float32)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"quantize_rows: x of shape {tuple(x.shape)} and strides {x.stride()} is not [M, K] with "
                         "contiguous rows")
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=FP8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](x, q, scale, k, x.stride(0), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
                                       BLOCK=min(4096, triton.next_power_of_2(k)), num_warps=4)
    return q, scale
