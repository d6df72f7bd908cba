"""
Browser -> backend calls end to end (PROTOCOL.md section 9.3): two node
processes on one private Redis, real worker processes of the backend package
(``python -m unrealon_backend worker``, handlers from
L{tests.backend_handlers}), real WebSocket clients.

What each test proves is seen from both ends: the client's messages, and
what the handler recorded in Redis (L{tests.helpers.backend.marks}) -- a
cancel must reach the handler, not only stop the client waiting.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import redis
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers.backend import marks, spawn_backend, start_worker
from tests.helpers.cluster import start_cluster
from tests.helpers.node import mint_token
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until

STREAM = "stream:backend"


class _TwoNodes(TestCase):
    """A private Redis and two node processes on it; workers are each test's."""

    timeout = 90
    #: the nodes' UNREALON_BACKEND_MAX_TIMEOUT: room for a lost worker's call to be taken
    #: over (claim idle 2 s, then a reclaim pass each second) before its deadline
    max_timeout = "15"

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.r = redis.Redis.from_url(self.server.url, decode_responses=True)
        self.addCleanup(self.r.close)
        self.n1, self.n2 = yield start_cluster(
            self, self.server.url, 2, UNREALON_BACKEND_MAX_TIMEOUT=self.max_timeout)

    @inlineCallbacks
    def client(self, node: Any, methods: list[str] | None = None, **claims: Any) -> Any:
        client = yield node.connect(mint_token("ann", methods=methods or ["test.*"], **claims))
        self.addCleanup(client.drop)
        return client

    @inlineCallbacks
    def callable_on(self, client: Any, name: str) -> Any:
        """Wait until the node lists C{name} (a worker's declaration reaches it within 2 s)."""
        async def listed() -> bool:
            doc = await client.call("rpc.discover")
            return any(m["name"] == name for m in doc["methods"])
        yield wait_until(listed, timeout=5, interval=0.1, what=f"{name} in rpc.discover")

    def call_id_of(self, method: str) -> str:
        """The call id of the newest call of C{method} in the backend stream."""
        for _, fields in self.r.xrevrange(STREAM, count=50):
            payload = json.loads(fields["payload"])
            if payload["method"] == method:
                return str(payload["call_id"])
        raise AssertionError(f"no call of {method} in {STREAM}")

    @inlineCallbacks
    def collect(self, client: Any, request_id: Any) -> Any:
        """The progress items of a call, then its reply."""
        items = []
        while True:
            message = yield client.next(timeout=10)
            if message.get("method") == "rpc.progress":
                self.assertEqual(message["params"]["id"], request_id)
                items.append((message["params"]["seq"], message["params"]["data"]))
                continue
            self.assertEqual(message["id"], request_id)
            return items, message



