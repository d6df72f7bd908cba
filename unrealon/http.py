"""
The health, liveness and metrics site (the second listener).

C{/live} answers 200 while the process runs.  C{/health} is readiness: 200
when the node can serve, 503 when its store is unreachable ("degraded") or it
is draining for shutdown ("stopping"), with the JSON body of PROTOCOL.md
section 1.  C{/metrics} is prometheus-client's Twisted resource over the
node's own registry.  C{/api} is the HTTP server API (L{unrealon.httpapi}).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.twisted import MetricsResource
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from unrealon.engine.supervision import ISupervised
from unrealon.httpapi import ApiResource
from unrealon.httpbody import BoundedRequest
from unrealon.node import Node

log = Logger(namespace="unrealon.http")

#: longest /health waits on the store before calling it unreachable
HEALTH_TIMEOUT = 1.0


def _send_json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class LiveResource(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _send_json(request, 200, {"status": "alive"})


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, node: Node, ingress: Any, loops: tuple[ISupervised, ...]) -> None:
        super().__init__()
        self._node = node
        self._ingress = ingress
        self._loops = loops

    async def report(self) -> tuple[int, dict[str, Any]]:
        node = self._node
        redis: Any = None
        ingress: Any = None
        ready = True
        d: Deferred[Any] = node.broker.healthy()
        d.addTimeout(HEALTH_TIMEOUT, node.reactor)
        try:
            redis = await d
        except TimeoutError:
            redis = {"ok": False, "latency_ms": None}
        except Exception:
            log.failure("health check of the store failed")
            redis = {"ok": False, "latency_ms": None}
        if redis is not None and not redis.get("ok"):
            ready = False
        if self._ingress is not None:
            try:
                ingress = await self._ingress.health()
            except Exception:
                ingress = {"lag": None, "pending": None, "dead": None, "ok": False}
            if not ingress.pop("ok", True):
                ready = False
        stopped = [loop.name for loop in self._loops if not loop.working()]
        if stopped:
            ready = False
        if node.stopping:
            status, code = "stopping", 503
        elif ready:
            status, code = "ok", 200
        else:
            status, code = "degraded", 503
        return code, {
            "status": status,
            "node_id": node.node_id,
            "version": node.version,
            "uptime_s": round(node.uptime(), 3),
            "connections": node.hub.connection_count,
            "users": node.hub.user_count,
            "rooms": node.hub.room_count,
            "redis": redis,
            "ingress": ingress,
            "stopped": stopped,
        }

    def render_GET(self, request: Request) -> int:
        d = Deferred.fromCoroutine(self.report())
        # notifyFinish fails when the client goes away before the answer
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(result: tuple[int, dict[str, Any]]) -> None:
            if not gone:
                request.write(_send_json(request, *result))
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("health report failed", failure)
            if not gone:
                request.write(_send_json(request, 500, {"status": "error"}))
                request.finish()

        d.addCallbacks(write, failed)
        return NOT_DONE_YET


class QuietSite(Site):
    """A Site without access log lines: probes every few seconds would drown the log."""

    def log(self, request: Any) -> None:
        pass


def make_site(node: Node, ingress: Any = None, loops: tuple[ISupervised, ...] = ()) -> Site:
    """
    The second listener's site: C{/health} (reporting C{ingress}, the Redis
    engine's consumer, and the supervised C{loops}), C{/live}, C{/metrics}.
    """
    root = Resource()
    root.putChild(b"health", HealthResource(node, ingress, loops))
    root.putChild(b"live", LiveResource())
    root.putChild(b"metrics", MetricsResource(registry=node.metrics.registry))
    root.putChild(b"api", ApiResource(node, node.api_replies))
    site = QuietSite(root)
    site.requestFactory = BoundedRequest  # bodies of at most 1 MiB (the API's)
    site.noisy = False
    site.displayTracebacks = False
    return site
