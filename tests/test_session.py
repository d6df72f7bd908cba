"""
JSON-RPC 2.0 over a real WebSocket (PROTOCOL.md sections 1 and 3).

Every test here runs a real node on C{tcp:0} listeners in the test reactor
and talks to it with a real Autobahn client (or raw HTTP bytes when the
point is the status line of a refused handshake): error codes and their
exact shape, id echoing, batches, the authentication gate, the rate limit,
message size limits, binary messages, Origin and path checks, the auth
timeout.  The one exception is the 4029 test, which needs ten seconds over
the rate limit: it drives the node's real session synchronously on a
L{task.Clock} (see L{tests.helpers.session}) instead of waiting ten real
seconds.
"""

from __future__ import annotations

import json
import math
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers.node import ClientProtocol, WSClient, mint_token, raw_handshake, start_node
from tests.helpers.session import (
    OP_CLOSE,
    OP_TEXT,
    FakeTransport,
    SyncSession,
    build_node,
    client_frame,
)
from unrealon.limits import RateGuard, TokenBucket, Verdict
from unrealon.rpc import Registry

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UNAUTHENTICATED = -32001
NOT_FOUND = -32004
RATE_LIMITED = -32029

#: backend-only names (PROTOCOL.md section 6): a browser must not learn they exist
BACKEND_ONLY = (
    "publish",
    "connections.disconnect",
    "presence.online",
    "notification.send",
    "notification.broadcast",
    "workspace.file_changed",
    "session.message",
)

#: text a reply must never carry (a leaked exception)
LEAKS = ("Traceback", "Error(", 'File "', "ValueError", "KeyError", "TypeError", "secret-detail")


def ping(request_id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "system.ping"}


def notify(method: str = "system.ping", **params: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params:
        message["params"] = params
    return message


def assert_error(testcase: Any, reply: Any, code: int, request_id: Any = None) -> dict[str, Any]:
    """C{reply} is a JSON-RPC error object with C{code} and the given id."""
    testcase.assertIsInstance(reply, dict)
    testcase.assertEqual(reply.get("jsonrpc"), "2.0", reply)
    testcase.assertIn("id", reply)
    testcase.assertEqual(reply["id"], request_id, reply)
    testcase.assertNotIn("result", reply)
    error = reply["error"]
    testcase.assertEqual(error["code"], code, reply)
    testcase.assertIsInstance(error["message"], str)
    testcase.assertTrue(set(error) <= {"code", "message", "data"}, error)
    return error


def connect_compressed(port: int, token: str) -> Deferred[WSClient]:
    """A real client that offers permessage-deflate (and accepts it if the server does)."""
    client = WSClient()
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws?token={token}")
    factory.setProtocolOptions(
        autoPingInterval=0,
        openHandshakeTimeout=5,
        closeHandshakeTimeout=2,
        perMessageCompressionOffers=[PerMessageDeflateOffer()],
        perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response),
    )

    def build(addr: Any) -> ClientProtocol:
        proto = ClientProtocol()
        proto.factory = factory
        proto.client = client
        return proto

    factory.buildProtocol = build  # type: ignore[method-assign]
    d = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(factory)
    d.addCallback(lambda _: client.opened)
    return d


