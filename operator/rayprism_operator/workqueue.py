"""A per-object work queue: many wake-ups collapse into one reconcile, one reconcile at a time per object.

Watch events of the InferenceDeployment and of its RayClusters wake the parent's worker; the worker
also wakes itself when the planner asks (polling weight loads, the progress deadline) and retries
with exponential backoff when a reconcile fails (API errors, conflicts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from . import metrics
from .reconciler import Gone

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
MAX_BACKOFF_SECONDS = 60.0


class WorkQueue:
    def __init__(self, reconcile: Callable[[str, str], Awaitable[float | None]]):
        self._reconcile = reconcile
        self._wakeups: dict[Key, asyncio.Event] = {}
        self._workers: dict[Key, asyncio.Task] = {}

    def wake(self, key: Key) -> None:
        if key not in self._workers:
            self._wakeups[key] = asyncio.Event()
            self._workers[key] = asyncio.create_task(self._work(key), name=f"reconcile {key[0]}/{key[1]}")
            metrics.DEPLOYMENTS.set(len(self._workers))
        self._wakeups[key].set()

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def _work(self, key: Key) -> None:
        wakeup = self._wakeups[key]
        delay: float | None = None
        failures = 0
        try:
            while True:
                try:
                    await asyncio.wait_for(wakeup.wait(), delay)
                except TimeoutError:
                    pass
                wakeup.clear()
                try:
                    with metrics.RECONCILE_SECONDS.time():
                        delay = await self._reconcile(*key)
                    metrics.RECONCILES.labels("success").inc()
                    failures = 0
                except Gone:
                    if not wakeup.is_set():  # not re-created meanwhile
                        metrics.forget(*key)
                        return
                except Exception:
                    metrics.RECONCILES.labels("error").inc()
                    failures += 1
                    delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** failures)
                    logger.exception("Reconciling %s/%s failed (attempt %d); retrying in %.1fs",
                                     *key, failures, delay)
        finally:
            del self._workers[key], self._wakeups[key]
            metrics.DEPLOYMENTS.set(len(self._workers))
