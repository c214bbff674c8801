"""Sampling on the device: logits processors (logit_bias, min_tokens, penalties, the structured-output grammar's
mask), greedy, temperature, min-p, top-k, top-p, per-request seeded generators, logprobs."""
from __future__ import annotations

import torch

from .sequence import Sequence, SequenceStatus
from .structured import apply_token_bitmask, fill_bitmask

# Logits divided by a smaller temperature can overflow float32 to inf (then softmax gives NaN); at 1e-3 the
# distribution is greedy for any practical purpose already.
MIN_TEMPERATURE = 1e-3


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: set[int] = frozenset()):
        self.device = device
        self.eos_token_ids = eos_token_ids  # what min_tokens holds back, with each request's stop_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for requests without a seed

    def generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        if seq.generator is None:  # a request's sequences (n > 1) each draw their own stream from its seed
            seed = (seq.params.seed + seq.index * 0x9E3779B97F4A7C15) % 2**64
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        return seq.generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], previous_tokens: torch.Tensor | None = None
                 ) -> torch.Tensor:
        return self.sample(logits, seqs, previous_tokens)[0]

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], previous_tokens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits: [batch, vocab] for the last token of each sequence. previous_tokens: the previous step's sampled
        tokens, where a sequence's newest token may still be pending. Returns the token ids, on the device and
        without waiting for it (a greedy batch issues no host-device copy at all), and where a sequence asked for
        logprobs, each row's logprob of its token under the distribution it was drawn from (after the logits
        processors, temperature, min-p, top-k and top-p: what an RL trainer's importance ratio needs; a greedy
        row's is under its processed logits)."""
        logits = self._process(logits.float(), seqs, previous_tokens)
        params = [s.params for s in seqs]
        sampled = logits.argmax(dim=-1)
        distribution = logits
        if any(p.temperature > 0 for p in params):
            temps = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], device=logits.device)
            filtered = self._filter(logits / temps[:, None], params)
            probs = filtered.softmax(dim=-1)
            # Exponential race (argmax of p / Exp(1)) draws from probs; each row uses its own generator
            # so a seeded request gets the same tokens whatever else is in the batch. Generators are all set
            # up before any draws: one that fails leaves the others' streams untouched.
            generators = [self.generator_for(seq) for seq in seqs]
            noise = torch.empty_like(probs)
            for row, generator in enumerate(generators):
                noise[row].exponential_(generator=generator)
            is_greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
            sampled = torch.where(is_greedy, sampled, (probs / noise).argmax(dim=-1))
            distribution = torch.where(is_greedy[:, None], logits, filtered) if is_greedy.any() else filtered
        if all(p.logprobs is None for p in params):
            return sampled, None
        return sampled, distribution.log_softmax(dim=-1).gather(-1, sampled[:, None]).squeeze(-1)

    def _process(self, logits: torch.Tensor, seqs: list[Sequence], previous_tokens: torch.Tensor | None
                 ) -> torch.Tensor:
        """The logits processors, on the rows that use one (a batch where none does costs nothing). Out of place:
        logprobs report the model's own distribution."""
        rows = [row for row, seq in enumerate(seqs) if seq.params.processes_logits]
        if not rows:
            return logits
        seqs = [seqs[row] for row in rows]
        rows = torch.tensor(rows, device=logits.device)
        processed = self._bias(logits[rows], seqs)
        # Rows whose grammar may allow only tokens that min_tokens holds back: kept as they are before that.
        structured = [row for row, seq in enumerate(seqs) if Sampler.constrained(seq)]
        unheld = processed.clone() if any(seqs[row].params.min_tokens for row in structured) else None
        processed = self._hold_back_stops(processed, seqs)
        if any(seq.params.penalizes for seq in seqs):
            processed = self._penalize(processed, seqs, previous_tokens)
        if structured:
            processed = self._constrain(processed, seqs, structured, unheld)
        return logits.index_copy(0, rows, processed)

    @staticmethod
    def constrained(seq: Sequence) -> bool:
        """Whether a grammar constrains this sequence's next token (structured output; not once it has ended)."""
        return seq.matcher is not None and seq.status is not SequenceStatus.FINISHED

    @staticmethod
    def _constrain(logits: torch.Tensor, seqs: list[Sequence], rows: list[int], unheld: torch.Tensor | None
                   ) -> torch.Tensor:
        """Structured output: -inf for the tokens each row's grammar does not allow next (engine/structured.py),
        last, so that nothing gives them back a probability. Where min_tokens held back every token the grammar
        allows (it can only end there), the grammar wins: that row's logits before min_tokens, masked."""
        matchers = [seqs[row].matcher for row in rows]
        bitmask = fill_bitmask(matchers, logits.device)
        masked = apply_token_bitmask(logits, bitmask, rows, matchers[0].vocab_size)
        if unheld is None:
            return masked
        fallback = apply_token_bitmask(unheld, bitmask, rows, matchers[0].vocab_size)
        return torch.where(torch.isneginf(masked).all(dim=-1, keepdim=True), fallback, masked)

    @staticmethod
    def _bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logit_bias: added to the listed tokens' logits (ids checked against the vocabulary by the engine).
        logits is the rows' own copy: changed in place."""
        entries = [(row, token) for row, seq in enumerate(seqs) for token in seq.params.logit_bias]
        if entries:
            rows, tokens = torch.tensor(entries, device=logits.device).T
            biases = [bias for seq in seqs for bias in seq.params.logit_bias.values()]
            logits[rows, tokens] += torch.tensor(biases, device=logits.device)
        return logits

    def _hold_back_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """min_tokens: EOS (unless ignored) and the stop token ids masked while a row has fewer output tokens
        (pending ones included). logits is the rows' own copy: masked in place."""
        vocab_size = logits.shape[-1]
        masked = [(row, token) for row, seq in enumerate(seqs)
                  if len(seq) - seq.num_prompt_tokens < seq.params.min_tokens
                  for token in {*seq.params.stop_token_ids, *(() if seq.params.ignore_eos else self.eos_token_ids)}
                  if token < vocab_size]
        if masked:
            rows, tokens = torch.tensor(masked, device=logits.device).T
            logits[rows, tokens] = float("-inf")
        return logits

    @staticmethod
    def _penalize(logits: torch.Tensor, seqs: list[Sequence], previous_tokens: torch.Tensor | None) -> torch.Tensor:
        """Repetition penalty (HF/vLLM): the logits of tokens in the prompt or output divided by the penalty where
        positive, multiplied where negative. Then OpenAI's: presence penalty once per token of the output,
        frequency penalty once per occurrence there, subtracted."""
        prompt_counts, output_counts = Sampler._token_counts(seqs, logits.shape[-1], logits.device, previous_tokens)
        penalties = torch.tensor([[seq.params.repetition_penalty, seq.params.presence_penalty,
                                   seq.params.frequency_penalty] for seq in seqs], device=logits.device)
        repetition, presence, frequency = penalties.T[:, :, None]
        seen = (prompt_counts + output_counts) > 0
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        return logits - presence * (output_counts > 0) - frequency * output_counts

    @staticmethod
    def _token_counts(seqs: list[Sequence], vocab_size: int, device: torch.device,
                      previous_tokens: torch.Tensor | None) -> torch.Tensor:
        """[2, rows, vocab]: how often each token occurs in each row's prompt (counted only where the repetition
        penalty reads it, else 0) and in its output; scattered on the device from one padded tensor of ids."""
        starts = [0 if seq.params.repetition_penalty != 1 else seq.num_prompt_tokens for seq in seqs]
        rows = []
        for seq, start in zip(seqs, starts):
            row = seq.token_ids[start:]
            if seq.num_pending:  # one step in flight at most: the newest token, still on the device
                row[-1] = -1 - seq.pending_row
            rows.append(row)
        width = max(map(len, rows))
        # Padded with vocab_size: a column past the vocabulary, cut off at the end.
        tokens = torch.tensor([row + [vocab_size] * (width - len(row)) for row in rows], dtype=torch.long,
                              device=device)
        num_prompt = torch.tensor([seq.num_prompt_tokens - start for seq, start in zip(seqs, starts)], device=device)
        is_output = (torch.arange(width, device=device)[None, :] >= num_prompt[:, None]).float()
        if previous_tokens is not None:  # -1 - r: row r of the previous step's tokens
            tokens = torch.where(tokens < 0, previous_tokens[(-1 - tokens).clamp(min=0)], tokens)
        counts = torch.zeros(2, len(seqs), vocab_size + 1, device=device)
        counts[0].scatter_add_(1, tokens, 1 - is_output)
        counts[1].scatter_add_(1, tokens, is_output)
        return counts[..., :vocab_size]

    @staticmethod
    def _filter(logits: torch.Tensor, params) -> torch.Tensor:
        """Mask logits below each row's min-p share of its top probability (first, as vLLM does), then those
        outside its top-k and top-p nucleus."""
        min_ps = [p.min_p for p in params]
        if any(min_ps):  # rows with min_p 0 keep every token
            probs = logits.softmax(dim=-1)
            threshold = torch.tensor(min_ps, device=logits.device)[:, None] * probs.amax(dim=-1, keepdim=True)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        top_ks = [p.top_k for p in params]
        top_ps = [p.top_p for p in params]
        if not any(top_ks) and all(p == 1.0 for p in top_ps):
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab_size = logits.shape[-1]
        ranks = torch.arange(vocab_size, device=logits.device)[None, :]
        k = torch.tensor([min(k, vocab_size) if k else vocab_size for k in top_ks], device=logits.device)[:, None]
        drop = ranks >= k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always survives
        drop |= mass_before >= torch.tensor(top_ps, device=logits.device)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)

    @staticmethod
    @torch.inference_mode()
    def logprobs(logits: torch.Tensor, token_ids: list[int], seqs: list[Sequence],
                 sampling_logprobs: list[float] | None = None) -> list[dict | None] | None:
        """Per row: the chosen token's logprob under the model's distribution and the top ones, for the sequences
        that asked or whose request ranks its sequences by their cumulative logprob (else None); with
        sampling_logprobs (of Sampler.sample), also its logprob under the sampling distribution."""
        wanted = [s.params.logprobs is not None or s.params.ranks_sequences for s in seqs]
        if not any(wanted):
            return None
        entries = Sampler.token_logprobs(logits, token_ids, [s.params.logprobs or 0 for s in seqs])
        if sampling_logprobs is not None:
            for entry, sampling_logprob in zip(entries, sampling_logprobs):
                entry["sampling_logprob"] = sampling_logprob
        return [entry if want else None for entry, want in zip(entries, wanted)]

    @staticmethod
    @torch.inference_mode()
    def token_logprobs(logits: torch.Tensor, token_ids: list[int], top_k: int | list[int]) -> list[dict]:
        """Per row of logits: the logprob of token_ids[row] under the model's distribution, its rank there (1 is
        the most likely) and the top_k most likely tokens' ({token id: logprob}); top_k per row or for all."""
        top_ks = top_k if isinstance(top_k, list) else [top_k] * len(token_ids)
        logprobs = logits.float().log_softmax(dim=-1)
        max_k = max(top_ks, default=0)
        top_values, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (None, None)
        chosen = logprobs.gather(-1, torch.tensor(token_ids, device=logits.device, dtype=torch.long)[:, None])
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        chosen = chosen.squeeze(-1).tolist()
        if max_k:
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        return [{"token_id": token, "logprob": chosen[row], "rank": ranks[row],
                 "top": dict(zip(top_ids[row][:k], top_values[row][:k])) if k else {}}
                for row, (token, k) in enumerate(zip(token_ids, top_ks))]