def handshake_request(
    path: str = "/ws", origin: str | None = None, extra: tuple[str, ...] = ()
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(head: bytes) -> int:
    return int(head.split(b"\r\n", 1)[0].split(b" ")[1])


class ErrorTests(TestCase):
    """Each error of PROTOCOL.md section 3, as a connected client sees it."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.running = yield start_node(self, rate_limit=10000)
        self.client = yield self.running.connect(mint_token("alice", rooms=["workspace:*"]))
        self.addCleanup(self.client.close)

    @inlineCallbacks
    def test_parse_error(self) -> Any:
        """Text that is not JSON is -32700 with id null, and the connection stays usable."""
        for raw in ("{not json", '{"jsonrpc": "2.0", "id": 1,', "", "   ", "[1,]", "nul"):
            self.client.send_raw(raw)
            reply = yield self.client.next()
            assert_error(self, reply, PARSE_ERROR, None)
        self.assertEqual((yield self.client.call("system.ping"))["pong"], True)

    @inlineCallbacks
    def test_invalid_requests(self) -> Any:
        """
        Not an object, a wrong or missing C{jsonrpc}, an id of a type JSON-RPC
        does not allow (true, false, object, array), a missing, empty or
        non-string method, params that are neither object nor array: each is
        -32600; the id is echoed when it is a valid one, else null.
        """
        cases: list[tuple[Any, Any]] = [
            (1, None),
            ("system.ping", None),
            (None, None),
            (True, None),
            ({"jsonrpc": "1.0", "id": 3, "method": "system.ping"}, 3),
            ({"jsonrpc": 2.0, "id": 4, "method": "system.ping"}, 4),
            ({"id": 5, "method": "system.ping"}, 5),
            ({"jsonrpc": "2.0", "id": True, "method": "system.ping"}, None),
            ({"jsonrpc": "2.0", "id": False, "method": "system.ping"}, None),
            ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "system.ping"}, None),
            ({"jsonrpc": "2.0", "id": [1], "method": "system.ping"}, None),
            ({"jsonrpc": "2.0", "id": 6}, 6),
            ({"jsonrpc": "2.0", "id": 7, "method": ""}, 7),
            ({"jsonrpc": "2.0", "id": 8, "method": 42}, 8),
            ({"jsonrpc": "2.0", "id": 9, "method": None}, 9),
            ({"jsonrpc": "2.0", "id": 10, "method": "system.ping", "params": "x"}, 10),
            ({"jsonrpc": "2.0", "id": 11, "method": "system.ping", "params": 3}, 11),
            ({"jsonrpc": "2.0", "id": 12, "method": "system.ping", "params": None}, 12),
            ({"jsonrpc": "2.0", "id": 13, "method": "system.ping", "params": True}, 13),
        ]
        for message, echoed in cases:
            self.client.send(message)
            reply = yield self.client.next()
            assert_error(self, reply, INVALID_REQUEST, echoed)

    @inlineCallbacks
    def test_method_not_found(self) -> Any:
        """
        An unknown name is -32601, and a backend-only name gets exactly the
        same answer (same code, message, no data), whatever its params: a
        browser cannot learn which backend methods exist, nor find them in
        rpc.discover.
        """
        reply = yield self.client.request("no.such.method", {})
        unknown = assert_error(self, reply, METHOD_NOT_FOUND, reply["id"])
        for name in BACKEND_ONLY:
            for params in ({}, {"room": "workspace:1", "event": "x", "data": {}}, ["x"], None):
                reply = yield self.client.request(name, params)
                error = assert_error(self, reply, METHOD_NOT_FOUND, reply["id"])
                self.assertEqual(error, unknown, name)
        document = yield self.client.call("rpc.discover")
        listed = {m["name"] for m in document["methods"]}
        self.assertIn("rooms.join", listed)
        self.assertEqual(listed & set(BACKEND_ONLY), set())

    @inlineCallbacks
    def test_invalid_params(self) -> Any:
        """
        -32602 lists every problem in data.errors as {field, message}: unknown
        names, missing required ones, wrong types, a value breaking the room
        name pattern, and positional params.
        """
        cases: list[tuple[str, Any, set[str]]] = [
            ("rooms.join", {"room": "workspace:1", "bogus": 1, "other": 2}, {"bogus", "other"}),
            ("rooms.join", {}, {"room"}),
            ("rooms.join", {"room": 5}, {"room"}),
            ("rooms.join", {"room": "workspace:1", "since": 12}, {"since"}),
            ("rooms.join", {"room": "not a room!"}, {"room"}),
            ("rooms.join", {"since": [], "token": {}}, {"room", "since", "token"}),
            ("rooms.leave", ["workspace:1"], {"params"}),
            ("system.ping", {"extra": True}, {"extra"}),
            ("system.ping", [], {"params"}),
            ("auth.authenticate", {}, {"token"}),
            ("auth.authenticate", {"token": 1}, {"token"}),
        ]
        for method, params, fields in cases:
            reply = yield self.client.request(method, params)
            error = assert_error(self, reply, INVALID_PARAMS, reply["id"])
            errors = error["data"]["errors"]
            self.assertIsInstance(errors, list)
            for item in errors:
                self.assertEqual(set(item), {"field", "message"}, item)
                self.assertIsInstance(item["field"], str)
                self.assertIsInstance(item["message"], str)
                self.assertTrue(item["message"])
            self.assertEqual({e["field"] for e in errors}, fields, (method, params))

    @inlineCallbacks
    def test_positional_params_notification_gets_no_reply(self) -> Any:
        """
        A notification with positional params is still a notification: it is
        refused silently (JSON-RPC 2.0: never reply to a notification).
        """
        self.client.send(notify("system.ping") | {"params": [1, 2]})
        self.client.send(notify("rooms.join") | {"params": ["workspace:1"]})
        self.client.send(ping("after"))
        reply = yield self.client.next()
        self.assertEqual(reply["id"], "after")
        self.assertIn("result", reply)

    @inlineCallbacks
    def test_not_found(self) -> Any:
        """Leaving, or asking the presence of, a room the connection is not in is -32004."""
        reply = yield self.client.request("rooms.leave", {"room": "workspace:9"})
        assert_error(self, reply, NOT_FOUND, reply["id"])
        reply = yield self.client.request("presence.list", {"room": "workspace:9"})
        assert_error(self, reply, NOT_FOUND, reply["id"])
        yield self.client.call("rooms.join", {"room": "workspace:9"})
        yield self.client.call("rooms.leave", {"room": "workspace:9"})
        reply = yield self.client.request("rooms.leave", {"room": "workspace:9"})
        assert_error(self, reply, NOT_FOUND, reply["id"])

    @inlineCallbacks
    def test_ids_echoed_exactly(self) -> Any:
        """
        Ids are echoed with their exact value and JSON type: strings (empty,
        unicode, a lone surrogate), integers (negative, beyond 64 bits),
        floats, and null; on results and on errors alike.
        """
        ids: list[Any] = [
            "abc",
            "",
            "ünïcødé ✓ 😀 \u2028",
            "\ud800",
            0,
            -1,
            2**64 + 1,
            -(10**30),
            1.5,
            -0.25,
            1e300,
            None,
        ]
        for request_id in ids:
            for method in ("system.ping", "no.such.method"):
                self.client.send_raw(
                    json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method})
                )
                reply = yield self.client.next()
                self.assertIn("id", reply)
                self.assertEqual(reply["id"], request_id)
                self.assertIs(type(reply["id"]), type(request_id))
                self.assertEqual("result" in reply, method == "system.ping")

    @inlineCallbacks
    def test_id_null_is_a_request(self) -> Any:
        """An explicit "id": null is a request (it gets a reply with id null), not a notification."""
        self.client.send(ping(None))
        reply = yield self.client.next()
        self.assertIsNone(reply["id"])
        self.assertIs(reply["result"]["pong"], True)


class InternalErrorTests(TestCase):
    """-32603 never carries a traceback or exception text."""

    def register(self, registry: Registry) -> None:
        def boom(call: Any, params: Any) -> Any:
            raise ValueError("secret-detail: /etc/shadow")

        async def async_boom(call: Any, params: Any) -> Any:
            raise KeyError("secret-detail")

        def deferred_boom(call: Any, params: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            reactor.callLater(0, d.errback, TypeError("secret-detail"))
            return d

        def unencodable(call: Any, params: Any) -> Any:
            return {"value": object()}

        def not_a_number(call: Any, params: Any) -> Any:
            return {"value": math.nan}

        registry.method("test.boom")(boom)
        registry.method("test.async_boom")(async_boom)
        registry.method("test.deferred_boom")(deferred_boom)
        registry.method("test.unencodable")(unencodable)
        registry.method("test.nan")(not_a_number)

    @inlineCallbacks
    def test_failing_handlers(self) -> Any:
        """
        A handler that raises (directly, in a coroutine, through a Deferred)
        or returns a result JSON cannot carry (an object, NaN) is answered
        -32603 "Internal error" with no data, alone or in a batch, and the
        connection goes on.
        """
        running = yield start_node(self, extensions=(self.register,))
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.close)
        names = ("test.boom", "test.async_boom", "test.deferred_boom", "test.unencodable", "test.nan")
        for name in names:
            client.send_raw(json.dumps({"jsonrpc": "2.0", "id": name, "method": name}))
            raw = yield client.next()
            error = assert_error(self, raw, INTERNAL_ERROR, name)
            self.assertEqual(error, {"code": INTERNAL_ERROR, "message": "Internal error"})
            for leak in LEAKS:
                self.assertNotIn(leak, json.dumps(raw))
        batch = [{"jsonrpc": "2.0", "id": i, "method": name} for i, name in enumerate(names)]
        batch.append(ping("last"))
        client.send(batch)
        replies = yield client.next()
        self.assertEqual([r["id"] for r in replies], [*range(len(names)), "last"])
        for reply in replies[:-1]:
            assert_error(self, reply, INTERNAL_ERROR, reply["id"])
        self.assertIs(replies[-1]["result"]["pong"], True)
        self.assertEqual((yield client.call("system.ping"))["pong"], True)
        self.flushLoggedErrors(ValueError, KeyError, TypeError)


class AuthenticationGateTests(TestCase):
    """Before authentication only auth.authenticate and system.ping answer."""

    @inlineCallbacks
    def test_gate(self) -> Any:
        """
        Every other name -- client methods, backend-only names, unknown names,
        auth.refresh -- is -32001 until auth.authenticate succeeds; then the
        same calls answer normally.
        """
        running = yield start_node(self)
        client = yield running.connect()
        self.addCleanup(client.close)
        self.assertIs((yield client.call("system.ping"))["pong"], True)
        gated = [
            ("system.info", None),
            ("rpc.discover", None),
            ("rooms.list", None),
            ("rooms.join", {"room": "broadcast"}),
            ("rooms.leave", {"room": "broadcast"}),
            ("presence.list", {"room": "workspace:1"}),
            ("presence.count", {"room": "workspace:1"}),
            ("auth.refresh", {"token": mint_token("alice")}),
            ("no.such.method", None),
            ("publish", {"room": "broadcast", "event": "x", "data": {}}),
            ("connections.disconnect", {"user_id": "alice"}),
        ]
        for method, params in gated:
            reply = yield client.request(method, params)
            assert_error(self, reply, UNAUTHENTICATED, reply["id"])
        # a gated notification is refused silently
        client.send(notify("rooms.list"))
        reply = yield client.request("auth.authenticate", {"token": "not-a-jwt"})
        assert_error(self, reply, UNAUTHENTICATED, reply["id"])
        result = yield client.call("auth.authenticate", {"token": mint_token("alice")})
        self.assertEqual(result["user_id"], "alice")
        info = yield client.call("system.info")
        self.assertEqual(info["protocol"], 1)
        rooms = yield client.call("rooms.list")
        self.assertEqual(sorted(rooms["rooms"]), ["broadcast", "user:alice"])
        reply = yield client.request("publish", {"room": "broadcast", "event": "x", "data": {}})
        assert_error(self, reply, METHOD_NOT_FOUND, reply["id"])

    @inlineCallbacks
    def test_auth_timeout(self) -> Any:
        """
        A connection that does not authenticate within auth_timeout is closed
        with 4001; a bad token in auth.authenticate is -32001 and leaves the
        connection open until then.
        """
        running = yield start_node(self, auth_timeout=0.5)
        client = yield running.connect()
        self.assertIs((yield client.call("system.ping"))["pong"], True)
        reply = yield client.request("auth.authenticate", {"token": mint_token("alice", ttl=-60)})
        assert_error(self, reply, UNAUTHENTICATED, reply["id"])
        self.assertIs((yield client.call("system.ping"))["pong"], True)
        code, _ = yield client.closed
        self.assertEqual(code, 4001)

    @inlineCallbacks
    def test_authenticated_in_time_stays_open(self) -> Any:
        """Authenticating before auth_timeout cancels the 4001 close."""
        running = yield start_node(self, auth_timeout=0.3)
        client = yield running.connect()
        yield client.call("auth.authenticate", {"token": mint_token("alice")})
        timer: Deferred[None] = Deferred()
        reactor.callLater(0.6, timer.callback, None)
        yield timer
        self.assertFalse(client.closed.called)
        self.assertIs((yield client.call("system.ping"))["pong"], True)
        yield client.close()


class BatchTests(TestCase):
    """Batches as JSON-RPC 2.0 and PROTOCOL.md section 3 say."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.running = yield start_node(self, rate_limit=10000)
        self.client = yield self.running.connect(mint_token("alice", rooms=["workspace:*"]))
        self.addCleanup(self.client.close)

    @inlineCallbacks
    def test_mixed_batch(self) -> Any:
        """
        Replies come back as one array, in request order; notifications
        (valid or not callable) have no entry, invalid entries and errors do.
        """
        self.client.send(
            [
                ping(1),
                {"foo": "bar"},
                notify("system.ping"),
                {"jsonrpc": "2.0", "id": 2, "method": "no.such.method"},
                notify("no.such.method"),
                {"jsonrpc": "2.0", "id": "three", "method": "rooms.join", "params": {"room": 1}},
                5,
                {"jsonrpc": "2.0", "id": 4.5, "method": "rooms.join", "params": {"room": "workspace:1"}},
                ping("last"),
            ]
        )
        replies = yield self.client.next()
        self.assertIsInstance(replies, list)
        self.assertEqual([r["id"] for r in replies], [1, None, 2, "three", None, 4.5, "last"])
        self.assertIs(replies[0]["result"]["pong"], True)
        assert_error(self, replies[1], INVALID_REQUEST, None)
        assert_error(self, replies[2], METHOD_NOT_FOUND, 2)
        assert_error(self, replies[3], INVALID_PARAMS, "three")
        assert_error(self, replies[4], INVALID_REQUEST, None)
        self.assertEqual(replies[5]["result"]["room"], "workspace:1")
        self.assertIs(replies[6]["result"]["pong"], True)

    @inlineCallbacks
    def test_only_notifications(self) -> Any:
        """
        A batch of only notifications gets no reply at all: the next message
        the client receives is the reply to a ping sent after it.
        """
        self.client.send([notify("system.ping"), notify("no.such.method"), notify("rooms.list")])
        self.client.send(ping("after"))
        reply = yield self.client.next()
        self.assertEqual(reply, {"jsonrpc": "2.0", "id": "after", "result": reply["result"]})

    @inlineCallbacks
    def test_empty_batch(self) -> Any:
        """An empty batch is one -32600 error object (not an array), id null."""
        self.client.send_raw("[]")
        reply = yield self.client.next()
        assert_error(self, reply, INVALID_REQUEST, None)

    @inlineCallbacks
    def test_batch_size_limit(self) -> Any:
        """A batch of 100 entries is answered entry by entry; 101 is one -32600."""
        self.client.send([ping(i) for i in range(100)])
        replies = yield self.client.next()
        self.assertEqual([r["id"] for r in replies], list(range(100)))
        self.assertTrue(all(r["result"]["pong"] is True for r in replies))
        self.client.send([ping(i) for i in range(101)])
        reply = yield self.client.next()
        assert_error(self, reply, INVALID_REQUEST, None)
        self.assertEqual((yield self.client.call("system.ping"))["pong"], True)

    @inlineCallbacks
    def test_batch_of_invalid_entries(self) -> Any:
        """A batch of non-objects gets one -32600 per entry (not a single error)."""
        self.client.send_raw("[1, 2, 3]")
        replies = yield self.client.next()
        self.assertEqual(len(replies), 3)
        for reply in replies:
            assert_error(self, reply, INVALID_REQUEST, None)


class RateLimitTests(TestCase):
    """UNREALON_RATE_LIMIT: calls per second per connection, burst twice that."""

    @inlineCallbacks
    def test_burst_then_limited(self) -> Any:
        """
        With rate_limit=5 a burst of 10 messages passes and the next ones are
        -32029 with a positive integer data.retry_after_ms.  auth.* calls
        count like any other message (PROTOCOL.md section 3): 3 of them and
        7 pings make the burst, and the auth calls are refused past it too.
        """
        running = yield start_node(self, rate_limit=5)
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.close)
        token = mint_token("alice", ttl=600)
        for i in range(3):
            client.send({"jsonrpc": "2.0", "id": f"auth{i}", "method": "auth.authenticate",
                         "params": {"token": token}})
        for i in range(8):
            client.send(ping(i))
        client.send({"jsonrpc": "2.0", "id": "late", "method": "auth.refresh",
                     "params": {"token": token}})
        replies = []
        for _ in range(12):
            replies.append((yield client.next()))
        for reply in replies[:3]:
            self.assertIn("result", reply, reply)
        for reply in replies[3:10]:
            self.assertIs(reply["result"]["pong"], True)
        error = assert_error(self, replies[10], RATE_LIMITED, 7)
        retry = error["data"]["retry_after_ms"]
        self.assertIsInstance(retry, int)
        self.assertTrue(0 < retry <= 1000, retry)
        assert_error(self, replies[11], RATE_LIMITED, "late")

    @inlineCallbacks
    def test_batch_entries_and_notifications_count(self) -> Any:
        """
        Each batch entry counts on its own, and notifications count: after 4
        notifications a batch of 8 pings has 6 answered and 2 limited.
        """
        running = yield start_node(self, rate_limit=5)
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.close)
        for _ in range(4):
            client.send(notify("system.ping"))
        client.send([ping(i) for i in range(8)])
        replies = yield client.next()
        self.assertEqual([r["id"] for r in replies], list(range(8)))
        self.assertEqual(["result" in r for r in replies], [True] * 6 + [False] * 2)
        for reply in replies[6:]:
            assert_error(self, reply, RATE_LIMITED, reply["id"])


