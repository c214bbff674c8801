"""LLM: the Python API over one model replica run by Ray workers (what RLHF frameworks and the server use).

    from rayprism import LLM, SamplingParams
    llm = LLM("builtin://smollm2-135m-instruct", tensor_parallel_size=2)
    print(llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))[0].text)
    llm.shutdown()
"""
from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import ray
import torch

from rayprism.engine import EngineConfig, RequestOutput, SamplingParams
from rayprism.executor import EngineDeadError, Placement, RayExecutor, weight_sync

__all__ = ["LLM", "SamplingParams", "CompletionOutput", "EngineDeadError", "RequestFailedError"]

Prompt = str | list[int]
DEFAULT_BUCKET_BYTES = 512 << 20   # per update_weights bucket: few Ray calls, bounded extra memory


class RequestFailedError(RuntimeError):
    """The engine failed on this request alone (its traceback is in rank 0's log); the replica serves on."""

    def __init__(self, request_id: str):
        super().__init__(f"request {request_id} failed in the engine")
        self.request_id = request_id


@dataclass
class CompletionOutput:
    """The whole result of one sequence of a request (a request of n > 1 has n of them, by index)."""
    request_id: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    logprobs: list[dict] | None = None
    cumulative_logprob: float | None = None   # when best_of > n
    prompt_logprobs: list[dict | None] | None = None   # the request's, when asked (the first prompt token: None)

    @property
    def sampling_logprobs(self) -> list[float] | None:
        """Per generated token (with SamplingParams.logprobs set): its logprob under the distribution it was
        sampled from (after temperature, top-k/top-p/min-p and the logits processors): an RL trainer's old
        policy logprobs."""
        return None if self.logprobs is None else [entry["sampling_logprob"] for entry in self.logprobs]

    @property
    def model_logprobs(self) -> list[float] | None:
        """Per generated token (with SamplingParams.logprobs set): its logprob under the model's own distribution."""
        return None if self.logprobs is None else [entry["logprob"] for entry in self.logprobs]

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        self.finish_reason = output.finish_reason
        self.num_prompt_tokens = output.num_prompt_tokens
        self.cumulative_logprob = output.cumulative_logprob
        if output.logprobs is not None:
            self.logprobs = (self.logprobs or []) + output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs


class RequestResult:
    """Collects a request's RequestOutputs into one CompletionOutput per sequence."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.sequences: dict[int, CompletionOutput] = {}

    def add(self, output: RequestOutput) -> None:
        self.sequences.setdefault(output.index, CompletionOutput(self.request_id, output.index)).add(output)

    def best(self, n: int) -> list[CompletionOutput]:
        """The n sequences returned: all of them in index order, or with best_of > n the n of highest cumulative
        logprob, best first and indexed again from 0. Each carries the request's prompt logprobs."""
        outputs = [self.sequences[index] for index in sorted(self.sequences)]
        prompt_logprobs = outputs[0].prompt_logprobs if outputs else None
        if len(outputs) > n:
            outputs = sorted(outputs, key=lambda output: -output.cumulative_logprob)[:n]
            for index, output in enumerate(outputs):
                output.index = index
        for output in outputs:
            output.prompt_logprobs = prompt_logprobs
        return outputs


