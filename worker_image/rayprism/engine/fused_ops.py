"""Triton kernels that fuse the small elementwise ops of a decoder layer (used on CUDA).

In eager PyTorch an RMSNorm is ~7 kernels, the residual add before it one more, and SiLU-and-multiply 2;
at decode batch sizes each is a few microseconds of launch gap even inside a CUDA graph, which added up to
several milliseconds per 8B decode step. Each function here is one launch and rounds where the PyTorch ops it
replaces round (to the model dtype after each op), so results match the eager path. (The rotary embedding is
fused with the KV-cache write: paged_attention.rotary_store_kv.)

Under tensor parallelism, all_reduce_rms_norm also takes in the all-reduce before the norm: the peers' rows arrive
as flagged lines in symmetric memory (_send_lines); comm.py owns that memory, describes the protocol and decides
when the fused path applies.

Every decode-path kernel (these, gemv.py's, greedy.py's and paged_attention.py's) is launched with programmatic
dependent launch on Hopper and newer (`pdl`): it lets the next kernel launch at its start, and waits for the
previous one (gdc_wait) before it reads any activation or writes anything. At batch 1 the next kernel's launch
and start-up then overlap this one, and the GEMV streams weights during it. Every such kernel waits before it
ends, so a kernel that starts early still runs after everything before the previous one.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


_PDL_ON, _PDL_OFF = {"USE_PDL": True, "launch_pdl": True}, {"USE_PDL": False}


@functools.cache
def _pdl_options(device_index: int) -> dict:
    # Triton picks its interpreter once per process (TRITON_INTERPRET): looked up once per device, not per launch.
    on = (torch.version.hip is None and os.environ.get("TRITON_INTERPRET", "0") == "0"
          and torch.cuda.get_device_capability(device_index)[0] >= 9)
    return _PDL_ON if on else _PDL_OFF


def pdl(t: torch.Tensor) -> dict:
    """Launch options for a kernel with a USE_PDL flag, on t's device: programmatic dependent launch on NVIDIA
    Hopper and newer; off elsewhere (the CPU, older GPUs, ROCm, Triton's interpreter)."""
    if not t.is_cuda:
        return _PDL_OFF
    return _pdl_options(t.device.index if t.device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """A PDL kernel's prologue: let the next kernel launch, then wait until the previous one's writes are
    visible (see the module docstring)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _add_residual(x, residual_ptr, summed_ptr, cols, mask):
    """The residual stream's add, rounded to the model dtype as `x + residual` is; stored to summed_ptr."""
    summed = (x.to(tl.float32) + tl.load(residual_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(
        summed_ptr.dtype.element_ty)
    tl.store(summed_ptr + cols, summed, mask=mask)
    return summed


@triton.jit
def _store_norm(x, w_ptr, out_ptr, cols, mask, n, eps):
    """weight * (x normalised in float32, cast to the model dtype): LlamaRMSNorm's roundings."""
    dtype = out_ptr.dtype.element_ty
    x = x.to(tl.float32)
    normed = (x * tl.math.rsqrt(tl.sum(x * x, 0) / n + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, residual_out_ptr, x_stride, residual_stride, out_stride,
                     n, eps, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        x = _add_residual(x, residual_ptr + row * residual_stride, residual_out_ptr + row * n, cols, mask)
    _store_norm(x, w_ptr, out_ptr + row * out_stride, cols, mask, n, eps)


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
                                       BLOCK=triton.next_power_of_2(rows.shape[1]), **pdl(x))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), summed.view(x.shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
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
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, out, rows.stride(0), n, BLOCK=block, **pdl(x))
    return out.view(*x.shape[:-1], n)


@triton.jit
def _row_from_words(words, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """A row's int32 words (bf16: two elements each, the first in the low half) as BLOCK elements of DTYPE."""
    if DTYPE == tl.bfloat16:
        low = (words & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        high = (words >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        row = tl.reshape(tl.join(low, high), [BLOCK])
    else:
        row = words.to(DTYPE, bitcast=True)
    return row


@triton.jit
def _turn(calls, slot_words, WORLD: tl.constexpr):
    """Call `calls`'s flag and its half of every rank's buffer (a slot of lines per rank; the halves alternate).
    The flag is odd, so never 0: the value a line is reset to once read."""
    return calls * 2 + 1, (calls & 1) * (WORLD * slot_words)


@triton.jit
def _send_lines(src_words, words, word_mask, dst_offset, buffer_ptrs, calls, slot_words, RANK: tl.constexpr,
                WORLD: tl.constexpr):
    """Send the int32 words src_words[words] of this rank's partial rows as lines of call `calls` (each word
    beside the call's flag) into this rank's slot of every peer's buffer, at line dst_offset + words."""
    epoch, half = _turn(calls, slot_words, WORLD)
    buffers = buffer_ptrs.to(tl.pointer_type(tl.uint64))
    line = tl.load(src_words + words, mask=word_mask).to(tl.int64) | (epoch.to(tl.int64) << 32)
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            slot = tl.load(buffers + peer).to(tl.pointer_type(tl.int64)) + half + RANK * slot_words
            tl.store(slot + dst_offset + words, line, mask=word_mask)


@triton.jit(do_not_specialize=["rows"])  # batch 1 and others: one compile
def _all_reduce_rms_norm_kernel(buffer_ptrs, calls_ptr, x_ptr, residual_ptr, w_ptr, out_ptr, summed_ptr, rows, n,
                                eps, slot_words, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                                SENT: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)  # the next GEMV streams its weights while this kernel waits on the peers
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    dtype = x_ptr.dtype.element_ty
    WORDS: tl.constexpr = BLOCK * dtype.primitive_bitwidth // 32  # int32 words of a row (padded)
    row_words = n * dtype.primitive_bitwidth // 32
    calls = tl.load(calls_ptr + program)
    epoch, half = _turn(calls, slot_words, WORLD)  # as _send_lines gives this call's lines
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    words = tl.arange(0, WORDS)
    word_mask = words < row_words
    if not SENT:  # (SENT: the GEMV that made x sent its lines: gemv.py)
        x_words = x_ptr.to(tl.pointer_type(tl.uint32))
        for row in range(program, rows, programs):
            _send_lines(x_words + row * row_words, words, word_mask, row * row_words, buffer_ptrs, calls,
                        slot_words, RANK, WORLD)
    mine = tl.load(buffer_ptrs.to(tl.pointer_type(tl.uint64)) + RANK).to(tl.pointer_type(tl.int64)) + half
    for row in range(program, rows, programs):
        total = tl.zeros([BLOCK], tl.float32)
        for peer in tl.static_range(WORLD):  # rank order: the same sum, bit for bit, on every rank
            if peer == RANK:
                part = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
            else:  # wait until every line of the peer's row carries this call's flag, in this rank's memory
                lines = mine + peer * slot_words + row * row_words + words
                line = tl.load(lines, mask=word_mask, other=0, volatile=True)
                while tl.sum((((line >> 32).to(tl.int32) != epoch) & word_mask).to(tl.int32), 0) > 0:
                    line = tl.load(lines, mask=word_mask, other=0, volatile=True)
                tl.store(lines, tl.zeros([WORDS], tl.int64), mask=word_mask)  # no stale flag can match later
                part = _row_from_words(line.to(tl.int32), BLOCK, dtype)
            total += part.to(tl.float32)
        # all_reduce's rounding to the model dtype, then the add's, then the norm's
        summed = _add_residual(total.to(dtype), residual_ptr + row * n, summed_ptr + row * n, cols, mask)
        _store_norm(summed, w_ptr, out_ptr + row * n, cols, mask, n, eps)
    tl.store(calls_ptr + program, calls + 1)


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, lines: tuple,
                        sent: bool = False):
    """comm.all_reduce_rms_norm's fused path: returns (norm(s), s) with s = sum of x over the ranks + residual.

    lines: (buffer_ptrs, calls, slot_words, rank, world_size) of comm's symmetric buffer (comm._FusedNorm.lines);
    row i is always handled by program i % len(calls). sent: x's lines are already on their way to the peers
    (the GEMV that made x sent them)."""
    buffer_ptrs, calls, slot_words, rank, world_size = lines
    rows = x.reshape(-1, x.shape[-1])
    out, summed = torch.empty_like(rows), torch.empty_like(rows)
    _all_reduce_rms_norm_kernel[(calls.numel(),)](
        buffer_ptrs, calls, rows, residual.reshape(rows.shape).contiguous(), weight, out, summed,
        rows.shape[0], rows.shape[1], eps, slot_words, RANK=rank, WORLD=world_size,
        BLOCK=triton.next_power_of_2(rows.shape[1]), SENT=sent, num_warps=8, **pdl(x))  # 8: +0.4% tp2 bs1 over 4, 16
    return out.view(x.shape), summed.view(x.shape)