class TokenBucketTests(SynchronousTestCase):
    """The per-connection token bucket, on a clock."""

    def test_burst_refill_and_wait(self) -> None:
        """A full burst, then one token per 1/rate s; the wait says when the next one is back."""
        clock = Clock()
        bucket = TokenBucket(5, 10, clock)
        self.assertEqual([bucket.take() for _ in range(10)], [0.0] * 10)
        self.assertAlmostEqual(bucket.take(), 0.2)
        clock.advance(0.1)
        self.assertAlmostEqual(bucket.take(), 0.1)
        clock.advance(0.1)
        self.assertEqual(bucket.take(), 0.0)
        clock.advance(100)
        self.assertEqual([bucket.take() for _ in range(10)], [0.0] * 10)
        self.assertGreater(bucket.take(), 0)

    def test_clock_stepping_back(self) -> None:
        """
        The reactor's clock is wall time and may step back: that must not put
        the bucket into a debt that locks the client out.
        """
        clock = Clock()
        clock.advance(10_000)
        bucket = TokenBucket(5, 10, clock)
        bucket.take()
        clock.rightNow -= 3600  # NTP steps the clock back an hour
        self.assertEqual(bucket.take(), 0.0)
        self.assertEqual([bucket.take() for _ in range(8)], [0.0] * 8)
        self.assertGreater(bucket.take(), 0)
        clock.advance(0.25)
        self.assertEqual(bucket.take(), 0.0)


