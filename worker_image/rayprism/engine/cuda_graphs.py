"""Decode through CUDA graphs: one graph per padded batch size, captured once, replayed every step.

An eager decode step of an 8B model is launch-bound at small batches (hundreds of kernels, each launched
from Python); a replay issues the whole forward at once. Each graph reads its inputs from static buffers:
a step copies its batch into the first rows; padding rows get slot -1 (no KV write) and context length 0
(attention writes zeros), so they touch no sequence's cache.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, *range(16, max_batch_size + 1, 16)) if b <= max_batch_size]
    return sizes if sizes[-1] == max_batch_size else [*sizes, max_batch_size]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int, device: torch.device):
        self.batch_sizes = padded_batch_sizes(max_batch_size)
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_batch_size, **long)
        self.positions = torch.zeros(max_batch_size, **long)
        self.slot_mapping = torch.full((max_batch_size,), -1, **long)
        self.context_lens = torch.zeros(max_batch_size, **long)
        self.block_tables = torch.zeros(max_batch_size, max_blocks_per_seq, **long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.batch_sizes):  # largest first: the smaller graphs fit in its memory pool
                model(self.input_ids[:size], self.positions[:size], self._meta(size))  # compiles kernels first
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = model(self.input_ids[:size], self.positions[:size], self._meta(size))
                pool = graph.pool()
                self.graphs[size] = graph

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                                 context_lens=self.context_lens[:size])

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.batch_sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        size = next(b for b in self.batch_sizes if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.context_lens[:n].copy_(meta.context_lens)
        self.context_lens[n:size].zero_()
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.outputs[size][:n]
