"""The sampler on hand-made distributions."""
import math

import torch

from rayprism.engine.sampler import Sampler
from rayprism.engine.sampling import SamplingParams
from rayprism.engine.sequence import Sequence

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