class RateAbuseTests(SynchronousTestCase):
    """
    4029 after 10 s over the limit, on a clock: the node's real session on a
    fake transport, its reactor a L{task.Clock}.
    """

    def closes(self, session: SyncSession) -> list[int | None]:
        return [f.close_code for f in session.take() if f.opcode == OP_CLOSE]

    def flood(self, session: SyncSession, per_second: int, seconds: int) -> list[Any]:
        """Send C{per_second} pings each clock second; return every reply and close frame."""
        frames = []
        for _ in range(seconds):
            for _ in range(per_second):
                frames.extend(session.send(json.dumps(ping())))
                session.clock.advance(1.0 / per_second)
        return frames

    def test_flood_closed_with_4029(self) -> None:
        """
        A client sending twice the limit without pause is over the limit: the
        token bucket lets one call through every 1/rate s, but that trickle
        does not reset the count, and after 10 s the session closes with 4029.
        """
        service = build_node(self, rate_limit=5)
        session = SyncSession(service, mint_token("alice"))
        frames = self.flood(session, per_second=10, seconds=9)
        self.assertEqual([f for f in frames if f.opcode == OP_CLOSE], [])
        texts = [f.json() for f in frames if f.opcode == OP_TEXT]
        self.assertTrue(any("result" in t for t in texts[20:]))  # the trickle got through
        self.assertTrue(any("error" in t for t in texts))
        frames = self.flood(session, per_second=10, seconds=4)
        self.assertEqual([f.close_code for f in frames if f.opcode == OP_CLOSE], [4029])
        session.lose()

    def test_bursts_within_limit_not_closed(self) -> None:
        """
        A client that bursts past the limit now and then but stays under it on
        average is refused during its bursts and never closed.
        """
        service = build_node(self, rate_limit=5)
        session = SyncSession(service, mint_token("alice"))
        limited = 0
        for _ in range(15):
            frames = [f for _ in range(12) for f in session.send(json.dumps(ping()))]
            self.assertEqual([f for f in frames if f.opcode == OP_CLOSE], [])
            limited += sum("error" in f.json() for f in frames)
            session.clock.advance(3.0)
        self.assertTrue(limited > 0)
        self.assertFalse(session.disconnecting)
        session.lose()

    def test_limited_then_calm_resets(self) -> None:
        """Being limited, pausing, then flooding again starts a new 10 s count."""
        service = build_node(self, rate_limit=5)
        session = SyncSession(service, mint_token("alice"))
        frames = self.flood(session, per_second=10, seconds=8)
        session.clock.advance(5)
        frames += self.flood(session, per_second=10, seconds=8)
        self.assertEqual([f for f in frames if f.opcode == OP_CLOSE], [])
        frames = self.flood(session, per_second=10, seconds=5)
        self.assertEqual([f.close_code for f in frames if f.opcode == OP_CLOSE], [4029])
        session.lose()


