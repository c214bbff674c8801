"""Client of a replica's server: its admin weights API (contract: GET/POST /admin/v1/weights, bearer token) and
the /metrics of its OpenAI port (what the autoscaler reads)."""

from __future__ import annotations

import logging

import aiohttp

from . import render
from .planner import WeightsReport

logger = logging.getLogger(__name__)

TIMEOUT = aiohttp.ClientTimeout(total=10)
METRICS_TIMEOUT = aiohttp.ClientTimeout(total=3)  # a scrape that takes longer is stale for a decision


def head_pod_ip(raycluster: dict) -> str | None:
    return ((raycluster.get("status") or {}).get("head") or {}).get("podIP")


def metrics_url(raycluster: dict) -> str | None:
    """The head pod's /metrics, on the OpenAI port (None until KubeRay reports the head pod's IP)."""
    pod_ip = head_pod_ip(raycluster)
    return f"http://{pod_ip}:{render.SERVER_PORT}/metrics" if pod_ip else None


def admin_url(raycluster: dict) -> str:
    """The head pod's IP when KubeRay reports it, else KubeRay's head Service."""
    pod_ip = head_pod_ip(raycluster)
    if pod_ip:
        return f"http://{pod_ip}:{render.ADMIN_PORT}"
    meta = raycluster["metadata"]
    return render.head_service_url(meta["name"], meta["namespace"])


class WeightsClient:
    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(timeout=TIMEOUT)

    async def close(self) -> None:
        await self._session.close()

    async def request_load(self, base_url: str, token: str, revision: str) -> str | None:
        """POST the new revision. None when the replica accepted it (or is already busy loading) or may
        accept it when asked again (no answer, 5xx: the polls ask again, with back-off); else why it refused."""
        try:
            async with self._session.post(f"{base_url}/admin/v1/weights", json={"revision": revision},
                                          headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status in (200, 202, 409):  # 409: a load is in progress; poll it
                    return None
                text = await response.text()
                logger.warning("POST %s/admin/v1/weights: HTTP %s %s", base_url, response.status, text)
                return None if response.status >= 500 else f"HTTP {response.status}: {text[:300]}"
        except (aiohttp.ClientError, TimeoutError) as e:
            logger.warning("POST %s/admin/v1/weights: %r (asked again later)", base_url, e)
            return None

    async def poll(self, base_url: str, token: str, revision: str) -> WeightsReport | None:
        """What the replica has loaded; asks again for `revision` if the replica is not loading it
        (the first request may have been lost, e.g. when the operator restarted in between).
        None when the replica does not answer."""
        report = await self.served(base_url, token)
        if report is not None and report.state == "ready" and report.revision != revision:
            await self.request_load(base_url, token, revision)
            return WeightsReport(revision=report.revision, state="loading")
        return report

    async def served(self, base_url: str, token: str) -> WeightsReport | None:
        """What the replica says it serves, or why not, and its engine's restarts (None when it does not answer)."""
        try:
            async with self._session.get(f"{base_url}/admin/v1/weights",
                                         headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status != 200:
                    logger.warning("GET %s/admin/v1/weights: HTTP %s", base_url, response.status)
                    return None
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            logger.warning("GET %s/admin/v1/weights: %r", base_url, e)
            return None
        restarts = body.get("restarts")  # absent from servers older than their engine restarts
        return WeightsReport(revision=body.get("revision"), state=body.get("state", ""), error=body.get("error"),
                             restarts=restarts if isinstance(restarts, int) else None)

    async def metrics(self, url: str) -> str | None:
        """The server's Prometheus exposition (None when it does not answer: that replica is left out)."""
        try:
            async with self._session.get(url, timeout=METRICS_TIMEOUT) as response:
                if response.status != 200:
                    logger.warning("GET %s: HTTP %s", url, response.status)
                    return None
                return await response.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            logger.warning("GET %s: %r", url, e)
            return None
