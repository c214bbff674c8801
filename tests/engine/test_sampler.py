"""The sampler on hand-made distributions."""
import math

import torch

from rayprism.engine.sampler import Sampler
from rayprism.engine.sampling import SamplingParams
from rayprism.engine.sequence import PENDING, Sequence

PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])


def draw(params: SamplingParams, n: int = 2000) -> torch.Tensor:
    """Token frequencies over n draws from PROBS (one batch of n identical rows)."""
    sampler = Sampler(torch.device("cpu"), seed=0)
    seqs = [Sequence(str(i), [0], params, i) for i in range(n)]
    tokens = sampler(PROBS.log().expand(n, -1), seqs)
    return torch.bincount(tokens, minlength=4).float() / n


def test_temperature_one_follows_the_distribution():
    freqs = draw(SamplingParams(temperature=1.0))
    assert torch.allclose(freqs, PROBS, atol=0.04), freqs


def test_top_k_and_top_p_cut_the_tail():
    assert draw(SamplingParams(temperature=1.0, top_k=2))[2:].sum() == 0
    # Nucleus 0.5: 0.4 alone is short of it, so the second token is kept and the rest dropped.
    freqs = draw(SamplingParams(temperature=1.0, top_p=0.5))
    assert freqs[2:].sum() == 0 and math.isclose(freqs[0], 0.4 / 0.7, abs_tol=0.04)


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    # Threshold 0.6 * 0.4 = 0.24: the two most likely tokens stay, renormalised.
    freqs = draw(SamplingParams(temperature=1.0, min_p=0.6))
    assert freqs[2:].sum() == 0 and math.isclose(freqs[0], 0.4 / 0.7, abs_tol=0.04)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(min_p=0.3), SamplingParams()]
    probs = logits.softmax(dim=-1)
    expected = logits.clone()
    expected[0][probs[0] < 0.3 * probs[0].max()] = float("-inf")
    assert torch.equal(Sampler._filter(logits, params), expected)


def test_low_temperature_sharpens_and_zero_is_greedy():
    assert draw(SamplingParams(temperature=0.05))[0] > 0.99
    assert draw(SamplingParams(temperature=0.0))[0] == 1.0


def test_seeded_rows_ignore_their_neighbours():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(3, 1000)
    def run(rows):
        seqs = [Sequence(str(i), [0], SamplingParams(temperature=1.0, seed=i), i) for i in rows]
        return [sampler(logits[rows], seqs).tolist() for _ in range(3)]
    alone = run([1])
    together = run([0, 1, 2])
    assert [t[1] for t in together] == [t[0] for t in alone]


def test_sharded_greedy_argmax_equals_argmax_of_the_whole_rows(monkeypatch):
    """ParallelLMHead.argmax on the CPU, two ranks simulated in turn: rank 1's candidates are what rank 0's
    all-reduce adds to its own. Ties across chunks and ranks resolve to the first index, as torch.argmax does,
    and the last rank's padding column (vocab 4999 over 2 ranks) never wins."""
    from rayprism.engine import comm, layers

    from .interpreted_kernels import planted_logits

    vocab, world = 4999, 2
    logits = planted_logits(5, vocab, torch.Generator().manual_seed(4))
    logits[4] = -1.0
    heads, slices = [], []
    for rank in range(world):
        monkeypatch.setattr(layers, "tp_rank", lambda rank=rank: rank)
        monkeypatch.setattr(layers, "tp_size", lambda: world)
        head = layers.ParallelLMHead(vocab, 8)
        padded = torch.zeros(5, head.rows_per_rank)
        mine = logits[:, head.vocab_start:head.vocab_start + head.rows_per_rank]
        padded[:, :mine.shape[1]] = mine
        heads.append(head)
        slices.append(padded)
    captured = {}
    monkeypatch.setattr(layers, "tp_rank", lambda: 1)
    monkeypatch.setattr(comm, "all_reduce", lambda c: captured.setdefault("rank1", c.clone()))
    heads[1].argmax(slices[1])
    monkeypatch.setattr(layers, "tp_rank", lambda: 0)
    monkeypatch.setattr(comm, "all_reduce", lambda c: c + captured["rank1"])
    tokens = heads[0].argmax(slices[0])
    assert tokens.tolist() == logits.argmax(dim=-1).tolist() == [5, 2500, vocab - 1, 0, 0]


