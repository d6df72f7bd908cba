"""
The health, liveness and metrics site (PROTOCOL.md section 1), over real
HTTP against a real node on C{tcp:0}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.helpers.node import mint_token, start_node
from unrealon import __version__, http

HEALTH_FIELDS = {
    "status", "node_id", "version", "uptime_s", "connections", "users", "rooms", "redis", "ingress",
    "stopped",
}


class HTTPTests(TestCase):
    """/live, /health, /metrics and anything else."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.running = yield start_node(self)

    @inlineCallbacks
    def get(self, path: str) -> Any:
        from twisted.internet import reactor

        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.running.http_port}{path}".encode()
        )
        body = yield readBody(response)
        return response, body

    @inlineCallbacks
    def test_live(self) -> Any:
        """/live answers 200 while the process runs, even while stopping."""
        response, _ = yield self.get("/live")
        self.assertEqual(response.code, 200)
        self.running.node.status = "stopping"
        response, _ = yield self.get("/live")
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_health_fields(self) -> Any:
        """
        /health is 200 JSON with every field of section 1; redis and ingress
        are null with the memory engine; connections, users and rooms count
        what is connected (an unauthenticated connection is a connection,
        not a user).
        """
        response, body = yield self.get("/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        health = json.loads(body)
        self.assertEqual(set(health), HEALTH_FIELDS)
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["node_id"], "test-node")
        self.assertEqual(health["version"], __version__)
        # the time since the node started, as the node's clock has it
        node = self.running.node
        self.assertLessEqual(abs(health["uptime_s"] - (node.reactor.seconds() - node.started_at)),
                             1.0)
        self.assertGreater(health["uptime_s"], 0)
        self.assertIsNone(health["redis"])
        self.assertIsNone(health["ingress"])
        self.assertEqual((health["connections"], health["users"], health["rooms"]), (0, 0, 0))

        alice = yield self.running.connect(mint_token("alice", rooms=["workspace:*"]))
        yield alice.call("rooms.join", {"room": "workspace:1"})
        anonymous = yield self.running.connect()
        yield anonymous.call("system.ping")
        _, body = yield self.get("/health")
        health = json.loads(body)
        self.assertEqual((health["connections"], health["users"]), (2, 1))
        # user:alice, broadcast, workspace:1
        self.assertEqual(health["rooms"], 3)
        yield alice.close()
        yield anonymous.close()
        _, body = yield self.get("/health")
        health = json.loads(body)
        self.assertEqual((health["connections"], health["users"], health["rooms"]), (0, 0, 0))

    @inlineCallbacks
    def test_health_stopping(self) -> Any:
        """While draining for shutdown /health is 503 "stopping"."""
        self.running.node.status = "stopping"
        response, body = yield self.get("/health")
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body)["status"], "stopping")

    @inlineCallbacks
    def test_health_degraded(self) -> Any:
        """
        A store that reports trouble, or does not answer within the health
        timeout, makes /health 503 "degraded" with redis.ok false.
        """
        broker = self.running.node.broker
        self.patch(broker, "healthy", lambda: succeed({"ok": False, "latency_ms": None}))
        response, body = yield self.get("/health")
        self.assertEqual(response.code, 503)
        health = json.loads(body)
        self.assertEqual(health["status"], "degraded")
        self.assertEqual(health["redis"], {"ok": False, "latency_ms": None})

        self.patch(http, "HEALTH_TIMEOUT", 0.2)
        self.patch(broker, "healthy", lambda: Deferred())
        response, body = yield self.get("/health")
        self.assertEqual(response.code, 503)
        health = json.loads(body)
        self.assertEqual(health["status"], "degraded")
        self.assertIs(health["redis"]["ok"], False)

    @inlineCallbacks
    def test_health_names_stopped_loops(self) -> Any:
        """A background loop that is not working is named in /health's C{stopped} (503)."""
        response, body = yield self.get("/health")
        self.assertEqual(json.loads(body)["stopped"], [])
        loop = self.running.service.loops[-1]
        loop.stop()
        self.addCleanup(loop.start)
        response, body = yield self.get("/health")
        self.assertEqual(response.code, 503)
        health = json.loads(body)
        self.assertEqual((health["status"], health["stopped"]), ("degraded", [loop.name]))

    @inlineCallbacks
    def test_metrics(self) -> Any:
        """
        /metrics is Prometheus text with the live connection gauge and the
        per-method call counter.
        """
        client = yield self.running.connect(mint_token("alice"))
        yield client.call("system.ping")
        yield client.request("no.such.method")
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        content_type = response.headers.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"text/plain"), content_type)
        text = body.decode()
        self.assertIn("# TYPE unrealon_connections gauge", text)
        self.assertIn("\nunrealon_connections 1.0\n", text)
        self.assertIn("unrealon_rpc_calls", text)
        self.assertIn('unrealon_rpc_calls_total{method="system.ping",outcome="ok"} 1.0', text)
        self.assertIn('outcome="-32601"', text)
        # no Redis on the memory engine: no unrealon_redis_up (a 0 would read as an outage)
        self.assertNotIn("unrealon_redis_up", text)
        yield client.close()

    @inlineCallbacks
    def test_unknown_paths(self) -> Any:
        """Any other path is 404."""
        for path in ("/", "/nope", "/ws", "/healthz", "/metrics2"):
            response, _ = yield self.get(path)
            self.assertEqual(response.code, 404, path)
