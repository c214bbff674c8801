"""A small async Kubernetes REST client for the reconciler, on the credentials kopf logs in with.

kopf's own client is private API, and the `kubernetes` package is synchronous; the reconciler needs
only get, list, create, merge-patch and delete, with retries on transient errors.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf

from . import api

logger = logging.getLogger(__name__)

# (group/version prefix, plural) of everything the operator touches.
INFERENCE_DEPLOYMENTS = (f"/apis/{api.GROUP}/{api.VERSION}", api.PLURAL)
RAYCLUSTERS = ("/apis/ray.io/v1", "rayclusters")
SERVICES = ("/api/v1", "services")
SECRETS = ("/api/v1", "secrets")
PODS = ("/api/v1", "pods")
NETWORK_POLICIES = ("/apis/networking.k8s.io/v1", "networkpolicies")
# The Gateway API Inference Extension's, whose CRD a cluster may lack (then every request to it is a 404).
INFERENCE_POOLS = ("/apis/inference.networking.k8s.io/v1", "inferencepools")

# Retried here for idempotent requests; everything else fails the reconcile, which the work queue
# retries with backoff.
TRANSIENT_STATUSES = {429, 500, 502, 503, 504}
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)
STRICT = {"fieldValidation": "Strict"}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


def _path(resource: tuple[str, str], namespace: str, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = resource
    return "/".join(p for p in (f"{prefix}/namespaces/{namespace}/{plural}", name, sub) if p)


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=info.ca_path, cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(info.certificate_path, info.private_key_path)
    return context


def _authorization(info: kopf.ConnectionInfo) -> dict[str, str]:
    return {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"} if info.token else {}


class KubeClient:
    def __init__(self, login: Callable[[], kopf.ConnectionInfo]):
        """`login` is asked for credentials at start and again when the API answers 401 (service
        account tokens are rotated)."""
        self._login = login
        info = login()
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        self._session = aiohttp.ClientSession(
            base_url=info.server.rstrip("/") + "/", headers=_authorization(info), auth=auth,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=64),
            timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else None
        relogged = False
        for delay in (*RETRY_DELAYS, None):
            try:
                async with self._session.request(method, path.lstrip("/"), json=body, params=params,
                                                 headers=headers) as response:
                    if response.status < 300:
                        return await response.json()
                    text = await response.text()
                    if response.status == 404:
                        raise NotFound(404, text)
                    if response.status == 409:
                        raise Conflict(409, text)
                    if response.status == 401 and not relogged:
                        relogged = True
                        self._session.headers.update(_authorization(self._login()))
                        continue
                    # A failed POST may still have been committed: the next reconcile sees what exists.
                    if response.status not in TRANSIENT_STATUSES or delay is None or method == "POST":
                        raise ApiError(response.status, text)
                    logger.info("%s %s: HTTP %s, retrying in %ss", method, path, response.status, delay)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                if delay is None or method == "POST":
                    raise
                logger.info("%s %s: %r, retrying in %ss", method, path, e, delay)
            await asyncio.sleep(delay)

    async def get(self, resource: tuple[str, str], namespace: str, name: str) -> dict:
        return await self.request("GET", _path(resource, namespace, name))

    async def list(self, resource: tuple[str, str], namespace: str, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items = (await self.request("GET", _path(resource, namespace), params={"labelSelector": selector}))["items"]
        # Filtered here too: a selector is only a hint to servers that may ignore it (emulators do).
        return [i for i in items if labels.items() <= (i.get("metadata", {}).get("labels") or {}).items()]

    # Strict: a field the API server does not know (a typo passed through spec.pods.affinity, say) is an error
    # naming it, which reaches the Degraded condition, rather than dropped without a word.
    async def create(self, resource: tuple[str, str], namespace: str, body: dict) -> dict:
        return await self.request("POST", _path(resource, namespace), body, params=STRICT)

    async def patch(self, resource: tuple[str, str], namespace: str, name: str, body: dict,
                    subresource: str | None = None) -> dict:
        return await self.request("PATCH", _path(resource, namespace, name, subresource), body, params=STRICT)

    async def delete(self, resource: tuple[str, str], namespace: str, name: str) -> None:
        try:
            # Foreground: the RayCluster stays (terminating) until the garbage collector has removed its pods,
            # so a replica whose pods still hold GPUs counts against maxSurge and blocks Recreate.
            await self.request("DELETE", _path(resource, namespace, name), {"propagationPolicy": "Foreground"})
        except NotFound:
            pass  # already gone: what we wanted
