"""LLMEngine: request bookkeeping, scheduling, sampling and detokenisation on tensor-parallel rank 0.

Single-threaded: callers serialise add_request/step/abort (the server drives it from one loop).

Steps are pipelined one deep: step() launches the next forward pass, with sampling on the device, before it
reads back the previous pass's tokens, so the host's work (scheduling, batching, detokenising, stop checks)
runs while the device computes. A decoding sequence's next input is then its previous token still on the
device (sequence.PENDING in token_ids until read). A sequence that stops on a token (EOS, a stop string)
has already been given one more step, whose token is dropped; length limits are known ahead and cost nothing.

Structured output (structured.py) gives up the overlap where it must: a grammar's mask for the next token
needs its matcher to have taken the previous token, so a step that samples for a structured sequence whose
token is pending finishes the step in flight first (after launching its own forward pass, which still overlaps
that work). Other steps keep the overlap.

One request never takes the others down: if sampling or detokenising raises for one sequence, that request
ends with finish_reason "error" (the traceback is logged here) and the rest of the batch goes on. Errors of
the batch as a whole (the forward pass) still propagate: the replica is then dead.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, GenerationConfig

from .block_manager import BlockManager
from .config import EngineConfig
from .loader import resolve_model_path
from .model_runner import Batch, ModelRunner
from .sampler import Sampler
from .sampling import InvalidRequestError, SamplingParams
from .scheduler import Scheduler
from .sequence import PENDING, Sequence, SequenceStatus
from .structured import Grammars

log = logging.getLogger(__name__)

# Prompt tokens decoded together with the first output tokens, so that tokenizers which drop a leading
# space when decoding a lone token (sentencepiece) still produce the right text.
DETOKENIZE_CONTEXT = 5


@dataclass
class RequestOutput:
    """What one step added to one sequence of a request (a request of n or best_of > 1 has several, by index)."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool  # the request: every one of its sequences has finished
    finish_reason: str | None  # this sequence's: "stop" | "length" | "abort" | "error" (see _fail) | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[dict] | None
    index: int = 0
    cumulative_logprob: float | None = None  # of the sampled tokens, when best_of > n (to pick the best n)
    prompt_logprobs: list[dict | None] | None = None  # once, with the first output of sequence 0


