"""Fixed-size KV-cache blocks: a free list and a block table per sequence. A block can be shared (a request's
sequences share their prompt's full blocks; with prefix caching, requests share the full blocks of a common
prefix): reference-counted, free when no sequence holds it.

Prefix caching: a full block is content-addressed by a hash chained over its tokens and the hash of the blocks
before it, so a hash names the whole prefix up to the block's end. A block is offered to the cache as soon as the
step that computes it is scheduled (a later step, or a sequence later in the same step, reads it after it is
written: every layer stores the step's K/V before it attends). Freed cached blocks keep their KV and stay findable
until they are taken again: the free list hands out blocks without a hash first, then cached ones least recently
used first. A later sequence with the same prefix takes them back instead of computing them.
"""
from __future__ import annotations

import array
import hashlib
from collections import OrderedDict

from .sequence import Sequence


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A block's hash. Cryptographic: a collision would serve one request another's KV (with Python's hash() that
    can be forced by a crafted prompt, vLLM's CVE-2025-25183)."""
    return hashlib.blake2b(parent + array.array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Unreferenced blocks in the order they are taken: those without a hash, then cached ones, least recently
        # used first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks  # of cached blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.num_queried_tokens = self.num_hit_tokens = 0  # tokens of admitted sequences looked up; found cached

    def blocks_needed(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Blocks missing for the KV of seq's first num_tokens tokens (default: all, the last one included)."""
        num_tokens = len(seq) if num_tokens is None else num_tokens
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def fork_blocks_needed(self, seq: Sequence) -> int:
        """Blocks the siblings still to be forked from seq will take: each its copy of the prompt's last,
        partial block (full blocks are shared)."""
        return seq.unforked if seq.num_prompt_tokens % self.block_size else 0

    def cached_prefix(self, seq: Sequence) -> list[int] | None:
        """The cached blocks holding the longest prefix of a waiting seq's full blocks; its last token is left out
        (the step that computes it gives the logits). None where nothing is looked up: prefix caching is off, or
        the sequence wants the logits of every prompt token (prompt_logprobs)."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return None
        num_blocks = min(seq.num_known_tokens, len(seq) - 1) // self.block_size
        self._hash_blocks(seq, num_blocks)
        blocks = []
        for block_hash in seq.block_hashes[:num_blocks]:
            if (block := self.cached.get(block_hash)) is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None, cached: list[int] | None = None,
                     extra: int = 0) -> bool:
        """Whether the blocks for seq's first num_tokens tokens fit, given its cached prefix blocks (those that are
        free count against the free list too) and `extra` more."""
        cached = cached or []
        revived = sum(1 for block in cached if not self.ref_counts[block])
        return self.blocks_needed(seq, num_tokens) - len(cached) + revived + extra <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int | None = None, cached: list[int] | None = None) -> None:
        """Blocks for seq's first num_tokens tokens: its cached prefix blocks (from cached_prefix, at admission)
        first. The full blocks among them are offered to the prefix cache."""
        if cached is not None:
            for block in cached:
                if not self.ref_counts[block]:
                    del self.free_blocks[block]
                self.ref_counts[block] += 1
            seq.block_table.extend(cached)
            seq.num_registered_blocks = len(cached)
            self.num_queried_tokens += len(seq)
            self.num_hit_tokens += len(cached) * self.block_size
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take())
        if self.enable_prefix_caching:
            self._register(seq, len(seq) if num_tokens is None else num_tokens)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Gives child parent's prompt blocks: the full ones shared, the partial last one copied. Returns that
        copy (source block, destination block), for the model runner to make, or None."""
        full = parent.num_prompt_tokens // self.block_size
        child.block_table = parent.block_table[:full]
        child.block_hashes = parent.block_hashes[:full]
        child.num_registered_blocks = min(parent.num_registered_blocks, full)
        for block in child.block_table:
            self.ref_counts[block] += 1
        if parent.num_prompt_tokens % self.block_size == 0:
            return None
        child.block_table.append(self._take())
        return parent.block_table[full], child.block_table[-1]

    def free(self, seq: Sequence) -> None:
        # Last blocks first: a sequence's later blocks are evicted before its earlier ones, which more requests share.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if not self.ref_counts[block]:
                self.free_blocks[block] = None
                if self.block_hashes[block] is None:  # no KV worth keeping: taken first
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their KV was computed with other weights, or freed)."""
        for block in self.cached.values():
            self.block_hashes[block] = None
        self.cached.clear()

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extends seq.block_hashes to (at least) its first num_blocks blocks, all of whose tokens are known."""
        size = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * size: (i + 1) * size]))

    def _register(self, seq: Sequence, num_tokens: int) -> None:
        """Offers the cache seq's full blocks among its first num_tokens tokens (those computed once this step has run)
        whose tokens are known (a token still pending on the device is offered by a later step). A prefix cached
        already in another block stays there."""
        num_blocks = min(num_tokens, seq.num_known_tokens) // self.block_size
        self._hash_blocks(seq, num_blocks)
        for i in range(seq.num_registered_blocks, num_blocks):
            block, block_hash = seq.block_table[i], seq.block_hashes[i]
            if block_hash not in self.cached and self.block_hashes[block] is None:
                self.cached[block_hash] = block
                self.block_hashes[block] = block_hash
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_blocks)

    def _take(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        if (block_hash := self.block_hashes[block]) is not None:  # evicted: the least recently used cached block
            del self.cached[block_hash]
            self.block_hashes[block] = None
        self.ref_counts[block] = 1
        return block

    @property
    def usage(self) -> float:
        """Share of blocks held by sequences (free cached blocks count as free: they are taken when needed)."""
        return 1 - len(self.free_blocks) / self.num_blocks
