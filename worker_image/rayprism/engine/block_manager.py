"""Fixed-size KV-cache blocks: a free list and a block table per sequence."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = deque(range(num_blocks))

    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks missing for the KV of all of seq's tokens (the last one included)."""
        return max(0, -(-len(seq) // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        for _ in range(self.blocks_needed(seq)):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    @property
    def usage(self) -> float:
        return 1 - len(self.free_blocks) / self.num_blocks