class BackendEndToEndTests(_TwoNodes):
    @inlineCallbacks
    def test_calls_through_both_nodes(self) -> Any:
        """
        Clients of both nodes call at once; each gets its own progress, in
        order, then its result; the worker sees who called and the claims
        the declaration passes on.
        """
        yield start_worker(self, self.server.url, "w1")
        a = yield self.client(self.n1, info={"plan": "pro"})
        b = yield self.client(self.n2)
        yield self.callable_on(a, "test.count")
        yield self.callable_on(b, "test.count")
        a.send({"jsonrpc": "2.0", "id": "a", "method": "test.count", "params": {"n": 40}})
        b.send({"jsonrpc": "2.0", "id": 9, "method": "test.count", "params": {"n": 25}})
        (items_a, reply_a), (items_b, reply_b) = yield gatherResults(
            [self.collect(a, "a"), self.collect(b, 9)])
        self.assertEqual(items_a, [(i + 1, i) for i in range(40)])
        self.assertEqual(reply_a["result"], {"total": 40})
        self.assertEqual(items_b, [(i + 1, i) for i in range(25)])
        self.assertEqual(reply_b["result"], {"total": 25})
        echo = yield b.call("test.echo", {"text": "hi"})
        self.assertEqual(echo["echo"], "hi")
        self.assertEqual(echo["user_id"], "ann")
        echo = yield a.call("test.echo", {"text": "hi"})
        self.assertEqual(echo["claims"], {"info": {"plan": "pro"}})

    @inlineCallbacks
    def test_refused_before_any_worker_sees_it(self) -> Any:
        """Invalid params and a methods claim that does not allow it: nothing is appended."""
        yield start_worker(self, self.server.url, "w1")
        allowed = yield self.client(self.n1)
        # on the node that already lists the method: else -32601 (not yet declared there)
        stranger = yield self.client(self.n1, methods=["other.*"])
        yield self.callable_on(allowed, "test.echo")
        reply = yield allowed.request("test.echo", {"text": 5})
        self.assertEqual(reply["error"]["code"], -32602)
        self.assertEqual(reply["error"]["data"]["errors"][0]["field"], "text")
        reply = yield stranger.request("test.echo", {"text": "x"})
        self.assertEqual(reply["error"]["code"], -32003)
        self.assertEqual(self.r.xlen(STREAM), 0)

    @inlineCallbacks
    def test_no_worker(self) -> Any:
        """Once the last worker stopped (its heartbeat gone), calls get -32013 at once."""
        worker = yield start_worker(self, self.server.url, "w1")
        client = yield self.client(self.n2)
        yield self.callable_on(client, "test.echo")
        worker.signal(signal.SIGTERM)
        yield deferToThread(worker.popen.wait, 15)

        async def refused() -> bool:
            reply = await client.request("test.echo", {"text": "x"})
            return bool(reply.get("error", {}).get("code") == -32013)
        yield wait_until(refused, timeout=5, interval=0.2, what="-32013 after the worker left")
        reply = yield client.request("test.echo", {"text": "x"})
        self.assertEqual(reply["error"]["data"], {"retryable": True})

    @inlineCallbacks
    def test_worker_killed_idempotent_call_retried(self) -> Any:
        """
        The worker running an idempotent call is SIGKILLed: another worker
        claims the call and runs it again; the client gets its result once.
        """
        first = yield start_worker(self, self.server.url, "w1")
        client = yield self.client(self.n1)
        yield self.callable_on(client, "test.slow")
        client.send({"jsonrpc": "2.0", "id": 1, "method": "test.slow", "params": {}})
        yield wait_until(lambda: self.r.xlen(STREAM) == 1, what="the call appended")
        call_id = self.call_id_of("test.slow")
        yield wait_until(lambda: marks(self.r, call_id) == ["delivery 1"], what="first run")
        yield start_worker(self, self.server.url, "w2")
        first.signal(signal.SIGKILL)
        reply = yield client.next(timeout=20)
        self.assertEqual(reply, {"jsonrpc": "2.0", "id": 1, "result": {"delivery": 2}})
        self.assertEqual(marks(self.r, call_id), ["delivery 1", "delivery 2"])

    @inlineCallbacks
    def test_worker_killed_other_call_answered(self) -> Any:
        """A call that is not idempotent whose worker died is answered -32015, not run again."""
        first = yield start_worker(self, self.server.url, "w1")
        client = yield self.client(self.n2)
        yield self.callable_on(client, "test.slow_once")
        client.send({"jsonrpc": "2.0", "id": "s", "method": "test.slow_once", "params": {}})
        yield wait_until(lambda: self.r.xlen(STREAM) == 1, what="the call appended")
        call_id = self.call_id_of("test.slow_once")
        yield wait_until(lambda: marks(self.r, call_id) == ["delivery 1"], what="first run")
        yield start_worker(self, self.server.url, "w2")
        first.signal(signal.SIGKILL)
        reply = yield client.next(timeout=20)
        self.assertEqual(reply["id"], "s")
        self.assertEqual(reply["error"]["code"], -32015)
        self.assertEqual(reply["error"]["data"], {"retryable": False})
        self.assertEqual(marks(self.r, call_id), ["delivery 1"])

    @inlineCallbacks
    def test_cancel_by_client_reaches_the_generator(self) -> Any:
        """rpc.cancel mid-stream: -32014, and the generator gets Cancelled at its next yield."""
        yield start_worker(self, self.server.url, "w1")
        client = yield self.client(self.n1)
        yield self.callable_on(client, "test.gen_cancel")
        client.send({"jsonrpc": "2.0", "id": 5, "method": "test.gen_cancel", "params": {}})
        for seq in (1, 2, 3):
            progress = yield client.next()
            self.assertEqual(progress["params"], {"id": 5, "seq": seq, "data": seq - 1})
        client.send({"jsonrpc": "2.0", "id": 6, "method": "rpc.cancel", "params": {"id": 5}})
        while True:
            message = yield client.next()
            if "id" in message:
                break  # progress sent before the cancel was seen may come first
        self.assertEqual((message["id"], message["error"]["code"]), (5, -32014))
        reply = yield client.next()
        self.assertEqual(reply["result"], {"id": 5, "cancelled": True})
        call_id = self.call_id_of("test.gen_cancel")
        yield wait_until(lambda: "thrown" in marks(self.r, call_id), timeout=5,
                         what="Cancelled thrown into the generator")

    @inlineCallbacks
    def test_cancel_by_disconnect_reaches_the_handler(self) -> Any:
        """A client that goes away cancels its call; the handler polling its flag sees it."""
        yield start_worker(self, self.server.url, "w1")
        client = yield self.client(self.n2)
        yield self.callable_on(client, "test.wait_cancel")
        client.send({"jsonrpc": "2.0", "id": 1, "method": "test.wait_cancel", "params": {}})
        yield wait_until(lambda: self.r.xlen(STREAM) == 1, what="the call appended")
        call_id = self.call_id_of("test.wait_cancel")
        yield wait_until(lambda: "started" in marks(self.r, call_id), what="handler started")
        yield client.drop()
        yield wait_until(lambda: "flag" in marks(self.r, call_id), timeout=5,
                         what="the handler seeing the disconnect's cancel")
        self.assertEqual(self.r.get(f"unrealon:backend:cancel:{call_id}"), "disconnect")


