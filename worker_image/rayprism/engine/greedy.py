"""Greedy tokens from vocabulary-sharded logits on every rank, without gathering the logits (CUDA kernels).

Under tensor parallelism each rank computes the logits of its slice of the vocabulary. Gathering them on rank 0
(a NCCL gather of a 128k-wide row), an argmax there (torch gives a 128k row one thread block: 27 us on an H200)
and a broadcast of the tokens back to the other ranks cost ~60 us of a 3 ms batch-1 step, all outside the decode
CUDA graph. Here:
1. `chunk_candidates`: each program takes the largest logit of one CHUNK of one row, and its index (the first
   of equal ones), and writes them into this rank's slot of a [world, rows, chunks, 2] float32 tensor whose
   other slots it zeroes;
2. one all-reduce (a sum: every slot but one is zero on each rank) hands every rank every rank's candidates;
3. `select`: per row, the first of the largest candidates. Candidates are in vocabulary order (rank, then
   chunk), so this is the first largest logit of the whole row: what torch.argmax of the gathered row returns.
Indices travel as float32, exact below 2**24. Every rank ends with the tokens that the next step embeds, so no
broadcast follows, and all of it is captured in the decode graphs (cuda_graphs.py). The CPU path is
layers.ParallelLMHead.argmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_ops import pdl, pdl_prologue

CHUNK = 2048  # logits per program: 32 programs for a 64k slice (tensor parallel 2 of a 128k vocabulary)
MAX_INDEX = 2**24  # float32 holds every integer below it


@triton.jit
def _chunk_argmax_kernel(logits_ptr, out_ptr, stride, valid, vocab_start, rows, RANK: tl.constexpr,
                         WORLD: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row * stride + cols, mask=cols < valid, other=-float("inf")).to(tl.float32)
    best, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    for rank in tl.static_range(WORLD):  # layout [WORLD, rows, chunks, 2]: (value, vocabulary index)
        slot = out_ptr + ((rank * rows + row) * chunks + chunk) * 2
        if rank == RANK:
            tl.store(slot, best)
            tl.store(slot + 1, (vocab_start + chunk * CHUNK + index).to(tl.float32))
        else:
            tl.store(slot, 0.0)
            tl.store(slot + 1, 0.0)


@triton.jit
def _select_kernel(candidates_ptr, out_ptr, rows, chunks, WORLD: tl.constexpr, PAD: tl.constexpr,
                   USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    i = tl.arange(0, PAD)  # candidate i: rank i // chunks, chunk i % chunks (vocabulary order)
    slots = candidates_ptr + (((i // chunks) * rows + row) * chunks + i % chunks) * 2
    values = tl.load(slots, mask=i < WORLD * chunks, other=-float("inf"))
    _, best = tl.max(values, 0, return_indices=True, return_indices_tie_break_left=True)
    index = tl.load(candidates_ptr + (((best // chunks) * rows + row) * chunks + best % chunks) * 2 + 1)
    tl.store(out_ptr + row, index.to(tl.int64))


def chunk_candidates(logits: torch.Tensor, valid: int, vocab_start: int, rank: int, world_size: int) -> torch.Tensor:
    """logits: [rows, slice] of this rank (columns from `valid` on are padding). Returns the [world, rows,
    chunks, 2] float32 candidates, this rank's slot filled, the others zero."""
    rows = logits.shape[0]
    if vocab_start + logits.shape[1] > MAX_INDEX:
        raise ValueError(f"greedy: vocabulary index {vocab_start + logits.shape[1]} does not fit float32 exactly")
    chunks = max(1, triton.cdiv(valid, CHUNK))
    out = torch.empty(world_size, rows, chunks, 2, dtype=torch.float32, device=logits.device)
    if rows:
        _chunk_argmax_kernel[(rows, chunks)](logits, out, logits.stride(0), valid, vocab_start, rows, RANK=rank,
                                             WORLD=world_size, CHUNK=CHUNK, **pdl(logits))
    return out


def select(candidates: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the vocabulary index of the first largest candidate (int64 [rows], into `out` if given)."""
    world, rows, chunks, _ = candidates.shape
    out = torch.empty(rows, dtype=torch.long, device=candidates.device) if out is None else out
    if rows:
        _select_kernel[(rows,)](candidates, out, rows, chunks, WORLD=world,
                                PAD=triton.next_power_of_2(world * chunks), **pdl(candidates))
    return out
