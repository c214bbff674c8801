"""Fixed-size KV-cache blocks: a free list and a block table per sequence. A block can be shared (a request's
sequences share their prompt's full blocks): reference-counted, free when no sequence holds it."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    def blocks_needed(self, seq: Sequence) -> int:
        """Blocks missing for the KV of all of seq's tokens (the last one included)."""
        return max(0, -(-len(seq) // self.block_size) - len(seq.block_table))

    def fork_blocks_needed(self, seq: Sequence) -> int:
        """Blocks the siblings still to be forked from seq will take: each its copy of the prompt's last,
        partial block (full blocks are shared)."""
        return seq.unforked if seq.num_prompt_tokens % self.block_size else 0

    def can_allocate(self, seq: Sequence, extra: int = 0) -> bool:
        return self.blocks_needed(seq) + extra <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        for _ in range(self.blocks_needed(seq)):
            seq.block_table.append(self._take())

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Gives child parent's prompt blocks: the full ones shared, the partial last one copied. Returns that
        copy (source block, destination block), for the model runner to make, or None."""
        full = parent.num_prompt_tokens // self.block_size
        child.block_table = parent.block_table[:full]
        for block in child.block_table:
            self.ref_counts[block] += 1
        if parent.num_prompt_tokens % self.block_size == 0:
            return None
        child.block_table.append(self._take())
        return parent.block_table[full], child.block_table[-1]

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.ref_counts[block] -= 1
            if not self.ref_counts[block]:
                self.free_blocks.append(block)
        seq.block_table = []

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    @property
    def usage(self) -> float:
        return 1 - len(self.free_blocks) / self.num_blocks
