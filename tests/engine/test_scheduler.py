"""The scheduler alone (no model): which sequences each step runs, prefilled or decoded."""
from __future__ import annotations

import pytest

from rayprism.engine.block_manager import BlockManager
from rayprism.engine.sampling import SamplingParams
from rayprism.engine.scheduler import Scheduler
from rayprism.engine.sequence import Sequence, SequenceStatus

BLOCK_SIZE = 4
MAX_MODEL_LEN = 64


def make_seq(name: str, num_tokens: int, arrival: int) -> Sequence:
    return Sequence(name, list(range(num_tokens)), SamplingParams(), arrival)


def run_step(scheduler: Scheduler) -> tuple[list[str], list[str]]:
    """One schedule, then what the engine does: each scheduled sequence's tokens are computed, and those that
    sample (a decode, a prefill's last chunk) get one new token. Returns the names (prefilled, decoded)."""
    seqs, num_prefill = scheduler.schedule()
    for seq in seqs:
        samples = seq.samples
        seq.num_computed_tokens += seq.num_scheduled_tokens
        if samples:
            seq.token_ids.append(0)
    return [s.request_id for s in seqs[:num_prefill]], [s.request_id for s in seqs[num_prefill:]]


@pytest.mark.parametrize(
    "num_blocks, max_num_seqs, token_budget, running, arriving, expected",
    [
        # A request that arrives while others decode joins their step instead of stopping them.
        (64, 8, 64, [3, 5], [6], (["new0"], ["run0", "run1"])),
        # Several arrivals fill the token budget left after one token per decoding sequence, in order (the third
        # one's first chunk takes the last 2 tokens).
        (64, 8, 12, [3, 5], [4, 4, 4], (["new0", "new1", "new2"], ["run0", "run1"])),
        # max_num_seqs counts the running ones.
        (64, 3, 64, [3, 5], [2, 2], (["new0"], ["run0", "run1"])),
        # No room in the KV pool for the prompt: the running ones decode alone.
        (4, 8, 64, [3, 5], [9], ([], ["run0", "run1"])),
        # Nothing running: a prefill-only step.
        (64, 8, 64, [], [3, 3], (["new0", "new1"], [])),
    ],
)
def test_mixed_steps(num_blocks, max_num_seqs, token_budget, running, arriving, expected):
    scheduler = Scheduler(max_num_seqs, token_budget, BlockManager(num_blocks, BLOCK_SIZE), MAX_MODEL_LEN)
    for i, n in enumerate(running):
        scheduler.add(make_seq(f"run{i}", n, i))
    assert run_step(scheduler) == ([f"run{i}" for i in range(len(running))], [])
    for i, n in enumerate(arriving):
        scheduler.add(make_seq(f"new{i}", n, len(running) + i))
    assert run_step(scheduler) == expected


def test_no_admission_in_a_step_that_preempted():
    # 3 blocks of 4: two prompts of 4 tokens fill two blocks; their 5th tokens need two more, only one is left.
    scheduler = Scheduler(8, 64, BlockManager(3, BLOCK_SIZE), MAX_MODEL_LEN)
    old, new = make_seq("old", 4, 0), make_seq("new", 4, 1)
    scheduler.add(old)
    scheduler.add(new)
    assert run_step(scheduler) == (["old", "new"], [])  # one block each
    scheduler.add(make_seq("late", 1, 2))
    assert run_step(scheduler) == ([], ["old"])          # old takes the free block; new is preempted
    assert scheduler.num_preemptions == 1
    assert new.status is SequenceStatus.WAITING and not new.block_table
    assert [s.request_id for s in scheduler.waiting] == ["new", "late"]  # the preempted one goes first


def test_a_sequence_whose_last_token_is_in_flight_is_not_decoded_again():
    # The engine appends each step's token before it is read back: at max_tokens or max_model_len that
    # token is the last, so the sequence sits out until the engine finishes it.
    scheduler = Scheduler(8, 128, BlockManager(64, BLOCK_SIZE), MAX_MODEL_LEN)
    short = Sequence("short", [1, 2], SamplingParams(max_tokens=1), 0)
    long = make_seq("long", MAX_MODEL_LEN - 1, 1)
    other = make_seq("other", 3, 2)
    for seq in (short, long, other):
        scheduler.add(seq)
    assert run_step(scheduler) == (["short", "long", "other"], [])
    assert run_step(scheduler) == ([], ["other"])


@pytest.mark.parametrize("prompt_lens", [[3], [3, 4], [5, 2, 7], [1, 1, 1, 1]])
def test_packed_batch_round_trips_with_every_field_aligned(prompt_lens):
    """What rank 0 broadcasts unpacks to the batch's fields, each starting 16-byte aligned whatever the odd sizes
    (Triton compiles a kernel per alignment of its pointers)."""
    from rayprism.engine.model_runner import PACK_HEADER, Batch, unpack

    manager = BlockManager(num_blocks=32, block_size=BLOCK_SIZE)
    seqs = [make_seq(f"s{i}", n, i) for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        manager.allocate(seq)
    seqs[0].num_scheduled_tokens = prompt_lens[0]
    num_prefill = 1  # the first is prefilled, the others decode their last token
    batch = Batch.from_sequences(seqs, num_prefill, BLOCK_SIZE)
    packed = batch.pack()
    num_tokens, n_prefill, num_decode, width = packed[:4].tolist()
    sizes = [num_tokens] * 3 + [n_prefill + 1, n_prefill + num_decode, num_decode, num_decode * width]
    data = packed[PACK_HEADER:].clone()  # a fresh (aligned) buffer, as on the device
    fields = unpack(data, sizes)
    assert [t.tolist() for t in fields[:4]] == [batch.input_ids, batch.positions, batch.slot_mapping, batch.cu_seqlens]
    assert fields[5].tolist() == batch.context_lens
    assert fields[6].view(num_decode, width).tolist() == batch.block_tables
    assert all(t.data_ptr() % 16 == 0 for t in fields)