class LLM:
    """One replica (tensor_parallel_size ranks, one Ray actor each).

    engine_args are EngineConfig fields (dtype, device, max_model_len, max_num_seqs, ...). Placement: pass
    `placement_group` + `bundle_indices` to use a group you own (e.g. colocated with a trainer); otherwise one
    bundle per rank is created with `placement_strategy`. With `name` (+ `namespace`, `detached=True`) the
    workers outlive this driver and `LLM.connect(name, namespace)` attaches to them later.
    """

    def __init__(self, model: str, *, orchestrator: str = "ray", ray_address: str | None = None,
                 placement_group=None, bundle_indices: Sequence[int] | None = None,
                 placement_strategy: str = "PACK", cpus_per_worker: float = 1, startup_timeout_s: float = 300,
                 name: str | None = None, namespace: str | None = None, detached: bool = False, **engine_args):
        if orchestrator != "ray":
            raise ValueError(f"orchestrator: only 'ray' is supported, got {orchestrator!r}")
        config = EngineConfig(model=model, **engine_args)
        _ensure_ray(ray_address)
        placement = Placement(placement_group, tuple(bundle_indices) if bundle_indices else None,
                              placement_strategy, cpus_per_worker, startup_timeout_s)
        self._executor = RayExecutor(config, placement, name=name, namespace=namespace, detached=detached)
        self.model, self.revision = model, config.revision
        self._tokenizer = None

    @classmethod
    def connect(cls, name: str, namespace: str | None = None, ray_address: str | None = None) -> "LLM":
        """Attaches to workers a previous driver started with `name` and `detached=True`."""
        _ensure_ray(ray_address)
        self = cls.__new__(cls)
        self._executor = RayExecutor.connect(name, namespace)
        self.model, self.revision = self._executor.info["model"], self._executor.info["revision"]
        self._tokenizer = None
        return self

    # ---- facts -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The engine's HF tokenizer (chat template included), fetched once from rank 0."""
        if self._tokenizer is None:
            self._tokenizer = ray.get(self._executor.workers[0].tokenizer.remote())
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._executor.info["max_model_len"]

    @property
    def model_type(self) -> str:
        """The model's architecture family, as its config.json names it ("llama", "qwen2", ...)."""
        return self._executor.info["model_type"]

    @property
    def tensor_parallel_size(self) -> int:
        return self._executor.world_size

    def stats(self) -> dict:
        """Latest engine stats (num_running, num_waiting, kv_cache_usage, num_preemptions) and num_aborted."""
        return {**self._executor.stats, "num_aborted": self._executor.num_aborted}

    def num_in_flight(self) -> int:
        return self._executor.num_in_flight()

    def check_health(self) -> None:
        """Raises EngineDeadError unless every worker answers."""
        self._executor.check_health()

    def check_alive(self) -> None:
        """Raises EngineDeadError once the replica has failed for good (a worker died or stopped answering, the
        engine's step loop died) or was shut down. Calls no worker: the executor's monitor pings them."""
        self._executor._raise_if_unusable()

    def worker_leaving(self) -> tuple[str, str] | None:
        """(why, Ray node id) once the pod of one of its workers is being stopped by Kubernetes: the engine still
        serves, and should move to other workers (a new LLM) before that node goes."""
        return self._executor.leaving

    def memory(self) -> list[dict]:
        """Per rank: process RSS and (on CUDA) allocated/reserved device memory."""
        return self._executor.memory()

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """Blocks until every prompt is finished; results come in the order of the prompts, each prompt's n
        sequences together (see RequestResult.best). A prompt is text or token ids; each result has the generated
        token_ids, their logprobs where params.logprobs is set (sampling_logprobs, model_logprobs) and the
        finish_reason ("stop", "length", or "abort" after abort_all(), with the tokens generated until then)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = _params_per_prompt(params, len(prompts))
        results = queue.SimpleQueue()
        outputs = {}
        for prompt, sampling in zip(prompts, params_list):
            request_id = self._executor.new_request_id()
            outputs[request_id] = RequestResult(request_id)
            try:
                self._executor.add_request(request_id, prompt, sampling,
                                           lambda item, rid=request_id: results.put((rid, item)))
            except BaseException:
                self._abort_all(outputs)
                raise
        remaining = len(outputs)
        while remaining:
            request_id, item = results.get()
            if isinstance(item, BaseException) or item.finish_reason == "error":
                self._abort_all(outputs)
                raise _error(request_id, item)
            outputs[request_id].add(item)
            remaining -= item.finished
        return [output for result, sampling in zip(outputs.values(), params_list) for output in result.best(sampling.n)]

    def _abort_all(self, outputs: dict) -> None:
        for request_id in outputs:
            self._executor.abort(request_id)

    async def generate_async(self, prompt: Prompt, params: SamplingParams | None = None, *, stream: bool = False,
                             request_id: str | None = None) -> AsyncIterator[RequestOutput | CompletionOutput]:
        """stream=True yields each RequestOutput increment (of each sequence, by index); stream=False yields the
        request's n CompletionOutputs at the end (see RequestResult.best).
        Closing the iterator early (aclose(), e.g. through contextlib.aclosing) or cancelling the task aborts
        the request; an iterator merely dropped is aborted when Python finalises it."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def sink(item):
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:   # the caller's loop is gone; its request was abandoned
                pass

        request_id = request_id or self._executor.new_request_id()
        params = _params_per_prompt(params, 1)[0]
        self._executor.add_request(request_id, prompt, params, sink)
        result = RequestResult(request_id)
        finished = False
        try:
            while not finished:
                item = await items.get()
                if isinstance(item, BaseException) or item.finish_reason == "error":
                    finished = True
                    raise _error(request_id, item)
                result.add(item)
                finished = item.finished
                if stream:
                    yield item
            if not stream:
                for output in result.best(params.n):
                    yield output
        finally:
            if not finished:
                self._executor.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends one request: its caller gets what was generated so far, finish_reason "abort"."""
        self._executor.abort(request_id, notify=True)

    def abort_all(self) -> None:
        """Ends every request of this driver, as abort() does each (an RL rollout cut short)."""
        self._executor.abort_all()

    def pause(self) -> None:
        """Generation stops between two steps (requests are kept, new ones queue) until resume()."""
        self._executor.pause()

    def resume(self) -> None:
        self._executor.resume()

    # ---- weights -----------------------------------------------------------------------------------
    def update_weights(self, weights: str | Iterable[tuple[str, torch.Tensor]] | None = None,
                       revision: str | None = None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       cuda_ipc: bool = True) -> None:
        """New weights on every rank; requests in flight are paused while they change and then recomputed on them.

        weights: a path or model URI to reload from disk (default: this LLM's, with `{revision}` filled), or
        (name, tensor) pairs as a trainer holds them (HF checkpoint names, full tensors: each rank keeps its
        tensor-parallel slice), sent in buckets of bucket_bytes; CUDA tensors go as CUDA IPC handles where
        cuda_ipc (the trainer must then share the workers' GPU), else through host memory."""
        if weights is None or isinstance(weights, str):
            model = weights or self.model
            self._executor.load_weights(model, revision)
            self.model, self.revision = model, revision
            return
        if revision is not None:
            raise ValueError("revision: names a checkpoint on disk; it does not apply to tensors")
        self._executor.update_weights_from_buckets(weight_sync.weight_buckets(weights, bucket_bytes, cuda_ipc))

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (each weight update does this itself); running requests are recomputed."""
        self._executor.reset_prefix_cache()

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                 backend: str | None = None, group_name: str = "rayprism-weights") -> None:
        """Every worker joins a process group with a trainer (rank 0 there, hosting the store at
        master_address:master_port) as rank `rank_offset + tp_rank`. Blocks until all members joined, so the
        trainer calls `rayprism.executor.weight_sync.weight_update_group(..., rank=0, ...)` concurrently."""
        backend = backend or ("nccl" if self._executor.info["device"] == "cuda" else "gloo")
        self._executor.init_weight_update_group(master_address, master_port, rank_offset, world_size,
                                                backend, group_name)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence, shapes: Sequence) -> None:
        """Receives full (unsharded, HF-named) tensors the trainer broadcasts from rank 0 of the weight update
        group, in this order; each rank keeps its slice. Requests in flight are paused, not lost."""
        self._executor.update_weights_from_distributed(list(names), list(dtypes), [list(s) for s in shapes])

    # ---- memory and lifetime -----------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Frees device memory for a colocated trainer; requests wait until wake_up() restored it all.
        Level 1: the KV cache is dropped, the weights move to host memory; level 2: both are dropped (load new
        weights after wake_up(["weights"]))."""
        self._executor.sleep(level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Restores "weights", "kv_cache" or both (None). verl's order: wake_up(["weights"]), update_weights(...),
        wake_up(["kv_cache"])."""
        self._executor.wake_up(list(tags) if tags is not None else None)

    def shutdown(self) -> None:
        """Stops every worker actor and removes the placement group this LLM created."""
        self._executor.shutdown()

    def disconnect(self) -> None:
        """Leaves named, detached workers running (and their requests unanswered) for `LLM.connect`."""
        self._executor.disconnect()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _error(request_id: str, item: RequestOutput | BaseException) -> BaseException:
    return item if isinstance(item, BaseException) else RequestFailedError(request_id)


def _params_per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * count
    if len(params) != count:
        raise ValueError(f"params: got {len(params)} SamplingParams for {count} prompts")
    for sampling in params:
        sampling.validate()
    return list(params)


def _ensure_ray(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address)
