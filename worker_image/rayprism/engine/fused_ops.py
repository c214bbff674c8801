"""Triton kernels that fuse the small elementwise ops of a decoder layer (used on CUDA).

In eager PyTorch an RMSNorm is ~7 kernels, the residual add before it one more, and SiLU-and-multiply 2;
at decode batch sizes each is a few microseconds of launch gap even inside a CUDA graph, which added up to
several milliseconds per 8B decode step. Each function here is one launch and rounds where the PyTorch ops it
replaces round (to the model dtype after each op), so results match the eager path. (The rotary embedding is
fused with the KV-cache write: paged_attention.rotary_store_kv.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, residual_out_ptr, x_stride, residual_stride, out_stride,
                     n, eps, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:  # the residual stream's add, rounded to the model dtype as `x + residual` is
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0).to(
            tl.float32)).to(dtype)
        tl.store(residual_out_ptr + row * n + cols, x, mask=mask)
    x = x.to(tl.float32)
    normed = (x * tl.math.rsqrt(tl.sum(x * x, 0) / n + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * (x normalised in float32, cast to x.dtype), as transformers' LlamaRMSNorm.

    With `residual`: s = x + residual first (a decoder layer's residual add, in the same launch); returns
    (norm of s, s)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    summed = torch.empty_like(rows) if residual is not None else out
    res = residual.reshape(rows.shape) if residual is not None else rows
    _rms_norm_kernel[(rows.shape[0],)](rows, res, weight, out, summed, rows.stride(0), res.stride(0), out.stride(0),
                                       rows.shape[1], eps, ADD_RESIDUAL=residual is not None,
                                       BLOCK=triton.next_power_of_2(rows.shape[1]))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), summed.view(x.shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, out, rows.stride(0), n, BLOCK=block)
    return out.view(*x.shape[:-1], n)
