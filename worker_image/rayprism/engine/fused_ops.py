"""Triton kernels that fuse the small elementwise ops of a decoder layer (used on CUDA).

In eager PyTorch an RMSNorm is ~7 kernels, a rotary embedding ~20 and SiLU-and-multiply 2; at decode
batch sizes each is a few microseconds of launch gap even inside a CUDA graph, which added up to several
milliseconds per 8B decode step. Each function here is one launch and rounds where the PyTorch ops it
replaces round (to the model dtype after each op), so results match the eager path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_stride, out_stride, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (x * tl.math.rsqrt(tl.sum(x * x, 0) / n + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(
        out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x normalised in float32, cast to x.dtype), as transformers' LlamaRMSNorm."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), rows.shape[1], eps,
                                       BLOCK=triton.next_power_of_2(rows.shape[1]))
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, positions_ptr, cos_ptr, sin_ptr, x_stride, heads,
                   HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < heads
    dtype = out_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + position * HEAD_DIM + d).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + position * HEAD_DIM + d).to(dtype).to(tl.float32)
    x = tl.load(x_ptr + token * x_stride + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): element d reads d + D/2 (negated) in the first half, d - D/2 in the second
    half = HEAD_DIM // 2
    partner = tl.load(x_ptr + token * x_stride + h * HEAD_DIM + (d + half) % HEAD_DIM, mask=mask, other=0.0)
    rotated = tl.where(d < half, -partner.to(tl.float32), partner.to(tl.float32))
    out = (x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * HEAD_DIM * heads + h * HEAD_DIM + d, out.to(dtype), mask=mask)


def apply_rotary(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim] (rows may be strided); cos/sin: float32 [max_positions, head_dim]."""
    tokens, heads, head_dim = x.shape
    assert x.stride(2) == 1 and x.stride(1) == head_dim
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype, device=x.device)
    _rotary_kernel[(tokens,)](x, out, positions, cos, sin, x.stride(0), heads,
                              HEADS_PAD=triton.next_power_of_2(heads), HEAD_DIM=head_dim)
    return out


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
