"""Structured output: a request's StructuredOutput compiled, through xgrammar, into a grammar over the engine's
tokenizer; one matcher per sequence says which tokens may come next (a bitmask, applied by the sampler) and
takes each sampled token.

The grammar ends only with an EOS token of the engine, allowed only where the output is complete; once the
matcher has taken it (it has terminated), the sequence finishes with "stop". xgrammar was picked for its
per-step mask cost (bench/grammar_bench.py; bench/results/grammar-*.json).

JSON comes out compact (no whitespace but the separators' spaces), so no token with a raw control character
(U+0000-U+001F) can belong to it: such tokens are masked for the JSON kinds whatever the grammar says, since
xgrammar 0.2.9 lets them into strings with a minLength or maxLength (mlc-ai/xgrammar#800: invalid JSON).
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict

import torch

from .sampling import InvalidRequestError, StructuredOutput

CACHE_SIZE = 128  # compiled grammars kept (least recently used dropped first)
# xgrammar prefixes its errors with a timestamp and the C++ source line: "[07:08:29] /project/cpp/x.cc:94: ".
_ERROR_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size: int, allowed: torch.Tensor | None = None):
        self._matcher = matcher  # an xgrammar.GrammarMatcher
        self.vocab_size = vocab_size  # the tokenizer's: the bitmask's columns
        self._allowed = allowed  # int32 words ANDed into every mask (JSON: no raw control characters)

    def fork(self) -> Matcher:
        """An independent copy, in the same state (a request's n sequences each have their own)."""
        return Matcher(self._matcher.fork(), self.vocab_size, self._allowed)

    def accept(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """Whether the grammar's end (a stop token) has been accepted: nothing more may follow."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._allowed is not None:
            bitmask[row] &= self._allowed


class Grammars:
    """Compiles StructuredOutputs for one tokenizer (LRU-cached) and makes matchers of them."""

    def __init__(self, tokenizer, stop_token_ids: set[int], cache_size: int = CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.stop_token_ids = sorted(t for t in stop_token_ids if t < self.vocab_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._compiler = None  # built on the first structured request (about 0.2 s for a 50k vocabulary)
        self._json_tokens: torch.Tensor | None = None  # bitmask words: the tokens compact JSON may hold

    def matcher(self, structured: StructuredOutput) -> Matcher:
        import xgrammar

        compiled = self.compile(structured)
        allowed = self._json_tokens if structured.kind in ("json_schema", "json_object") else None
        return Matcher(xgrammar.GrammarMatcher(compiled), self.vocab_size, allowed)

    def compile(self, structured: StructuredOutput):
        """The xgrammar CompiledGrammar; InvalidRequestError(structured.param) if it does not compile."""
        kind, value = structured.kind, structured.value
        try:
            key = (kind, json.dumps(value))  # not sorted: a schema's property order is the output's
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(structured.param, f"invalid {kind.replace('_', ' ')}: {e}") from e
        compiled = self._cache.get(key)
        if compiled is None:
            try:
                compiled = self._compile(kind, value)
            except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError (and others) for bad input
                message = _ERROR_PREFIX.sub("", str(e).strip()) or type(e).__name__
                raise InvalidRequestError(structured.param, f"invalid {kind.replace('_', ' ')}: {message}") from e
            self._cache[key] = compiled
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return compiled

    def _compile(self, kind: str, value):
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.stop_token_ids)
            self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # our LRU bounds the memory
            control = re.compile(rb"[\x00-\x1f]")
            allowed = torch.tensor([not control.search(text) for text in info.decoded_vocab], dtype=torch.bool)
            allowed[self.stop_token_ids] = True
            self._json_tokens = pack_bits(allowed)
        compiler = self._compiler
        if kind == "json_schema":
            # One line: models small and large otherwise tend to run on in whitespace.
            return compiler.compile_json_schema(json.dumps(value), any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(value)
        if kind == "choice":  # GBNF string literals take JSON's escapes
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        if kind == "grammar":
            return compiler.compile_grammar(value)
        raise ValueError(f"unknown kind {kind!r}")


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """[tokens] bool -> [words] int32 bitmask (token t: bit t % 32 of word t // 32), xgrammar's layout."""
    bits = torch.nn.functional.pad(allowed, (0, -len(allowed) % 32)).view(-1, 32).long()
    words = (bits << torch.arange(32)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def fill_bitmask(matchers: list[Matcher], device: torch.device) -> torch.Tensor:
    """[len(matchers), words] int32 on `device`: bit t of row r (word t // 32, bit t % 32) is set where matcher r
    allows token t next. Filled on the host, then copied without waiting for the device (pinned memory)."""
    words = (matchers[0].vocab_size + 31) // 32
    bitmask = torch.empty(len(matchers), words, dtype=torch.int32, pin_memory=device.type == "cuda")
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask, row)
    return bitmask.to(device, non_blocking=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """logits with -inf where a row's bitmask does not allow a token (out of place): bitmask row i belongs to
    logits row rows[i]; tokens >= vocab_size (the tokenizer's; the logits may be wider, padded) are never allowed.
    """
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : min(vocab_size, logits.shape[-1])]
    allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[-1]))  # pads with False
    rows = torch.as_tensor(rows, device=logits.device)
    return logits.index_copy(0, rows, logits[rows].masked_fill(~allowed, float("-inf")))