class MessageLimitTests(TestCase):
    """UNREALON_MAX_MESSAGE_SIZE and binary messages."""

    @inlineCallbacks
    def test_message_too_big(self) -> Any:
        """A single message over max_message_size is closed with 1009."""
        running = yield start_node(self, max_message_size=1024)
        client = yield running.connect(mint_token("alice"))
        message = json.dumps(ping() | {"params": {"pad": "x" * 1000}})
        self.assertGreater(len(message), 1024)
        client.send_raw(message)
        code, _ = yield client.closed
        self.assertEqual(code, 1009)

    @inlineCallbacks
    def test_message_at_limit_passes(self) -> Any:
        """A message of exactly max_message_size bytes is read (and answered)."""
        running = yield start_node(self, max_message_size=1024)
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.close)
        base = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "system.ping", "params": {"p": ""}})
        message = base.replace('"p": ""', '"p": "' + "x" * (1024 - len(base)) + '"')
        self.assertEqual(len(message), 1024)
        client.send_raw(message)
        reply = yield client.next()
        assert_error(self, reply, INVALID_PARAMS, 1)

    @inlineCallbacks
    def test_fragmented_message_too_big(self) -> Any:
        """
        The limit applies to the whole message after reassembly: frames of
        400 bytes each (under the limit) adding up to 1500 are closed with 1009.
        """
        running = yield start_node(self, max_message_size=1024)
        client = yield running.connect(mint_token("alice"))
        message = json.dumps(ping() | {"params": {"pad": "x" * 1450}}).encode()
        assert client.protocol is not None
        client.protocol.sendMessage(message, isBinary=False, fragmentSize=400)
        code, _ = yield client.closed
        self.assertEqual(code, 1009)

    @inlineCallbacks
    def test_fragmented_message_under_limit(self) -> Any:
        """A fragmented message under the limit is reassembled and answered."""
        running = yield start_node(self, max_message_size=1024)
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.close)
        message = json.dumps(ping(7)).encode()
        assert client.protocol is not None
        client.protocol.sendMessage(message, isBinary=False, fragmentSize=5)
        reply = yield client.next()
        self.assertEqual(reply["id"], 7)

    @inlineCallbacks
    def test_limit_is_for_client_messages_only(self) -> Any:
        """
        Replies larger than max_message_size still go out: rpc.discover's
        document (about 10 kB) reaches a client of a node limited to 1 kB.
        """
        running = yield start_node(self, max_message_size=1024)
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.close)
        document = yield client.call("rpc.discover")
        self.assertGreater(len(json.dumps(document)), 1024)
        self.assertIn("methods", document)

    @inlineCallbacks
    def test_binary_message(self) -> Any:
        """A binary message is closed with 1003, authenticated or not."""
        running = yield start_node(self)
        for token in (mint_token("alice"), None):
            client = yield running.connect(token)
            client.send_raw(json.dumps(ping()).encode(), binary=True)
            code, _ = yield client.closed
            self.assertEqual(code, 1003)


