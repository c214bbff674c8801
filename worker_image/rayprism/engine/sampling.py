"""Per-request sampling parameters and their validation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
# What torch.Generator.manual_seed takes; a negative seed counts modulo 2**64 (-1 is 2**64 - 1), so the
# signed 64-bit seeds other servers accept work too.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_N = 128  # sequences per request (n, best_of): each is a running sequence, a seat of max_num_seqs


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class InvalidRequestError(ValueError):
    """A request the engine refuses; `param` names the offending parameter."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class StructuredOutput:
    """Constrains a request's output to a grammar (engine/structured.py compiles it; sampling masks the rest).

    kind / value:
      "json_schema": a JSON schema dict (vLLM's guided_json, OpenAI's response_format json_schema);
      "json_object": any JSON object (OpenAI's response_format json_object); value None;
      "regex": a regular expression (str) the whole output matches;
      "choice": a list of strings, the output is exactly one of them;
      "grammar": an EBNF grammar in GBNF's dialect (llama.cpp's, as vLLM's guided_grammar takes with
        xgrammar), whose start rule is `root`.
    JSON comes out on one line, with the separators ", " and ": ".
    param: the request field it came from ("response_format", "guided_regex", ...), named by errors."""

    kind: str
    value: dict | str | list[str] | None
    param: str = "structured"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # a stop string that ends the output stays in its text
    skip_special_tokens: bool = True  # these two are passed to the tokenizer's decode of the output
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None  # None = off; k -> logprob of the sampled token + top k
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (1 = off)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logits of tokens in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per occurrence in the output
    min_p: float = 0.0  # sampling drops tokens less likely than min_p times the most likely one (0 = off)
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    structured: StructuredOutput | None = None  # None = unconstrained output
    n: int = 1  # sequences returned; they share the prompt's KV blocks (one prefill)
    best_of: int | None = None  # sequences generated (None: n); the n of highest cumulative logprob are returned
    prompt_logprobs: int | None = None  # None = off; k -> each prompt token's logprob + top k (the first: None)

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def num_sequences(self) -> int:
        return self.best_of or self.n

    @property
    def ranks_sequences(self) -> bool:
        """Whether the engine keeps each sequence's cumulative logprob (best_of > n picks the best by it)."""
        return self.num_sequences > self.n

    @property
    def processes_logits(self) -> bool:
        """Whether a logits processor changes this request's logits before sampling (Sampler._process)."""
        return self.penalizes or self.min_tokens > 0 or bool(self.logit_bias) or self.structured is not None

    @property
    def needs_logits(self) -> bool:
        """Whether sampling needs this request's logits (else the model runner's greedy tokens serve)."""
        return self.temperature > 0 or self.logprobs is not None or self.processes_logits or self.ranks_sequences

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be an integer > 0, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be 0 (disabled) or >= 1, got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and MIN_SEED <= self.seed <= MAX_SEED):
            raise InvalidRequestError("seed",
                                      f"must be None or an integer in [{MIN_SEED}, {MAX_SEED}], got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", f"must be token ids >= 0, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequestError("logprobs", f"must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequestError("prompt_logprobs",
                                      f"must be None or in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.best_of is not None and (not isinstance(self.best_of, int) or isinstance(self.best_of, bool)
                                         or not self.n <= self.best_of <= MAX_N):
            raise InvalidRequestError("best_of", f"must be an integer in [n={self.n}, {MAX_N}], got {self.best_of!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty < math.inf:
            raise InvalidRequestError("repetition_penalty",
                                      f"must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise InvalidRequestError(name, f"must be in [-2, 2], got {value!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}], "
                                                    f"got {self.min_tokens!r}")
        if not (isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES
                and all(isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
                        for t, b in self.logit_bias.items())):
            raise InvalidRequestError("logit_bias", f"must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids >= 0 to "
                                                    f"biases in [-100, 100], got {self.logit_bias!r}")
        if self.structured is not None:
            self._validate_structured(self.structured)

    @staticmethod
    def _validate_structured(structured: StructuredOutput) -> None:
        """The shape only: whether the schema, regex or grammar compiles is the engine's (structured.py) to say."""
        if not isinstance(structured, StructuredOutput):
            raise InvalidRequestError("structured", f"must be a StructuredOutput, got {structured!r}")
        param, kind, value = structured.param, structured.kind, structured.value
        if not isinstance(param, str) or not param:
            raise InvalidRequestError("structured", f"param must name the request field, got {param!r}")
        if kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(param, f"kind must be one of {', '.join(STRUCTURED_KINDS)}, got {kind!r}")
        expected = {
            "json_schema": ("a JSON schema object", isinstance(value, dict)),
            "json_object": ("None", value is None),
            "regex": ("a non-empty string", isinstance(value, str) and bool(value)),
            "choice": ("a non-empty list of strings", isinstance(value, list) and bool(value)
                       and all(isinstance(choice, str) for choice in value)),
            "grammar": ("a non-empty string", isinstance(value, str) and bool(value.strip())),
        }[kind]
        if not expected[1]:
            raise InvalidRequestError(param, f"{kind} must be {expected[0]}, got {value!r}")
