"""RayExecutor: places one RayGPUWorker per rank, wires torch.distributed among them, and moves requests
and outputs between the driver and the rank-0 engine in batches.

Driver threads: the submitter sends every request/abort queued since its last call in one Ray call; the
poller long-polls rank 0 for all outputs since the previous poll (one Ray call per engine step at most, for
the whole batch); the monitor pings every worker so a dead one fails the replica within seconds. A worker
that is alive but slow to answer (a loaded machine, a long weight load holding its process) is waited for,
with warnings, up to _SILENT_LIMIT_S before the replica counts as dead.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayprism.engine import EngineConfig, InvalidRequestError, RequestOutput
from rayprism.executor.worker import RayGPUWorker

log = logging.getLogger(__name__)

# A sink receives each RequestOutput of its request, or one exception that ends the request.
Sink = Callable[[RequestOutput | BaseException], None]

_POLL_TIMEOUT_S = 0.5
# At most one poll per 10 ms: each Ray call costs rank 0's process GIL time that the step loop needs, so
# polling after every step cost 14-21% of tokens/s on an H200 vs 5-7% at 10 ms (bench/results/
# executor_overhead-poll-interval-cuda.json); streamed tokens arrive up to 10 ms later in exchange.
_MIN_POLL_INTERVAL_S = 0.01
_HEALTH_INTERVAL_S = 1.0
_HEALTH_TIMEOUT_S = 5.0
# A live worker silent this long is hung: the replica is dead (and /live tells the kubelet to restart it).
_SILENT_LIMIT_S = 30.0
_ACTOR_CONCURRENCY = 8   # poll, submit, ping and admin calls run side by side on a worker


class EngineDeadError(RuntimeError):
    """The replica cannot serve: a worker died, did not answer, or the engine failed."""


class _Silent(EngineDeadError):
    """A worker did not answer in time (it may be alive, only slow)."""


@dataclass(frozen=True)
class Placement:
    """Where the ranks go. Give an existing placement group (e.g. shared with a trainer) and one bundle index
    per rank, or leave it empty to create a group of one bundle per rank."""
    placement_group: PlacementGroup | None = None
    bundle_indices: tuple[int, ...] | None = None
    strategy: str = "PACK"                # for a created group: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    cpus_per_worker: float = 1
    timeout_s: float = 300


class RayExecutor:
    def __init__(self, config: EngineConfig, placement: Placement = Placement(), *, name: str | None = None,
                 namespace: str | None = None, detached: bool = False):
        if detached and not name:
            raise ValueError("detached workers need a name so a later driver can find them")
        self.world_size = config.tensor_parallel_size
        self.name, self.namespace = name, namespace
        use_gpu = _use_gpu(config.device, self.world_size)
        self._owned_pg, pg, bundle_indices = self._placement(placement, use_gpu, name, detached)
        self.workers = []
        try:
            self._create_workers(pg, bundle_indices, use_gpu, placement.cpus_per_worker, name, namespace, detached)
            workers = self.workers
            master = ray.get(workers[0].rendezvous_address.remote())
            ray.get([w.init_distributed.remote(*master, "nccl" if use_gpu else "gloo") for w in workers])
            self.info = ray.get([w.start.remote(config) for w in workers])[0]
        except BaseException:
            self._kill_workers(self.workers)
            if self._owned_pg is not None:
                remove_placement_group(self._owned_pg)
            raise
        self._start_threads()

    @classmethod
    def connect(cls, name: str, namespace: str | None = None) -> "RayExecutor":
        """Attaches to the named (detached) workers another driver created."""
        self = cls.__new__(cls)
        self.name, self.namespace = name, namespace
        rank0 = ray.get_actor(f"{name}-rank0", namespace=namespace)
        self.info = ray.get(rank0.info.remote())
        self.world_size = self.info["world_size"]
        self.workers = [rank0] + [ray.get_actor(f"{name}-rank{r}", namespace=namespace)
                                  for r in range(1, self.world_size)]
        try:
            self._owned_pg = get_placement_group(f"{name}-pg")
        except ValueError:
            self._owned_pg = None
        self._start_threads()
        return self

    # ---- placement ---------------------------------------------------------------------------------
    def _placement(self, placement: Placement, use_gpu: bool, name: str | None, detached: bool):
        if placement.placement_group is not None:
            indices = placement.bundle_indices or tuple(range(self.world_size))
            if len(indices) != self.world_size:
                raise ValueError(f"bundle_indices: need {self.world_size} (one per rank), got {len(indices)}")
            return None, placement.placement_group, indices
        bundle = {"CPU": placement.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy=placement.strategy,
                             name=f"{name}-pg" if name else "", lifetime="detached" if detached else None)
        ready, _ = ray.wait([pg.ready()], timeout=placement.timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise EngineDeadError(
                f"could not place {self.world_size} worker(s) of {bundle} ({placement.strategy}) within "
                f"{placement.timeout_s:.0f}s; the cluster has {ray.cluster_resources()}")
        return pg, pg, tuple(range(self.world_size))

    def _create_workers(self, pg, bundle_indices, use_gpu, cpus, name, namespace, detached) -> None:
        for rank, bundle in enumerate(bundle_indices):
            options = dict(num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_concurrency=_ACTOR_CONCURRENCY,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               pg, placement_group_bundle_index=bundle))
            if name:
                options.update(name=f"{name}-rank{rank}", namespace=namespace,
                               lifetime="detached" if detached else None)
            self.workers.append(ray.remote(RayGPUWorker).options(**options).remote(rank, self.world_size))

    # ---- driver threads ----------------------------------------------------------------------------
    def _start_threads(self) -> None:
        self.stats: dict = {}
        self._next_poll = 0.0
        self.num_aborted = 0        # requests the engine confirmed aborted
        self._error: EngineDeadError | None = None
        # (why, node id) once a worker's pod is stopping: the engine should move before that node goes.
        self.leaving: tuple[str, str] | None = None
        self._closed = False
        self._sinks: dict[str, Sink] = {}
        self._pending_adds: list[tuple] = []
        self._pending_aborts: list[str] = []
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._threads = [threading.Thread(target=fn, name=f"rayprism-{fn.__name__}", daemon=True)
                         for fn in (self._submitter, self._poller, self._monitor)]
        for thread in self._threads:
            thread.start()
        # A driver that exits without shutdown() or disconnect() still stops these threads before Ray's own exit
        # handler (registered by ray.init, earlier, so it runs later) tears down the core worker under them: a
        # daemon thread inside a Ray call during that teardown can crash the exiting driver (SIGSEGV).
        atexit.register(self.disconnect)

    def _submitter(self) -> None:
        while True:
            with self._lock:
                while not (self._pending_adds or self._pending_aborts or self._closed):
                    self._lock.wait()
                if self._closed:
                    return
                adds, self._pending_adds = self._pending_adds, []
                aborts, self._pending_aborts = self._pending_aborts, []
            try:
                rejected = ray.get(self.workers[0].submit.remote(adds, aborts))
            except Exception as err:  # noqa: BLE001
                self._fail(EngineDeadError(f"rank 0 worker did not take requests: {err}"))
                return
            for request_id, param, message in rejected:
                sink = self._take_sink(request_id)
                if sink is not None:
                    sink(InvalidRequestError(param, message) if param else RuntimeError(message))

    def _poller(self) -> None:
        while not self._closed:
            time.sleep(max(0.0, self._next_poll - time.monotonic()))
            self._next_poll = time.monotonic() + _MIN_POLL_INTERVAL_S
            try:
                # Waited for however slow (its outputs must not be lost), up to the silence limit.
                outputs, self.stats, fatal = self._answer(self.workers[0].poll.remote(_POLL_TIMEOUT_S), 0, "a poll",
                                                          _SILENT_LIMIT_S)
            except EngineDeadError as err:
                self._fail(err)
                return
            for output in outputs:
                self.num_aborted += output.finish_reason == "abort"
                with self._lock:
                    sink = (self._sinks.pop if output.finished else self._sinks.get)(output.request_id, None)
                if sink is not None:
                    sink(output)
            if fatal:
                self._fail(EngineDeadError(fatal))
                return

    def _monitor(self) -> None:
        while not self._closed and self._error is None:
            try:
                self._ping(_SILENT_LIMIT_S)
            except EngineDeadError as err:
                self._fail(err)
                return
            if self.leaving is None:
                self.leaving = self._pod_terminating()
            time.sleep(_HEALTH_INTERVAL_S)

    def _pod_terminating(self) -> tuple[str, str] | None:
        """(why, node id) once a worker's pod is being stopped (its preStop hook marked it); else None."""
        try:
            flags = ray.get([w.pod_terminating.remote() for w in self.workers], timeout=_HEALTH_TIMEOUT_S)
            rank = flags.index(True)
            node = ray.get(self.workers[rank].node_id.remote(), timeout=_HEALTH_TIMEOUT_S)
        except ValueError:
            return None
        except Exception:  # noqa: BLE001 - a worker that does not answer is the pings' business
            return None
        return f"the pod of worker rank {rank} is terminating", node

    def _ping(self, limit_s: float) -> None:
        refs = [w.ping.remote() for w in self.workers]
        for rank, ref in enumerate(refs):
            fatal = self._answer(ref, rank, "a health check", limit_s)
            if fatal:
                raise EngineDeadError(fatal)

    def _answer(self, ref, rank: int, what: str, limit_s: float):
        """A worker's answer: EngineDeadError at once if it died, _Silent once it has not answered for limit_s."""
        waited = 0.0
        while True:
            try:
                return ray.get(ref, timeout=_HEALTH_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                waited += _HEALTH_TIMEOUT_S
                if waited >= limit_s or self._closed:
                    raise _Silent(f"worker rank {rank} has not answered {what} for {waited:.0f}s") from None
                log.warning("worker rank %d has not answered %s for %.0fs; waiting", rank, what, waited)
            except Exception as err:  # noqa: BLE001
                raise EngineDeadError(f"worker rank {rank} died: {err}") from None

    def _fail(self, error: EngineDeadError) -> None:
        if self._closed:
            return
        with self._lock:
            if self._error is None:
                self._error = error
                log.error("replica failed: %s", error)
            sinks, self._sinks = self._sinks, {}
            self._pending_adds.clear()
        for sink in sinks.values():
            sink(self._error)

    def _take_sink(self, request_id: str) -> Sink | None:
        with self._lock:
            return self._sinks.pop(request_id, None)

    # ---- requests ----------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{id(self):x}-{next(self._ids)}"

    def add_request(self, request_id: str, prompt, params, sink: Sink) -> None:
        with self._lock:
            self._raise_if_unusable()
            if request_id in self._sinks:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
            self._sinks[request_id] = sink
            self._pending_adds.append((request_id, prompt, params))
            self._lock.notify_all()

    def abort(self, request_id: str, notify: bool = False) -> None:
        """notify: the request's sink still gets the engine's last output of it (finish_reason "abort", what was
        generated so far); else the sink is dropped now (its caller has gone)."""
        with self._lock:
            sink = self._sinks.get(request_id) if notify else self._sinks.pop(request_id, None)
            if sink is not None and self._error is None and not self._closed:
                self._pending_aborts.append(request_id)
                self._lock.notify_all()

    def abort_all(self) -> None:
        """Every request of this driver, notifying their sinks."""
        with self._lock:
            request_ids = list(self._sinks)
        for request_id in request_ids:
            self.abort(request_id, notify=True)

    def num_in_flight(self) -> int:
        return len(self._sinks)

    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise EngineDeadError("the executor was shut down")

    def check_health(self) -> None:
        """Raises EngineDeadError unless every worker answers now."""
        self._raise_if_unusable()
        try:
            self._ping(_HEALTH_TIMEOUT_S)
        except _Silent:
            raise  # not ready now; whether it is hung is the monitor's call, after _SILENT_LIMIT_S
        except EngineDeadError as err:
            self._fail(err)
            raise self._error from None

    # ---- weights and memory ------------------------------------------------------------------------
    def load_weights(self, model: str, revision: str | None) -> None:
        self._raise_if_unusable()
        ray.get(self.workers[0].load_weights.remote(model, revision))

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                 world_size: int, backend: str, group_name: str) -> None:
        self._raise_if_unusable()
        ray.get([w.init_weight_update_group.remote(master_address, master_port, rank_offset, world_size,
                                                   backend, group_name) for w in self.workers])

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list) -> None:
        with self._weights_changing():
            ray.get([w.receive_weights.remote(names, dtypes, shapes) for w in self.workers])

    def update_weights_from_buckets(self, buckets: Iterable[list]) -> None:
        """Each bucket (weight_sync.weight_buckets) is put in the object store once and loaded by every rank."""
        with self._weights_changing():
            for bucket in buckets:
                ref = ray.put(bucket)
                ray.get([w.load_weight_bucket.remote(ref) for w in self.workers])

    @contextlib.contextmanager
    def _weights_changing(self):
        """No forward pass runs while the weights change; requests running on the old ones are then recomputed."""
        self._raise_if_unusable()
        self.pause()
        try:
            yield
            self.reset_prefix_cache()
        finally:
            self.resume()

    def reset_prefix_cache(self) -> None:
        self._raise_if_unusable()
        ray.get(self.workers[0].reset_prefix_cache.remote())

    def pause(self) -> None:
        self._raise_if_unusable()
        ray.get(self.workers[0].pause.remote())

    def resume(self) -> None:
        self._raise_if_unusable()
        ray.get(self.workers[0].resume.remote())

    def sleep(self, level: int) -> None:
        self._raise_if_unusable()
        ray.get(self.workers[0].sleep.remote(level))

    def wake_up(self, tags: list[str] | None) -> None:
        self._raise_if_unusable()
        ray.get(self.workers[0].wake_up.remote(tags))

    def memory(self) -> list[dict]:
        return ray.get([w.memory.remote() for w in self.workers])

    # ---- teardown ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stops the engine, kills every worker and removes the placement group this executor created."""
        if self._closed:
            return
        if self._error is None:
            try:
                ray.get(self.workers[0].stop.remote(), timeout=30)
            except Exception as err:  # noqa: BLE001 - killing follows anyway
                log.warning("rank 0 did not stop cleanly: %s", err)
        self._close_driver()
        self._kill_workers(self.workers)
        if self._owned_pg is not None:
            remove_placement_group(self._owned_pg)
        self._join_threads()

    def disconnect(self) -> None:
        """Stops this driver's threads and leaves the (detached) workers running for `connect`."""
        if not self._closed:
            self._close_driver()
            self._join_threads()

    def _close_driver(self) -> None:
        atexit.unregister(self.disconnect)
        with self._lock:
            self._closed = True
            sinks, self._sinks = self._sinks, {}
            self._lock.notify_all()
        for sink in sinks.values():
            sink(EngineDeadError("the executor was shut down"))

    def _join_threads(self) -> None:
        for thread in self._threads:
            thread.join(timeout=_POLL_TIMEOUT_S + _HEALTH_TIMEOUT_S + 1)

    @staticmethod
    def _kill_workers(workers) -> None:
        for worker in workers:
            ray.kill(worker, no_restart=True)


def _use_gpu(device: str, world_size: int) -> bool:
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    return ray.cluster_resources().get("GPU", 0) >= world_size


def node_alive(node_id: str) -> bool:
    """Whether the Ray node is in the cluster (a driver's call)."""
    return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())
