"""Continuous client traffic for the e2e tests: threads sending one request after another, each to the next
base URL (e2e.endpoints: the next ready endpoint, or a port-forward), for as long as a `with` block lasts.
Every request is recorded (where it went, how long it took, its error), so a test can count what failed
where, and whether anything hung until the client's timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    base_url: str   # "" when there was nowhere to send it (no ready endpoint): a failure too
    started: float
    ended: float
    error: str | None  # the exception's type and text, None when it succeeded
    timed_out: bool    # the client gave up waiting

    @property
    def host(self) -> str:
        """The endpoint's address without the port: a pod IP on the direct pod network."""
        return self.base_url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]


class Traffic:
    """`clients` threads, each calling send(base_url) with base_url from next_base_url() again and again;
    send raises unless the request succeeded."""

    def __init__(self, next_base_url: Callable[[], str], send: Callable[[str], object], clients: int = 1):
        self.next_base_url, self.send = next_base_url, send
        self.requests: list[Request] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self._stop.is_set():
            started, base_url = time.monotonic(), ""
            error, timed_out = None, False
            try:
                base_url = self.next_base_url()
                self.send(base_url)
            except Exception as err:  # noqa: BLE001 - every failure is recorded; the caller judges them
                error = f"{type(err).__name__}: {err}"[:300]
                timed_out = "Timeout" in type(err).__name__
            self.requests.append(Request(base_url, started, time.monotonic(), error, timed_out))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()  # bounded by the client's request timeout

    @property
    def failures(self) -> list[str]:
        return [r.error for r in self.requests if r.error]

    def report(self) -> dict:
        return {"requests": len(self.requests), "failed": len(self.failures),
                "worst_latency_s": round(max((r.ended - r.started for r in self.requests), default=0.0), 2)}
