"""Decode through CUDA graphs: one graph per padded batch size, captured once, replayed every step.

An eager decode step of an 8B model is launch-bound at small batches (hundreds of kernels, each launched
from Python); a replay issues the whole step at once: the model, this rank's logits (kept in `logits`, which
sampling gathers) and the greedy tokens on every rank (`tokens`, greedy.py). Each graph reads its inputs from
static buffers, which one launch (`_stage_inputs_kernel`) fills from the step's packed batch: it takes each input
token sampled by the previous step (a negative id names its row) from that step's tokens, and pads the batch
to the graph's size with slot -1 (no KV write) and context length 0 (attention writes zeros), so padding rows
touch no sequence's cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import AttentionMetadata


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, *range(16, max_batch_size + 1, 16)) if b <= max_batch_size]
    return sizes if sizes[-1] == max_batch_size else [*sizes, max_batch_size]


@triton.jit(do_not_specialize=["n", "width"])
def _stage_inputs_kernel(ids_ptr, positions_ptr, slots_ptr, context_lens_ptr, tables_ptr, previous_ptr,
                         ids_out, positions_out, slots_out, context_lens_out, tables_out, n, width, table_stride,
                         HAS_PREVIOUS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if row < n:
        token = tl.load(ids_ptr + row)
        if HAS_PREVIOUS:  # -1 - r: row r of the previous step's tokens
            token = tl.where(token < 0, tl.load(previous_ptr + tl.maximum(-1 - token, 0)), token)
        tl.store(ids_out + row, token)
        tl.store(positions_out + row, tl.load(positions_ptr + row))
        tl.store(slots_out + row, tl.load(slots_ptr + row))
        tl.store(context_lens_out + row, tl.load(context_lens_ptr + row))
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            entries = tl.load(tables_ptr + row * width + cols, mask=cols < width)
            tl.store(tables_out + row * table_stride + cols, entries, mask=cols < width)
    else:  # padding
        tl.store(ids_out + row, 0)
        tl.store(positions_out + row, 0)
        tl.store(slots_out + row, -1)
        tl.store(context_lens_out + row, 0)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int, device: torch.device):
        self.batch_sizes = padded_batch_sizes(max_batch_size)
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_batch_size, **long)
        self.positions = torch.zeros(max_batch_size, **long)
        self.slot_mapping = torch.full((max_batch_size,), -1, **long)
        self.context_lens = torch.zeros(max_batch_size, **long)
        self.block_tables = torch.zeros(max_batch_size, max_blocks_per_seq, **long)
        lm_head = model.lm_head
        self.logits = torch.empty(max_batch_size, lm_head.weight.shape[0], dtype=lm_head.weight.dtype, device=device)
        self.tokens = torch.zeros(max_batch_size, **long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.batch_sizes):  # largest first: the smaller graphs fit in its memory pool
                self._forward(model, size)  # compiles kernels first
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(model, size)
                pool = graph.pool()
                self.graphs[size] = graph

    def _forward(self, model: torch.nn.Module, size: int) -> None:
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                                 context_lens=self.context_lens[:size])
        hidden = model(self.input_ids[:size], self.positions[:size], meta)
        model.lm_head(hidden, out=self.logits[:size])
        model.lm_head.argmax(self.logits[:size], out=self.tokens[:size])

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.batch_sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            context_lens: torch.Tensor, block_tables: torch.Tensor, previous_tokens: torch.Tensor | None):
        """One decode step of len(input_ids) sequences (block_tables: [n, width], contiguous). Returns this rank's
        logits and the greedy tokens, views of static buffers that the next replay overwrites."""
        n, width = block_tables.shape
        size = next(b for b in self.batch_sizes if b >= n)
        has_previous = previous_tokens is not None
        _stage_inputs_kernel[(size,)](
            input_ids, positions, slot_mapping, context_lens, block_tables,
            previous_tokens if has_previous else input_ids, self.input_ids, self.positions, self.slot_mapping,
            self.context_lens, self.block_tables, n, width, self.block_tables.stride(0), HAS_PREVIOUS=has_previous,
            BLOCK=128)
        self.graphs[size].replay()
        return self.logits[:n], self.tokens[:n]