class DeadlineEndToEndTests(_TwoNodes):
    #: every call's deadline capped at 3 s by the nodes
    max_timeout = "3"

    @inlineCallbacks
    def test_deadline_reaches_the_handler(self) -> Any:
        """
        A call past its deadline (capped at 3 s by the node's setting) is
        answered -32012, and the running handler sees its flag set.
        """
        yield start_worker(self, self.server.url, "w1")
        client = yield self.client(self.n1)
        yield self.callable_on(client, "test.wait_cancel")
        started = time.monotonic()
        reply = yield client.request("test.wait_cancel", {}, timeout=10)
        self.assertEqual(reply["error"]["code"], -32012)
        self.assertEqual(reply["error"]["data"], {"timeout_ms": 3000})
        self.assertGreaterEqual(time.monotonic() - started, 2.9)
        call_id = self.call_id_of("test.wait_cancel")
        yield wait_until(lambda: "flag" in marks(self.r, call_id), timeout=5,
                         what="the handler seeing the deadline's cancel")


class LifecycleConsumerTests(TestCase):
    """The backend's side of section 9.1: every transition reaches its handlers."""

    timeout = 90

    @inlineCallbacks
    def test_consumer_killed_and_restarted(self) -> Any:
        """
        Users come and go on two nodes while the backend's event consumer is
        SIGKILLed and another one starts: the stream holds each transition
        once (online/offline strictly alternating per user, occupied/vacated
        per room) and every one of them reaches a handler.
        """
        server = yield start_redis(self)
        r = redis.Redis.from_url(server.url, decode_responses=True)
        self.addCleanup(r.close)
        n1, n2 = yield start_cluster(self, server.url, 2)
        consumer = spawn_backend(self, server.url, "events", "--redis", server.url,
                                 "--handlers", "tests.backend_handlers", "--consumer", "c1",
                                 "--claim-idle", "1")

        @inlineCallbacks
        def churn(users: list[str]) -> Any:
            clients = []
            for i, user in enumerate(users):
                for node in (n1, n2):
                    client = yield node.connect(mint_token(user, rooms=["doc:*"]))
                    yield client.call("rooms.join", {"room": f"doc:{i % 2}"})
                    clients.append(client)
            for client in clients:
                yield client.close()

        yield churn(["u1", "u2", "u3"])
        yield wait_until(lambda: r.scard("test:events:ids") >= 4, timeout=10,
                         what="the first events handled", stop_if=consumer.exited)
        consumer.signal(signal.SIGKILL)
        yield deferToThread(consumer.popen.wait, 10)
        yield churn(["u1", "u4"])
        spawn_backend(self, server.url, "events", "--redis", server.url, "--handlers",
                      "tests.backend_handlers", "--consumer", "c2", "--claim-idle", "1")

        def stream() -> list[tuple[str, dict[str, Any]]]:
            return [(i, json.loads(f["payload"])) for i, f in r.xrange("stream:events")]

        def all_offline() -> bool:
            return sum(e["type"] == "user.offline" for _, e in stream()) == 5
        yield wait_until(all_offline, timeout=15, what="every user offline")
        yield wait_until(lambda: {i for i, _ in stream()} <= r.smembers("test:events:ids"),
                         timeout=15, what="every event handled after the restart")
        by_user: dict[str, list[str]] = {}
        by_room: dict[str, list[str]] = {}
        for _, event in stream():
            if event["type"].startswith("user."):
                by_user.setdefault(event["user_id"], []).append(event["type"])
            elif event["type"].startswith("room."):
                by_room.setdefault(event["room"], []).append(event["type"])
        self.assertEqual(by_user, {"u1": ["user.online", "user.offline"] * 2,
                                   "u2": ["user.online", "user.offline"],
                                   "u3": ["user.online", "user.offline"],
                                   "u4": ["user.online", "user.offline"]})
        for room, types in by_room.items():
            self.assertEqual(types, ["room.occupied", "room.vacated"] * (len(types) // 2), room)
            self.assertEqual(len(types) % 2, 0, room)
        self.assertEqual(sorted(by_room), ["doc:0", "doc:1"])