def sequence(prompt: list[int], output: list[int], params: SamplingParams, pending_row: int | None = None):
    """A sequence with `output` generated; with pending_row, one more output token still on the device (row
    pending_row of the previous step's tokens)."""
    seq = Sequence("s", prompt, params, 0)
    seq.token_ids += output
    if pending_row is not None:
        seq.token_ids.append(PENDING)
        seq.num_pending, seq.pending_row = 1, pending_row
    return seq


def processed(logits: torch.Tensor, seqs: list[Sequence], previous: torch.Tensor | None = None) -> torch.Tensor:
    before = logits.clone()
    out = Sampler(torch.device("cpu"), seed=0, eos_token_ids={2})._process(logits, seqs, previous)
    assert torch.equal(logits, before)  # out of place: logprobs read the model's own logits
    return out


def test_repetition_penalty_matches_a_plain_reference():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seqs = [sequence([1, 2, 2], [3, 40], SamplingParams(repetition_penalty=1.7), pending_row=1),
            sequence([1, 2], [5], SamplingParams()),
            sequence([7], [8, 8, 9], SamplingParams(repetition_penalty=0.5))]
    expected = logits.clone()
    for row, (seen, p) in enumerate([([1, 2, 3, 40, 11], 1.7), ([7, 8, 9], 0.5)]):
        row = 2 * row  # rows 0 and 2; row 1 uses no processor
        values = expected[row, seen]
        expected[row, seen] = torch.where(values > 0, values / p, values * p)
    assert torch.allclose(processed(logits, seqs, torch.tensor([0, 11])), expected)


def test_presence_and_frequency_penalties_match_a_plain_reference():
    """OpenAI's formula over output tokens only (the prompt's do not count), after the repetition penalty."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    seqs = [sequence([4, 4, 6], [6, 6, 7], SamplingParams(presence_penalty=0.5, frequency_penalty=1.5), 0),
            sequence([4], [6, 4], SamplingParams(repetition_penalty=2.0, presence_penalty=-1.0))]
    expected = logits.clone()
    for token, count in {6: 2, 7: 1, 12: 1}.items():
        expected[0, token] -= 0.5 + 1.5 * count
    for token in (4, 6):
        value = expected[1, token]
        expected[1, token] = (value / 2 if value > 0 else value * 2) + 1.0
    assert torch.allclose(processed(logits, seqs, torch.tensor([12])), expected)


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    seqs = [sequence([1], [5], SamplingParams(min_tokens=3, stop_token_ids=[7, 99]), 0),  # 2 so far: masked
            sequence([1], [5, 6], SamplingParams(min_tokens=3, stop_token_ids=[7]), 0),   # 3 so far: free
            sequence([1], [], SamplingParams(min_tokens=1, ignore_eos=True, stop_token_ids=[9])),
            sequence([1], [], SamplingParams())]
    expected = logits.clone()
    expected[0, [2, 7]] = float("-inf")  # 99 is past the vocabulary
    expected[2, 9] = float("-inf")
    assert torch.equal(processed(logits, seqs, torch.tensor([3])), expected)


def test_logit_bias_adds_to_the_listed_tokens_before_the_penalties():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4))
    seqs = [sequence([1], [], SamplingParams(logit_bias={3: 100.0, 4: -50.0, 6: 2.0}, frequency_penalty=1.0), 0),
            sequence([1], [], SamplingParams())]
    expected = logits.clone()
    expected[0, [3, 4, 6]] += torch.tensor([100.0, -50.0, 2.0])
    expected[0, 6] -= 1.0  # the pending output token (row 0 of the previous step's: token 6)
    assert torch.allclose(processed(logits, seqs, torch.tensor([6])), expected)
