"""A request's state inside the engine."""
from __future__ import annotations

import enum

import torch

from .sampling import SamplingParams


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
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.generator: torch.Generator | None = None  # per-request RNG when params.seed is set
        self.finish_reason: str | None = None
        # Incremental detokenisation state (see LLMEngine._detokenize).
        self.output_text = ""
        self.num_emitted_chars = 0
        self.prefix_offset = 0
        self.read_offset = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]
