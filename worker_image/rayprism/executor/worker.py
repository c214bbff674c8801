"""RayGPUWorker: one Ray actor per model rank.

Rank 0 owns the LLMEngine and steps it in a background thread; each step broadcasts its schedule to the
other ranks through torch.distributed (the engine does that), so Ray carries only request submissions and
one batch of outputs per poll. Ranks > 0 run ModelRunner.serve_forever() in a thread.
The actor is threaded (max_concurrency > 1) so a long poll does not block submissions or health pings.
Only the step loop's thread touches the engine: submissions, weight loads and pauses are tasks it runs
between two steps, so none waits behind a busy loop (a lock would be re-taken by the loop step after step).
"""
from __future__ import annotations

import os
import socket
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from rayprism.engine import EngineConfig, InvalidRequestError, LLMEngine, ModelRunner
from rayprism.executor import weight_sync

# Ranks > 0 wait in a collective for rank 0's next command for as long as the replica is idle, so the
# default group must not time out; a dead peer closes its sockets and the collective fails at once.
_DIST_TIMEOUT = timedelta(days=365)
_IDLE_WAIT_S = 0.5
# The file a worker pod's preStop hook creates when Kubernetes stops the pod (the operator renders both): the
# head's server then drains and moves its engine to other workers before this pod's ranks go.
POD_TERMINATING_FILE_ENV = "RAYPRISM_POD_TERMINATING_FILE"


class RayGPUWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self._runner: ModelRunner | None = None
        self._engine: LLMEngine | None = None
        self._device = torch.device("cpu")
        self._fatal: str | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tasks: list[Callable[[], None]] = []  # run by the step loop between steps
        self._tasks_lock = threading.Lock()
        self._pauses = 0          # pause() calls not yet resumed (a driver's, a weight update's): the loop stops stepping
        self._has_work = threading.Event()
        self._outputs_ready = threading.Condition()
        self._outputs: list = []
        self._weight_group = None

    # ---- setup -------------------------------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port for the torch.distributed TCP store that rank 0 hosts."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pod_terminating(self) -> bool:
        path = os.environ.get(POD_TERMINATING_FILE_ENV)
        return bool(path) and os.path.exists(path)

    def init_distributed(self, master_address: str, master_port: int, backend: str) -> None:
        if backend == "nccl":
            torch.cuda.set_device(0)   # Ray gives each actor its own CUDA_VISIBLE_DEVICES
        if self.world_size > 1:
            dist.init_process_group(backend, init_method=f"tcp://{master_address}:{master_port}",
                                    rank=self.rank, world_size=self.world_size, timeout=_DIST_TIMEOUT)

    def start(self, config: EngineConfig, num_threads: int | None = None) -> dict:
        """Loads this rank's weights; rank 0 builds the engine and starts stepping it."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self._runner = ModelRunner(config, rank=self.rank, world_size=self.world_size)
        if self.rank == 0:
            self._engine = LLMEngine(config, model_runner=self._runner)
            target = self._step_loop
        else:
            target = self._follow_rank0
        self._device = config.torch_device()
        self._thread = threading.Thread(target=target, name=f"rayprism-rank{self.rank}", daemon=True)
        self._thread.start()
        return self.info() if self.rank == 0 else {}

    def info(self) -> dict:
        engine = self._engine
        return {"world_size": self.world_size, "max_model_len": engine.max_model_len, "device": self._device.type,
                "model": engine.config.model, "revision": engine.config.revision,
                "model_type": engine.hf_config.model_type}

    def tokenizer(self):
        return self._engine.tokenizer

    # ---- the loops ---------------------------------------------------------------------------------
    def _step_loop(self) -> None:
        try:
            while not self._stopping:
                self._has_work.clear()  # before the checks below: a later set() ends the idle wait
                with self._tasks_lock:
                    tasks, self._tasks = self._tasks, []
                for task in tasks:
                    task()
                busy = not self._pauses and not self._engine.sleeping and self._engine.has_unfinished_requests()
                outputs = self._engine.step() if busy else None
                if outputs:
                    with self._outputs_ready:
                        self._outputs.extend(outputs)
                        self._outputs_ready.notify_all()
                if not busy:
                    self._has_work.wait(_IDLE_WAIT_S)
        except BaseException:  # noqa: BLE001 - any failure makes the replica unhealthy; the driver reports it
            self._set_fatal(f"engine step failed on rank 0:\n{traceback.format_exc()}")

    def _in_loop(self, fn: Callable[[], object]):
        """Run fn on the step loop's thread before its next step; return its result or raise its error."""
        future: Future = Future()

        def task() -> None:
            try:
                future.set_result(fn())
            except Exception as err:  # noqa: BLE001 - raised to the caller below
                future.set_exception(err)

        with self._tasks_lock:
            self._tasks.append(task)
        self._has_work.set()
        while True:
            try:
                return future.result(timeout=_IDLE_WAIT_S)
            except TimeoutError:
                if self._fatal is not None or not self._thread.is_alive():
                    raise RuntimeError(self._fatal or "the engine loop has stopped") from None

    def _follow_rank0(self) -> None:
        try:
            self._runner.serve_forever()
        except BaseException:  # noqa: BLE001
            if not self._stopping:
                self._set_fatal(f"rank {self.rank} model runner failed:\n{traceback.format_exc()}")

    def _set_fatal(self, message: str) -> None:
        self._fatal = message
        with self._outputs_ready:
            self._outputs_ready.notify_all()

    # ---- requests (rank 0) -------------------------------------------------------------------------
    def submit(self, adds: list[tuple], aborts: list[str]) -> list[tuple[str, str | None, str]]:
        """Adds (request_id, prompt, params) and aborts ids. Returns (request_id, param, message) per rejected
        request; param is None for an internal error (InvalidRequestError itself does not unpickle)."""
        def apply() -> list[tuple[str, str | None, str]]:
            rejected = []
            for request_id, prompt, params in adds:
                try:
                    self._engine.add_request(request_id, prompt, params)
                except InvalidRequestError as err:
                    rejected.append((request_id, err.param, str(err).removeprefix(f"{err.param}: ")))
                except Exception as err:  # noqa: BLE001 - reported to that request's caller
                    rejected.append((request_id, None, f"{type(err).__name__}: {err}"))
            for request_id in aborts:
                self._engine.abort(request_id)
            return rejected

        return self._in_loop(apply)

    def poll(self, timeout_s: float) -> tuple[list, dict, str | None]:
        """Every output produced since the last poll (waits up to timeout_s for one), engine stats, fatal error."""
        with self._outputs_ready:
            if not self._outputs and self._fatal is None:
                self._outputs_ready.wait(timeout_s)
            outputs, self._outputs = self._outputs, []
        return outputs, self._engine.stats(), self._fatal

    def ping(self) -> str | None:
        return self._fatal

    # ---- weights and memory (rank 0 drives every rank through the engine) -------------------------
    def load_weights(self, model: str, revision: str | None) -> None:
        self._in_loop(lambda: self._engine.load_weights(model, revision))  # requests stay in the engine

    def pause(self) -> None:
        """Returns between two steps; the loop then stays idle (still taking submissions and aborts) until every
        pause has been resumed (a driver's pause and a weight update's nest)."""
        def pause() -> None:
            self._pauses += 1

        self._in_loop(pause)

    def resume(self) -> None:
        def resume() -> None:
            self._pauses = max(0, self._pauses - 1)

        self._in_loop(resume)

    def sleep(self, level: int) -> None:
        """Requests wait (the loop does not step a sleeping engine) until wake_up has restored everything."""
        self._in_loop(lambda: self._engine.sleep(level))

    def wake_up(self, tags: list[str] | None) -> None:
        self._in_loop(lambda: self._engine.wake_up(tags))

    # ---- weight sync from a trainer (every rank) ---------------------------------------------------
    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int, backend: str, group_name: str) -> None:
        self._weight_group = weight_sync.weight_update_group(
            master_address, master_port, rank_offset + self.rank, world_size, backend, group_name)

    def receive_weights(self, names: list[str], dtypes: list, shapes: list) -> None:
        """Rank 0 is paused by the driver first, so no forward pass runs on any rank while weights change."""
        if self._weight_group is None:
            raise RuntimeError("init_weight_update_group must be called before update_weights_from_distributed")
        self._runner.load_named_tensors(
            weight_sync.receive_broadcast(self._weight_group, names, dtypes, shapes, self._device))

    def load_weight_bucket(self, bucket: list[tuple[str, object]]) -> None:
        """One bucket of full HF-named tensors (weight_sync.weight_buckets: host tensors or CUDA IPC handles);
        this rank keeps its slices. Paused by the driver first, as receive_weights."""
        self._runner.load_named_tensors(weight_sync.open_bucket(bucket, self._runner.device))

    def reset_prefix_cache(self) -> None:
        """Rank 0: no KV computed so far is read again (running requests are recomputed); after every weight
        update, through the engine's one place for it."""
        self._in_loop(self._engine.reset_prefix_cache)

    # ---- teardown ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Rank 0: stops stepping and tells ranks > 0 to leave serve_forever."""
        self._stopping = True
        self._has_work.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._engine is not None and self._fatal is None:
            self._engine.shutdown()

    def memory(self) -> dict:
        """Process RSS and device memory, for leak checks across weight updates."""
        import psutil
        usage = {"rss_bytes": psutil.Process(os.getpid()).memory_info().rss}
        if torch.cuda.is_available():
            usage["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            usage["cuda_reserved_bytes"] = torch.cuda.memory_reserved()
        return usage