class HandshakeTests(TestCase):
    """Origin allow-list and path, decided before the upgrade."""

    @inlineCallbacks
    def test_origin(self) -> Any:
        """
        With UNREALON_ALLOWED_ORIGINS set, a listed Origin upgrades (101), an
        unlisted one -- another host, another scheme, another port, the
        string "null" -- gets HTTP 403, and no Origin at all is not refused.
        """
        running = yield start_node(self, allowed_origins="https://app.example.com,http://localhost:3000")
        port = running.ws_port
        for origin in ("https://app.example.com", "http://localhost:3000", None):
            head = yield raw_handshake(port, handshake_request(origin=origin), head_only=True)
            self.assertEqual(status_of(head), 101, (origin, head))
        for origin in (
            "https://evil.example.com",
            "http://app.example.com",
            "https://app.example.com:8443",
            "http://localhost:3001",
            "null",
        ):
            head = yield raw_handshake(port, handshake_request(origin=origin), head_only=True)
            self.assertEqual(status_of(head), 403, (origin, head))

    @inlineCallbacks
    def test_origin_with_real_client(self) -> Any:
        """A real client sending an allowed Origin header opens and is served; a refused one fails."""
        running = yield start_node(self, allowed_origins="https://app.example.com")
        client = yield running.connect(
            mint_token("alice"), headers={"Origin": "https://app.example.com"}
        )
        self.assertIs((yield client.call("system.ping"))["pong"], True)
        yield client.close()
        failure = yield self.assertFailure(
            running.connect(mint_token("alice"), headers={"Origin": "https://evil.example.com"}),
            ConnectionError,
        )
        self.assertIn("403", str(failure))

    @inlineCallbacks
    def test_any_origin_by_default(self) -> Any:
        """The default allow-list is *: any Origin upgrades."""
        running = yield start_node(self)
        head = yield raw_handshake(running.ws_port, handshake_request(origin="https://any.example"), head_only=True)
        self.assertEqual(status_of(head), 101)

    @inlineCallbacks
    def test_compression_off_by_default(self) -> Any:
        """A permessage-deflate offer is not accepted unless compression is configured."""
        offer = ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",)
        running = yield start_node(self)
        head = yield raw_handshake(running.ws_port, handshake_request(extra=offer), head_only=True)
        self.assertEqual(status_of(head), 101)
        self.assertNotIn(b"permessage-deflate", head.lower())
        running = yield start_node(self, compression=1)
        head = yield raw_handshake(running.ws_port, handshake_request(extra=offer), head_only=True)
        self.assertEqual(status_of(head), 101)
        self.assertIn(b"permessage-deflate", head.lower())

    @inlineCallbacks
    def test_size_limit_after_decompression(self) -> Any:
        """
        With compression on, the limit applies to the message after
        decompression: 5 000 bytes that deflate to a few dozen are closed with
        1009, while a compressed message under the limit is answered.
        """
        # Autobahn then waits for a closing handshake that does not come
        # (after a failure mid-inflate it stops reading frames) and drops the
        # connection at the handshake timeout: keep that short here (its
        # timers are floored to whole seconds, so not under 1 s).
        running = yield start_node(self, compression=1, max_message_size=1024, handshake_timeout=1.5)
        client = yield connect_compressed(running.ws_port, mint_token("alice"))
        assert client.protocol is not None
        self.assertIsNotNone(client.protocol._perMessageCompress)
        client.send(ping(1) | {"params": {}})
        reply = yield client.next()
        self.assertIs(reply["result"]["pong"], True)
        client.send(ping(2) | {"params": {"pad": "x" * 5000}})
        code, _ = yield client.closed
        self.assertEqual(code, 1009)

    @inlineCallbacks
    def test_wrong_path(self) -> Any:
        """A handshake on a path other than /ws gets HTTP 404."""
        running = yield start_node(self)
        for path in ("/other", "/", "/ws/x"):
            head = yield raw_handshake(running.ws_port, handshake_request(path=path), head_only=True)
            self.assertEqual(status_of(head), 404, path)



