"""Continuous batching with chunked prefill: every step, each running sequence that has been prefilled decodes
one token, and the token budget left (max_num_batched_tokens less one per decode) goes to prefills, oldest first:
those under way, then waiting ones. A prompt longer than the budget is prefilled over several steps, in chunks,
each step mixed with the running decodes, so a long prompt does not stall every stream. A waiting sequence whose
prefix is in the prefix cache (block_manager.py) starts its prefill after it.

When the KV pool runs out, the newest running sequences are preempted: their blocks are freed and they go back
to the front of the queue, to be recomputed (prompt + tokens so far) later.
"""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 max_model_len: int):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], int]:
        """Return (sequences to run, how many of them, at the front, are prefilled); each one's
        num_scheduled_tokens says how many tokens the step computes for it, from its num_computed_tokens on.

        Decodes are never left out for a prefill (a sequence whose token is pending on the device must run in the
        next step: LLMEngine.step), so the budget bounds the prefill tokens only. Mixing them keeps the decode
        batch moving while requests arrive (a prefill alone reads all the weights, as a decode step does)."""
        blocks = self.block_manager
        budget = self.max_num_batched_tokens - sum(1 for seq in self.running if not seq.prefilling)
        decode, prefill = [], []
        preemptions = self.num_preemptions
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below to make room for an older sequence
            if seq.prefilling:
                num_tokens = min(seq.num_prefill_tokens - seq.num_computed_tokens, budget)
                if num_tokens <= 0:
                    continue  # the budget is spent: its next chunk waits a step
            elif seq.reaches_length_limit(len(seq), self.max_model_len):
                continue  # its last token is still in flight (LLMEngine.step): nothing more to compute
            else:
                num_tokens = 1
            end = seq.num_computed_tokens + num_tokens
            # Siblings to fork (n, best_of) take their blocks right after the prefill's last chunk (LLMEngine).
            extra = blocks.fork_blocks_needed(seq) if end == len(seq) else 0
            while not blocks.can_allocate(seq, end, extra=extra) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                self.num_preemptions += 1
            if not blocks.can_allocate(seq, end, extra=extra):
                self._preempt(seq)  # the newest left: wait until older sequences finish
                self.num_preemptions += 1
                continue
            blocks.allocate(seq, end)
            seq.num_scheduled_tokens = num_tokens
            if seq.prefilling:
                prefill.append(seq)
                budget -= num_tokens
            else:
                decode.append(seq)
        # After a preemption the pool is full: admitting anyone now would only preempt again.
        # A sequence with siblings to fork (n, best_of) reserves their seats now.
        seats = sum(1 + seq.unforked for seq in self.running)
        while self.waiting and self.num_preemptions == preemptions and budget > 0:
            seq = self.waiting[0]
            if seats + 1 + seq.unforked > self.max_num_seqs:
                break
            cached = blocks.cached_prefix(seq)
            start = len(cached or ()) * blocks.block_size
            num_tokens = min(len(seq) - start, budget)
            extra = blocks.fork_blocks_needed(seq) if start + num_tokens == len(seq) else 0
            if not blocks.can_allocate(seq, start + num_tokens, cached, extra):
                break
            self.waiting.popleft()
            blocks.allocate(seq, start + num_tokens, cached)
            seq.num_computed_tokens, seq.num_prefill_tokens, seq.num_scheduled_tokens = start, len(seq), num_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefill.append(seq)
            budget -= num_tokens
            seats += 1 + seq.unforked
        return prefill + decode, len(prefill)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (its blocks given by BlockManager.fork)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def preempt_all(self) -> None:
        """Send every running sequence back to be recomputed (after new weights, or to free the KV cache)."""
        for seq in reversed(list(self.running)):
            self._preempt(seq)