@dataclass
class LaunchedStep:
    """A forward pass queued on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    token_ids: torch.Tensor  # host memory (pinned on CUDA), filled once `sampled` has passed
    sampled: torch.cuda.Event | None  # None on the CPU, where the tokens are there at once
    logits: torch.Tensor | None  # kept only when a sequence asked for logprobs
    sampling_logprobs: torch.Tensor | None = None  # of the sampled tokens (Sampler.sample), where asked; host


class LLMEngine:
    def __init__(self, config: EngineConfig, model_runner: ModelRunner | None = None):
        self.config = config
        self.runner = model_runner or ModelRunner(config)
        self.hf_config = self.runner.hf_config
        self.max_model_len = self.runner.max_model_len
        tokenizer_path = (
            resolve_model_path(config.tokenizer, config.revision) if config.tokenizer else self.runner.model_path
        )
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.eos_token_ids = self._eos_token_ids()
        blocks = BlockManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, blocks, self.max_model_len)
        self.sampler = Sampler(self.runner.device, config.seed, self.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, self.eos_token_ids)  # structured output's compiled grammars
        self.requests: dict[str, Sequence] = {}
        self.ended: list[Sequence] = []  # aborted or failed: their last (empty) output goes out with the next step
        self.in_flight: LaunchedStep | None = None
        self.ready: list[RequestOutput] = []  # outputs of a step finished outside step() (see _drain)
        self._arrivals = itertools.count()
        self.sleeping = False
        self.num_steps = self.num_prefill_steps = 0  # steps run; those that prefilled (some also decode)

    def _eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        try:  # Llama 3 and others list several end tokens in generation_config.json
            eos = GenerationConfig.from_pretrained(self.runner.model_path).eos_token_id
        except OSError:
            eos = None
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    # --- requests -----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        params.validate()
        vocab_size = self.hf_config.vocab_size
        if any(token >= vocab_size for token in params.logit_bias):
            raise InvalidRequestError("logit_bias", f"token ids must be in [0, {vocab_size})")
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            token_ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < vocab_size for t in token_ids):
                raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab_size})")
        if not token_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if params.num_sequences > self.config.max_num_seqs:   # its sequences must all run at once
            raise InvalidRequestError("best_of" if params.best_of else "n",
                                      f"at most max_num_seqs={self.config.max_num_seqs} sequences per request")
        if len(token_ids) > self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}"
            )
        # A schema, regex or grammar that does not compile is refused here, before the request is queued.
        matcher = self.grammars.matcher(params.structured) if params.structured is not None else None
        seq = Sequence(request_id, token_ids, params, next(self._arrivals))
        seq.matcher = matcher
        blocks = self.scheduler.block_manager
        if blocks.blocks_needed(seq) + blocks.fork_blocks_needed(seq) > blocks.num_blocks:
            raise InvalidRequestError("best_of" if params.best_of else "n",
                                      f"{params.num_sequences} sequences of this prompt do not fit the KV cache")
        seq.prefix_offset = max(0, len(token_ids) - DETOKENIZE_CONTEXT)
        seq.read_offset = len(token_ids)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        self._end(request_id, "abort")  # unknown or already finished: nothing to do

    def _fail(self, seq: Sequence) -> None:
        """Ends a request whose processing raised (call it in the except block: it logs the traceback)."""
        log.exception("request %s failed in the engine; the other requests go on", seq.request_id)
        self._end(seq.request_id, "error")

    def _end(self, request_id: str, reason: str) -> None:
        """Finishes every unfinished sequence of a request; their last (empty) outputs go with the next step."""
        seq = self.requests.pop(request_id, None)
        for member in seq.group if seq else ():
            if member.finish_reason is None:
                self.scheduler.finish(member, reason)
                member.matcher = None  # structured output's state: not needed any more
                self.ended.append(member)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self.ended or self.ready)

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.scheduler.block_manager.usage,
            "block_size": self.config.block_size,   # these two for vLLM's cache_config_info metric
            "num_kv_blocks": self.scheduler.block_manager.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "num_prefill_steps": self.num_prefill_steps,
            # Prompt tokens of admitted sequences looked up in the prefix cache, and those found there (not computed).
            "prefix_cache_queries": self.scheduler.block_manager.num_queried_tokens,
            "prefix_cache_hits": self.scheduler.block_manager.num_hit_tokens,
        }

    # --- stepping -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch the next forward pass, then finish the previous one (its outputs are returned)."""
        outputs = self.ready + [self._output(seq, [], "", None) for seq in self.ended]
        self.ready, self.ended = [], []
        if self.sleeping:  # requests wait (none are lost) until wake_up
            return outputs
        launched = self._launch()
        previous, self.in_flight = self.in_flight, launched  # None where _launch has finished it (_drain)
        if previous is not None:
            self.ready += self._finish(previous)
        outputs += self.ready
        self.ready = []
        return outputs

    def _launch(self) -> LaunchedStep | None:
        seqs, num_prefill = self.scheduler.schedule()
        if not seqs:
            return None
        self.num_steps += 1
        self.num_prefill_steps += num_prefill > 0
        previous_rows = len(self.in_flight.seqs) if self.in_flight else 0
        prefilled = seqs[:num_prefill]
        # The sequences that get a token this step: decodes, and prefills whose last chunk this is.
        sampling = [seq for seq in prefilled if seq.samples] + seqs[num_prefill:]
        prompt_logits = any(seq.wants_prompt_logprobs for seq in prefilled)
        forking = [seq for seq in sampling if seq.unforked]
        # Greedy steps take their tokens from the model runner (argmax on every rank, no logits gathered).
        greedy = not (any(seq.params.needs_logits for seq in sampling) or prompt_logits or forking)
        batch = Batch.from_sequences(seqs, num_prefill, self.config.block_size, previous_rows, greedy)
        # Where the penalties find a pending token. A request with a logits processor is in no greedy step, so
        # its pending token is a sampled step's, never in the decode graphs' buffer that this step overwrites.
        previous = self.runner.previous_tokens
        result = self.runner.call("execute_model", batch.pack())
        logits = None if greedy else result
        if prompt_logits:
            logits = self._take_prompt_logprobs(logits, prefilled)
        for seq in seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
        if forking:
            sampling, logits = self._fork(sampling, forking, logits)
        if self.in_flight is not None and any(seq.matcher is not None and seq.num_pending for seq in sampling):
            self._drain()  # structured output: the grammars take the pending tokens before they mask (docstring)
        if greedy or not sampling:  # nothing to sample: only chunks before their prompt's last
            token_ids = result if greedy else torch.empty(0, dtype=torch.long, device=self.runner.device)
            sampling_logprobs = None
        else:
            token_ids, sampling_logprobs = self._sample(logits, sampling, previous)
        self.runner.previous_tokens = token_ids  # the next batch's pending inputs name rows of it
        sampled = None
        if token_ids.is_cuda:  # a copy and an event: reading them back will not wait for later steps
            host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            token_ids = host.copy_(token_ids, non_blocking=True)
            if sampling_logprobs is not None:
                sampling_logprobs = sampling_logprobs.to("cpu", non_blocking=True)
            sampled = torch.cuda.Event()
            sampled.record()
        for row, seq in enumerate(sampling):
            if seq.status is SequenceStatus.FINISHED:
                continue  # ended by the step that _drain finished above: this row's token is dropped
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
            seq.pending_row = row
        wants_logprobs = any(seq.params.logprobs is not None or seq.params.ranks_sequences for seq in sampling)
        return LaunchedStep(sampling, token_ids, sampled, logits if wants_logprobs else None, sampling_logprobs)

    def _take_prompt_logprobs(self, logits: torch.Tensor, prefilled: list[Sequence]) -> torch.Tensor:
        """Adds to the prompt logprobs of the sequences that asked those of this step's tokens (before their
        num_computed_tokens moves on), from the logits of their every new token; returns the logits with one row per
        sampling sequence left, as sampling takes them. A prompt prefilled in chunks gets its logprobs chunk by chunk;
        they go out with its first output."""
        rows, start = [], 0
        for seq in prefilled:
            if seq.wants_prompt_logprobs:
                begin, num_tokens = seq.num_computed_tokens, seq.num_scheduled_tokens
                # Row p predicts token p + 1; the first token has none, the last row samples the first output.
                predicted = seq.token_ids[begin + 1: min(begin + num_tokens + 1, seq.num_prompt_tokens)]
                if begin == 0:
                    seq.prompt_logprobs = [None]
                if predicted:
                    seq.prompt_logprobs += self.sampler.token_logprobs(
                        logits[start: start + len(predicted)], predicted, seq.params.prompt_logprobs)
                if seq.samples:
                    seq.wants_prompt_logprobs = False
                    rows.append(start + num_tokens - 1)
                start += num_tokens
            elif seq.samples:
                rows.append(start)
                start += 1
        return logits[rows + list(range(start, len(logits)))]

    def _fork(self, seqs: list[Sequence], forking: list[Sequence], logits: torch.Tensor
              ) -> tuple[list[Sequence], torch.Tensor]:
        """The siblings of requests of n or best_of > 1, forked from their first sequence as its prefill's last
        chunk is launched: they share its prompt's KV blocks and sample their first tokens from its logits row. The
        scheduler reserved their seats and blocks."""
        children, rows, copies = [], list(range(len(seqs))), []
        for parent in forking:
            row = seqs.index(parent)
            for index in range(1, parent.unforked + 1):
                child = parent.fork(index)
                if (copy := self.scheduler.block_manager.fork(parent, child)) is not None:
                    copies.append(copy)
                self.scheduler.add_running(child)
                children.append(child)
                rows.append(row)
            parent.unforked = 0
        if copies:   # queued after this step's prefill, which wrote the blocks copied
            self.runner.call("copy_blocks", copies)
        return seqs + children, logits[rows]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], previous: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampler.sample's tokens and sampling logprobs."""
        try:
            return self.sampler.sample(logits, seqs, previous)
        except Exception:  # noqa: BLE001 - find the request at fault: sample row by row, fail the rows that raise
            rows, row_logprobs = [], []
            for row, seq in enumerate(seqs):
                try:
                    tokens, logprob = self.sampler.sample(logits[row: row + 1], [seq], previous)
                except Exception:  # noqa: BLE001
                    self._fail(seq)
                    tokens, logprob = logits[row: row + 1].argmax(dim=-1), None  # keeps the other rows in place
                rows.append(tokens)
                row_logprobs.append(logprob if logprob is not None else torch.full((1,), float("nan"),
                                                                                   device=logits.device))
            return torch.cat(rows), torch.cat(row_logprobs)

    def _finish(self, step: LaunchedStep) -> list[RequestOutput]:
        """Read back a launched step's tokens (waits for that step only) and turn them into outputs."""
        token_ids = self._read_tokens(step)
        sampling_logprobs = step.sampling_logprobs.tolist() if step.sampling_logprobs is not None else None
        logprobs = (self.sampler.logprobs(step.logits, token_ids, step.seqs, sampling_logprobs)
                    if step.logits is not None else None)
        outputs = []
        for row, (seq, token_id) in enumerate(zip(step.seqs, token_ids)):
            if seq.status is SequenceStatus.FINISHED:
                continue  # aborted, failed, or stopped by its previous token while this step was in flight
            try:
                outputs.append(self._advance(seq, token_id, logprobs[row] if logprobs else None))
            except Exception:  # noqa: BLE001
                self._fail(seq)
        return outputs

    def _advance(self, seq: Sequence, token_id: int, token_logprobs: dict | None) -> RequestOutput:
        """Take a sampled token into its sequence: stop conditions, text, and the request's output."""
        seq.token_ids[seq.num_known_tokens] = token_id
        seq.num_pending -= 1
        if seq.matcher is not None and not seq.matcher.accept(token_id):  # its mask allowed it: a bug if so
            raise RuntimeError(f"the structured output's grammar refused the sampled token {token_id}")
        if token_logprobs and seq.params.ranks_sequences:
            seq.cumulative_logprob += token_logprobs["logprob"]
        if seq.params.logprobs is None:   # computed for the ranking only
            token_logprobs = None
        text_start = len(seq.output_text)
        new_text = self._process_token(seq, token_id)
        if token_logprobs:  # where the token's text begins in the output's (a stop string may have cut it off)
            token_logprobs = {**token_logprobs, "text_offset": min(text_start, len(seq.output_text))}
        if seq.finish_reason:
            seq.drop_pending()
            self.scheduler.finish(seq, seq.finish_reason)
            seq.matcher = None
            if seq.request_finished:
                del self.requests[seq.request_id]
        # token_logprobs is None for requests that did not ask
        return self._output(seq, [token_id], new_text, [token_logprobs] if token_logprobs else None)

    @staticmethod
    def _read_tokens(step: LaunchedStep) -> list[int]:
        if step.sampled is not None:
            step.sampled.synchronize()  # that step only (tolist() on a device tensor waits for the whole stream)
        return step.token_ids.tolist()

    def _drain(self) -> None:
        """Finish the step in flight now (before the running set changes); its outputs go out with step()'s (this
        one's where step() is running: _launch)."""
        if self.in_flight is not None:
            step, self.in_flight = self.in_flight, None
            self.ready += self._finish(step)

    def _process_token(self, seq: Sequence, token_id: int) -> str:
        """Detokenise, apply the stop conditions (sets seq.finish_reason) and return the text to emit."""
        params = seq.params
        if (token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
                or (seq.matcher is not None and seq.matcher.terminated)):  # a grammar ends on an EOS token
            seq.finish_reason = "stop"  # the stop token's own text is not part of the output
        else:
            delta = self._detokenize(seq)
            seq.output_text += delta
            if params.stop and delta:
                start = max(0, len(seq.output_text) - len(delta) - max(map(len, params.stop)) + 1)
                hits = [(i, s) for i, s in ((seq.output_text.find(s, start), s) for s in params.stop) if i >= 0]
                if hits:
                    index, stop = min(hits)
                    end = index + len(stop) if params.include_stop_str_in_output else index
                    seq.output_text = seq.output_text[:end]
                    seq.finish_reason = "stop"
        if not seq.finish_reason and seq.reaches_length_limit(seq.num_known_tokens, self.max_model_len):
            seq.finish_reason = "length"
        # While running, hold back text that could be the start of a stop string.
        hold = 0 if seq.finish_reason or not params.stop else max(map(len, params.stop)) - 1
        end = max(seq.num_emitted_chars, len(seq.output_text) - hold)
        new_text = seq.output_text[seq.num_emitted_chars: end]
        seq.num_emitted_chars = end
        return new_text

    def _detokenize(self, seq: Sequence) -> str:
        """Text added by the newest token; waits while the bytes decode to an incomplete character."""
        ids = seq.token_ids[: seq.num_known_tokens]
        options = dict(skip_special_tokens=seq.params.skip_special_tokens,
                       spaces_between_special_tokens=seq.params.spaces_between_special_tokens)
        before = self.tokenizer.decode(ids[seq.prefix_offset: seq.read_offset], **options)
        after = self.tokenizer.decode(ids[seq.prefix_offset:], **options)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return after[len(before):]
        return ""

    @staticmethod
    def _output(seq: Sequence, token_ids: list[int], text: str, logprobs) -> RequestOutput:
        prompt_logprobs = None
        if not seq.wants_prompt_logprobs:  # all of them, once (a prompt prefilled in chunks gets them chunk by chunk)
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=token_ids,
            new_text=text,
            finished=seq.request_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            logprobs=logprobs,
            index=seq.index,
            cumulative_logprob=seq.cumulative_logprob if seq.params.ranks_sequences else None,
            prompt_logprobs=prompt_logprobs,
        )

    # --- weights and memory -------------------------------------------------------------------------
    def load_weights(self, model: str, revision: str | None = None) -> None:
        """All ranks reload from disk; running requests are recomputed with the new weights."""
        self.runner.call("load_weights", model, revision)
        self.reset_prefix_cache()

    def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full HF-named tensors; every rank keeps its slice (the same loaders as disk loading)."""
        if self.runner.world_size > 1:  # tensors travel to the other ranks pickled over gloo
            named_tensors = [(name, t.detach().cpu()) for name, t in named_tensors]
        self.runner.call("load_named_tensors", named_tensors)
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget every KV block computed so far: no cached prefix is reused, and running requests go back to be
        recomputed (prompt + tokens so far). Every weight load ends here (load_weights, update_weights_from_tensors,
        the worker's update from a trainer: a new way of loading weights must call it too), and so does sleep, which
        frees the KV cache: KV computed with other weights, or freed, must never be read again."""
        self._drain()
        self.scheduler.preempt_all()
        self.scheduler.block_manager.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache and offload the weights (level 1) or drop them (level 2; ModelRunner.sleep); running
        requests resume (recomputed) once wake_up has restored both."""
        self.reset_prefix_cache()
        self.runner.call("sleep", level)
        self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """tags: "weights", "kv_cache" or both (None), restored separately so that new weights can be loaded
        before the KV cache takes its memory back."""
        self.runner.call("wake_up", tags)
        self.sleeping = bool(self.runner.asleep)

    def shutdown(self) -> None:
        self.runner.call("shutdown")
