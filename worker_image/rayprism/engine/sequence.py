"""A request's state inside the engine."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from .sampling import SamplingParams

if TYPE_CHECKING:
    from .structured import Matcher


# Stands in token_ids for a token sampled on the device and not yet read back (see LLMEngine.step).
PENDING = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int):
        self.request_id = request_id
        self.arrival = arrival  # order of admission; the newest are preempted first
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.index = 0  # among its request's sequences (n, best_of)
        self.group: list[Sequence] = [self]  # the request's sequences, this one included
        self.unforked = params.num_sequences - 1  # siblings to fork from this one's first prefill
        self.wants_prompt_logprobs = params.prompt_logprobs is not None  # cleared once computed
        self.prompt_logprobs: list[dict | None] | None = None  # computed, not yet sent
        self.cumulative_logprob = 0.0  # of the sampled tokens, kept when params.ranks_sequences
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Tokens whose KV is in the cache (or written by a step already launched): taken from the prefix cache or
        # computed. A (re)admitted sequence is prefilled up to num_prefill_tokens (its length then), over one or
        # more steps; each step computes num_scheduled_tokens more (the scheduler sets it).
        self.num_computed_tokens = 0
        self.num_prefill_tokens = 0
        self.num_scheduled_tokens = 0
        # Prefix caching (BlockManager): the chained hash of each full block of known tokens, and how many of this
        # sequence's blocks have been offered to the cache.
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.generator: torch.Generator | None = None  # per-request RNG when params.seed is set
        # Structured output: the grammar's state, past every token read back (kept across preemption).
        self.matcher: Matcher | None = None
        self.finish_reason: str | None = None
        self.num_pending = 0   # trailing PENDING tokens (one per step in flight)
        self.pending_row = 0   # the newest pending token's row in its step's sampled tokens
        # Incremental detokenisation state (see LLMEngine._detokenize).
        self.output_text = ""
        self.num_emitted_chars = 0
        self.prefix_offset = 0
        self.read_offset = 0

    def fork(self, index: int) -> Sequence:
        """A sibling of a sequence whose prompt was just prefilled: the same prompt (its KV blocks are shared by
        the block manager), no output yet."""
        child = Sequence(self.request_id, self.token_ids[: self.num_prompt_tokens], self.params, self.arrival)
        child.index, child.group, child.unforked, child.wants_prompt_logprobs = index, self.group, 0, False
        child.num_computed_tokens = child.num_prefill_tokens = self.num_prompt_tokens
        child.prefix_offset, child.read_offset = self.prefix_offset, self.read_offset
        child.matcher = self.matcher.fork() if self.matcher is not None else None  # at the grammar's start too
        self.group.append(child)
        return child

    @property
    def request_finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.group)

    def __len__(self) -> int:
        """Tokens in the KV cache once the steps in flight are done (pending ones included)."""
        return len(self.token_ids)

    @property
    def prefilling(self) -> bool:
        """Tokens before its newest one are still to be computed since its admission: it is prefilled this step,
        not decoded (a prompt's chunk, or a prompt, or after preemption prompt + outputs so far)."""
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def samples(self) -> bool:
        """This step's tokens reach its end, so the step samples its next token (a decode, a prefill's last chunk)."""
        return self.num_computed_tokens + self.num_scheduled_tokens >= len(self)

    @property
    def num_known_tokens(self) -> int:
        """Tokens read back to the host: the prompt and the output so far."""
        return len(self.token_ids) - self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return self.num_known_tokens - self.num_prompt_tokens

    def reaches_length_limit(self, num_tokens: int, max_model_len: int) -> bool:
        """Whether num_tokens of this sequence leave no room for another token (max_tokens or max_model_len).
        The engine finishes a sequence by it and the scheduler stops decoding one by it: they must agree."""
        return num_tokens - self.num_prompt_tokens >= self.params.max_tokens or num_tokens >= max_model_len

    def drop_pending(self) -> None:
        """Forget tokens of steps still in flight (the sequence has finished)."""
        del self.token_ids[self.num_known_tokens:]
        self.num_pending = 0