class LazyOptionsLogTests(SynchronousTestCase):
    """Autobahn's per-connection options dump is formatted only when someone logs it."""

    def test_options_dump_is_lazy_and_still_complete(self) -> None:
        import pprint

        import txaio
        from autobahn.websocket import protocol as autobahn_protocol
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        previous = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, previous)

        service = build_node(self)
        session = SyncSession(service, mint_token("alice"))
        self.addCleanup(session.lose)

        self.assertIs(autobahn_protocol.pformat, pprint.pformat)
        dumps = [e for e in events if e.get("log_format") == "\n{attrs}"]
        self.assertEqual(len(dumps), 1)
        self.assertNotIsInstance(dumps[0]["attrs"], str)  # not formatted on the way in
        text = formatEvent(dumps[0])
        self.assertIn("'maxMessagePayloadSize'", text)
        self.assertIn("'autoPingInterval'", text)


class RateGuardTests(SynchronousTestCase):
    """L{RateGuard}: the per-message verdicts of PROTOCOL.md section 3, on a clock."""

    def test_more_than_ten_times_the_limit_within_a_second_closes(self) -> None:
        """
        With a limit of 5/s, 50 messages within one second are refused, not
        closed; the 51st in that second closes.
        """
        clock = Clock()
        guard = RateGuard(5, clock)
        verdicts = []
        for _ in range(50):
            verdicts.append(guard.admit())
            clock.advance(0.019)
        self.assertEqual(verdicts[:10], [Verdict.HANDLE] * 10)
        self.assertNotIn(Verdict.CLOSE, verdicts)
        self.assertEqual(guard.admit(), Verdict.CLOSE)

    def test_the_window_slides(self) -> None:
        """
        400 messages at the end of one second and 400 at the start of the
        next are 800 within one second: closed, although neither fixed
        window holds more than 500.
        """
        clock = Clock()
        guard = RateGuard(50, clock)
        clock.advance(0.9)
        for _ in range(400):
            self.assertNotEqual(guard.admit(), Verdict.CLOSE)
        clock.advance(0.2)
        verdicts = [guard.admit() for _ in range(400)]
        self.assertIn(Verdict.CLOSE, verdicts)
        self.assertLess(verdicts.index(Verdict.CLOSE), 300)

    def test_twice_the_limit_for_ten_seconds_closes(self) -> None:
        clock = Clock()
        guard = RateGuard(5, clock)
        verdicts = []
        for _ in range(14 * 10):
            verdicts.append(guard.admit())
            clock.advance(0.1)
        # refused from about 2 s on (the burst of 10 is gone), closed 10 s later
        first_refused = verdicts.index(Verdict.REFUSE)
        self.assertNotIn(Verdict.CLOSE, verdicts[: first_refused + 99])
        # (which message it is depends on which of them the bucket refuses)
        self.assertLessEqual(abs(verdicts.index(Verdict.CLOSE) - (first_refused + 100)), 2)

    def test_retry_after(self) -> None:
        clock = Clock()
        guard = RateGuard(4, clock)
        for _ in range(8):
            self.assertEqual(guard.admit(), Verdict.HANDLE)
        self.assertEqual(guard.admit(), Verdict.REFUSE)
        self.assertEqual(guard.retry_after_ms(), 250)

    def test_a_limit_below_one_per_second_still_admits(self) -> None:
        clock = Clock()
        guard = RateGuard(0.2, clock)
        self.assertEqual(guard.admit(), Verdict.HANDLE)
        self.assertEqual(guard.admit(), Verdict.REFUSE)
        clock.advance(5)
        self.assertEqual(guard.admit(), Verdict.HANDLE)


