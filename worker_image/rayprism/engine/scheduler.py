"""Continuous batching: every running sequence decodes one token per step, and waiting ones are prefilled in
the same step when they fit.

When the KV pool runs out during decode, the newest running sequences are preempted: their blocks are
freed and they go back to the front of the queue, to be recomputed (prompt + tokens so far) later.
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
        """Return (sequences to run, how many of them, at the front, are prefilled).

        Every running sequence decodes one token; waiting ones are prefilled in the same step when the token
        budget, max_num_seqs and the KV pool allow. Mixing them keeps the decode batch moving while requests
        arrive one by one (a prefill alone reads all the weights, as a decode step does)."""
        decode = []
        preemptions = self.num_preemptions
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below to make room for an older sequence
            if seq.reaches_length_limit(len(seq), self.max_model_len):
                continue  # its last token is still in flight (LLMEngine.step): nothing more to compute
            while not self.block_manager.can_allocate(seq) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                self.num_preemptions += 1
            if not self.block_manager.can_allocate(seq):
                self._preempt(seq)  # the newest left: wait until older sequences finish
                self.num_preemptions += 1
                continue
            self.block_manager.allocate(seq)
            decode.append(seq)
        prefill, num_tokens = [], len(decode)
        # After a preemption the pool is full: admitting anyone now would only preempt again.
        # A sequence with siblings to fork (n, best_of) needs their seats and their blocks now (LLMEngine forks them
        # right after this step's prefill).
        while self.waiting and self.num_preemptions == preemptions:
            seq = self.waiting[0]
            if (len(self.running) + 1 + seq.unforked > self.max_num_seqs
                    or num_tokens + len(seq) > self.max_num_batched_tokens
                    or not self.block_manager.can_allocate(seq, self.block_manager.fork_blocks_needed(seq))):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefill.append(seq)
            num_tokens += len(seq)
        return prefill + decode, len(prefill)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (its blocks given by BlockManager.fork)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
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