class CountingTransport(FakeTransport):
    """Counts writes: what the kernel would see as sends."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class RefusalTests(SynchronousTestCase):
    """Refused messages are not handled, and the replies they get stay small."""

    def test_refused_calls_are_not_handled(self) -> None:
        """Past the burst, a method's handler is never run, whatever the message."""
        ran = []

        def extension(registry: Registry) -> None:
            registry.method("test.count")(lambda call, params: ran.append(1) or {"n": len(ran)})

        service = build_node(self, (extension,), rate_limit=5)
        session = SyncSession(service, mint_token("alice"))
        for _ in range(10):  # the burst, spent on notifications
            self.assertEqual(session.call({"jsonrpc": "2.0", "method": "test.count"}), [])
        replies = []
        for i in range(20):
            replies += session.call({"jsonrpc": "2.0", "id": i, "method": "test.count"})
            session.call({"jsonrpc": "2.0", "method": "test.count"})
        self.assertEqual(len(ran), 10)
        self.assertEqual([r["id"] for r in replies], list(range(20)))
        for reply in replies:
            self.assertEqual(reply["error"]["code"], -32029)
            self.assertEqual(set(reply["error"]["data"]), {"retry_after_ms"})
        session.lose()

    def test_invalid_params_errors_capped_and_reply_bounded(self) -> None:
        """
        A request with 500 unknown params gets at most 20 entries in
        data.errors, and no error reply is larger than its message plus 1 KiB.
        """
        service = build_node(self, rate_limit=1000, max_message_size=1_000_000)
        session = SyncSession(service, mint_token("alice"))
        for width in (1, 40, 300):
            params = {f"{'k' * width}{i}": i for i in range(500)}
            message = json.dumps({"jsonrpc": "2.0", "id": "x" * 100, "method": "system.ping",
                                  "params": params})
            [frame] = session.send(message)
            reply = frame.json()
            self.assertEqual(reply["error"]["code"], -32602)
            self.assertLessEqual(len(reply["error"]["data"]["errors"]), 20)
            self.assertGreater(len(reply["error"]["data"]["errors"]), 0)
            self.assertLessEqual(len(frame.payload), len(message.encode()) + 1024)
        # field paths built from a client's keys are cut, so even one huge key is small
        message = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "system.ping",
                              "params": {"k" * 5000: 1}})
        [frame] = session.send(message)
        self.assertLess(len(frame.payload), 600)
        session.lose()

    def test_replies_to_one_read_leave_in_one_write(self) -> None:
        """Ten requests arriving in one read are answered with one write, at the end of the turn."""
        service = build_node(self, rate_limit=1000)
        session = SyncSession(service, mint_token("alice"))
        counting = CountingTransport()
        session.protocol.transport = counting
        session.transport = counting
        data = b"".join(client_frame(json.dumps(ping(i)).encode()) for i in range(10))
        session.protocol.dataReceived(data)
        self.assertEqual(counting.writes, 0)
        frames = session.take()
        self.assertEqual([f.json()["id"] for f in frames], list(range(10)))
        self.assertEqual(counting.writes, 1)
        session.lose()

    def test_events_of_one_turn_leave_in_one_write(self) -> None:
        """Events delivered outside a read are written once, at the end of the turn."""
        service = build_node(self)
        session = SyncSession(service, mint_token("alice", rooms=["*"]))
        session.call({"jsonrpc": "2.0", "id": 1, "method": "rooms.join",
                      "params": {"room": "workspace:1"}})
        counting = CountingTransport()
        session.protocol.transport = counting
        session.transport = counting
        broker = service.node.broker
        for seq in range(5):
            broker.publish("workspace:1", "test.event", {"seq": seq})
        self.assertEqual(counting.writes, 0)
        session.clock.advance(0)
        self.assertEqual(counting.writes, 1)
        events = [f.json()["params"]["data"]["seq"] for f in session.take()]
        self.assertEqual(events, list(range(5)))
        session.lose()


class JoinPresenceTests(SynchronousTestCase):
    def test_the_join_reply_does_not_wait_for_the_presence_write(self) -> None:
        """
        rooms.join answers once the history is read: its presence write goes
        out after that read (so a close during the read drops it) and is not
        waited for (one store round trip per join, not two).
        """
        service = build_node(self)
        presence = service.node.presence
        writes: list[tuple[str, str]] = []

        def join(room: str, user_id: str, conn_id: str, info: Any) -> Deferred[None]:
            writes.append((room, user_id))
            return Deferred()  # a write that never lands

        self.patch(presence, "join", join)
        session = SyncSession(service, mint_token("alice", rooms=["*"]))
        replies = session.call({"jsonrpc": "2.0", "id": 1, "method": "rooms.join",
                                "params": {"room": "workspace:1"}})
        self.assertEqual([r.get("id") for r in replies], [1])
        self.assertEqual(replies[0]["result"]["room"], "workspace:1")
        self.assertEqual(writes, [("workspace:1", "alice")])
        session.lose()
