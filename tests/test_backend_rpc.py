"""
Browser calls to backend methods, the node's side (PROTOCOL.md section 9.3),
on a real node, a real Redis and a real WebSocket client.

The worker here is the test itself, speaking the contract's stream layouts
by hand (read the call from C{stream:backend}, append replies to its
C{reply_to}), so each rule can be driven exactly: a duplicate progress item,
a late result, a malformed error.  The real worker package is driven end to
end in C{tests/test_backend_e2e.py}.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.helpers.node import mint_token, start_node
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until
from unrealon.engine.redisclient import StreamClient, connect, parse_redis_url

METHODS = "unrealon:backend:methods"
WORKERS = "unrealon:backend:workers"

ECHO = {
    "name": "demo.echo",
    "description": "Says it back, with progress",
    "params": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1},
                       "times": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["text"],
        "additionalProperties": False,
    },
    "result": {"type": "object", "properties": {"echo": {"type": "string"}}},
    "progress": {"type": "object", "properties": {"n": {"type": "integer"}}},
    "idempotent": False,
    "pass_claims": ["org", "sub", "exp"],
}


def wait(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


class BackendCallTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        address = parse_redis_url(self.server.url)
        self.redis = connect(address)
        self.addCleanup(self.redis.disconnect)
        self.reader = connect(address, blocking=True)
        self.addCleanup(self.reader.disconnect)
        self.streams = StreamClient(self.redis)
        self.calls_read = "0-0"

    @inlineCallbacks
    def start(self, **settings: Any) -> Any:
        self.running = yield start_node(self, redis_url=self.server.url, node_id="n1", **settings)
        return self.running

    # -- the worker's side, by hand ---------------------------------------------------

    @inlineCallbacks
    def declare(self, declaration: dict[str, Any], *, live: bool = True,
                worker: str = "w1") -> Any:
        yield self.redis.execute_command("HSET", METHODS, declaration["name"],
                                         json.dumps(declaration))
        now_s, now_us = yield self.redis.execute_command("TIME")
        now = int(now_s) * 1000 + int(now_us) // 1000
        expires = now + 10_000 if live else now - 1
        yield self.redis.execute_command(
            "HSET", WORKERS, worker,
            json.dumps({"methods": [declaration["name"]], "expires": expires}))

    @inlineCallbacks
    def declared(self, client: Any, name: str, present: bool = True) -> Any:
        """Wait (at most 3 s) until rpc.discover shows C{name} (or no longer does)."""
        for _ in range(30):
            doc = yield client.call("rpc.discover")
            names = {m["name"] for m in doc["methods"]}
            if (name in names) == present:
                return doc
            yield wait(0.1)
        self.fail(f"{name} {'never' if present else 'still'} in rpc.discover")

    @inlineCallbacks
    def next_call(self) -> Any:
        """The next call appended to stream:backend, decoded."""
        batches = yield StreamClient(self.reader).xread(
            {"stream:backend": self.calls_read}, count=1, block_ms=5000)
        self.assertTrue(batches, "no call was appended to stream:backend")
        entry = batches[0][1][0]
        self.calls_read = entry.id
        self.assertEqual(set(entry.fields), {"payload"})
        return json.loads(entry.fields["payload"])

    def answer(self, call: dict[str, Any], **reply: Any) -> Any:
        reply["call_id"] = call["call_id"]
        return self.streams.xadd(call["reply_to"], {"payload": json.dumps(reply)})

    @inlineCallbacks
    def metrics(self) -> Any:
        """The node's backend gauges, from /metrics."""
        code, body = yield self.running.http_get("/metrics")
        self.assertEqual(code, 200)
        values = {}
        for line in body.decode().splitlines():
            if line.startswith("unrealon_backend_"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    @inlineCallbacks
    def client(self, methods: list[str] | None = None, **claims: Any) -> Any:
        if methods is not None:
            claims["methods"] = methods
        client = yield self.running.connect(mint_token("ann", **claims))
        self.addCleanup(client.drop)
        return client

    @inlineCallbacks
    def ready(self, methods: list[str] | None = None, **claims: Any) -> Any:
        """A node, the echo method declared, a client that may call it."""
        yield self.start()
        yield self.declare(ECHO)
        client = yield self.client(["demo.*"] if methods is None else methods, **claims)
        yield self.declared(client, "demo.echo")
        return client

    # -- tests -----------------------------------------------------------------------

    @inlineCallbacks
    def test_call_progress_result(self) -> Any:
        """
        The call reaches the stream as the contract lays it out; progress
        items arrive in order, numbered from 1, then the one result.
        """
        client = yield self.ready(org="acme")
        client.send({"jsonrpc": "2.0", "id": "c1", "method": "demo.echo",
                     "params": {"text": "hi", "times": 2}})
        call = yield self.next_call()
        self.assertEqual(call["method"], "demo.echo")
        self.assertEqual(call["params"], {"text": "hi", "times": 2})
        self.assertEqual(call["user_id"], "ann")
        self.assertEqual(call["node_id"], "n1")
        self.assertTrue(call["connection_id"].startswith("n1/"))
        self.assertTrue(call["call_id"].startswith("n1/"))
        self.assertEqual(call["claims"], {"org": "acme"})  # sub/exp never passed
        self.assertIs(call["idempotent"], False)
        self.assertEqual(call["reply_to"], "unrealon:backend:replies:n1")
        self.assertIsInstance(call["deadline"], int)
        self.assertLess(abs(call["deadline"] / 1000 - (time.time() + 30)), 3)
        yield self.answer(call, type="progress", seq=1, data={"n": 1})
        yield self.answer(call, type="progress", seq=2, data={"n": 2})
        yield self.answer(call, type="result", result={"echo": "hi hi"})
        first = yield client.next()
        second = yield client.next()
        reply = yield client.next()
        self.assertEqual(first, {"jsonrpc": "2.0", "method": "rpc.progress",
                                 "params": {"id": "c1", "seq": 1, "data": {"n": 1}}})
        self.assertEqual(second["params"], {"id": "c1", "seq": 2, "data": {"n": 2}})
        self.assertEqual(reply, {"jsonrpc": "2.0", "id": "c1", "result": {"echo": "hi hi"}})

    @inlineCallbacks
    def test_replaced_worker_progress_not_repeated(self) -> Any:
        """
        A second worker running the call again sends seq 1, 2, ... again:
        the client sees each item once, numbered without gap.
        """
        client = yield self.ready()
        client.send({"jsonrpc": "2.0", "id": 7, "method": "demo.echo", "params": {"text": "x"}})
        call = yield self.next_call()
        for seq in (1, 2, 1, 2, 3):
            yield self.answer(call, type="progress", seq=seq, data={"n": seq})
        yield self.answer(call, type="result", result={"echo": "x"})
        seen = []
        while True:
            message = yield client.next()
            if "id" in message:
                break
            seen.append((message["params"]["seq"], message["params"]["data"]["n"]))
        self.assertEqual(seen, [(1, 1), (2, 2), (3, 3)])
        self.assertEqual(message["result"], {"echo": "x"})

    @inlineCallbacks
    def test_refusals(self) -> Any:
        """Section 9.3's refusals, each with its code, nothing appended for any."""
        yield self.start(backend_max_calls=2)
        yield self.declare(ECHO)
        yield self.declare({**ECHO, "name": "demo.idle"}, live=False, worker="w2")
        yield self.declare({**ECHO, "name": "demo.odd", "params": {"oneOf": []}}, worker="w3")
        client = yield self.client(["demo.*"])
        yield self.declared(client, "demo.echo")
        stranger = yield self.client(["other.*"])

        def code(reply: Any) -> int:
            return int(reply["error"]["code"])

        reply = yield client.request("demo.nothing", {"text": "a"})
        self.assertEqual(code(reply), -32601)
        reply = yield client.request("demo.odd", {"text": "a"})
        self.assertEqual(code(reply), -32601, "a declaration outside the subset is not callable")
        reply = yield stranger.request("demo.echo", {"text": "a"})
        self.assertEqual(code(reply), -32003)
        reply = yield client.request("demo.echo", {"text": "", "times": 9, "more": 1})
        self.assertEqual(code(reply), -32602)
        self.assertEqual(
            sorted(e["field"] for e in reply["error"]["data"]["errors"]),
            ["more", "text", "times"])
        reply = yield client.request("demo.echo", [1])
        self.assertEqual(code(reply), -32602)
        reply = yield client.request("demo.idle", {"text": "a"})
        self.assertEqual(code(reply), -32013)
        self.assertEqual(reply["error"]["data"], {"retryable": True})
        client.send({"jsonrpc": "2.0", "id": None, "method": "demo.echo",
                     "params": {"text": "a"}})
        reply = yield client.next()
        self.assertEqual(code(reply), -32600)
        self.assertEqual(0, (yield self.streams.xlen("stream:backend")))
        # two in flight (the cap), a third refused, a repeated id refused
        client.send({"jsonrpc": "2.0", "id": 1, "method": "demo.echo", "params": {"text": "a"}})
        client.send({"jsonrpc": "2.0", "id": 2, "method": "demo.echo", "params": {"text": "b"}})
        yield self.next_call()
        yield self.next_call()
        metrics = yield self.metrics()
        self.assertEqual(metrics["unrealon_backend_calls_in_flight"], 2.0)
        self.assertEqual(metrics["unrealon_backend_methods_served"], 1.0, "demo.idle has no worker")
        reply = yield client.request("demo.echo", {"text": "c"})
        self.assertEqual(code(reply), -32029)
        self.assertEqual(reply["error"]["data"], {"in_flight": 2})
        client.send({"jsonrpc": "2.0", "id": 1, "method": "demo.echo", "params": {"text": "d"}})
        reply = yield client.next()
        self.assertEqual((reply["id"], code(reply)), (1, -32600))
        self.assertEqual(2, (yield self.streams.xlen("stream:backend")))

    @inlineCallbacks
    def test_deadline(self) -> Any:
        """
        Past its declared timeout a call is answered -32012 and cancelled
        (reason "deadline"); the worker's late result is dropped.
        """
        yield self.start()
        yield self.declare({**ECHO, "timeout": 0.5})
        client = yield self.client(["demo.echo"])
        yield self.declared(client, "demo.echo")
        started = time.monotonic()
        client.send({"jsonrpc": "2.0", "id": 1, "method": "demo.echo", "params": {"text": "a"}})
        call = yield self.next_call()
        reply = yield client.next()
        self.assertGreaterEqual(time.monotonic() - started, 0.45)
        self.assertEqual(reply["error"]["code"], -32012)
        self.assertEqual(reply["error"]["data"], {"timeout_ms": 500})
        reason = yield self.redis.get(f"unrealon:backend:cancel:{call['call_id']}")
        self.assertEqual(reason, "deadline")
        yield self.answer(call, type="result", result={"echo": "late"})
        ping = yield client.call("system.ping")
        self.assertTrue(ping["pong"])
        self.assertEqual(list(client.messages), [], "nothing after the reply")
        metrics = yield self.metrics()
        self.assertEqual(metrics["unrealon_backend_replies_dropped"], 1.0)
        self.assertEqual(metrics["unrealon_backend_calls_in_flight"], 0.0)
        self.assertEqual(metrics["unrealon_backend_methods_served"], 1.0)

    @inlineCallbacks
    def test_cancel_by_client(self) -> Any:
        """
        rpc.cancel: the call is answered -32014 before the cancel's own
        reply, the cancel key says "client", later replies are dropped.
        """
        client = yield self.ready()
        client.send({"jsonrpc": "2.0", "id": "x", "method": "demo.echo",
                     "params": {"text": "a"}})
        call = yield self.next_call()
        yield self.answer(call, type="progress", seq=1, data={"n": 1})
        progress = yield client.next()
        self.assertEqual(progress["method"], "rpc.progress")
        client.send({"jsonrpc": "2.0", "id": "c", "method": "rpc.cancel", "params": {"id": "x"}})
        cancelled = yield client.next()
        self.assertEqual((cancelled["id"], cancelled["error"]["code"]), ("x", -32014))
        reply = yield client.next()
        self.assertEqual(reply, {"jsonrpc": "2.0", "id": "c",
                                 "result": {"id": "x", "cancelled": True}})
        reason = yield self.redis.get(f"unrealon:backend:cancel:{call['call_id']}")
        self.assertEqual(reason, "client")
        ttl = yield self.redis.execute_command("PTTL", f"unrealon:backend:cancel:{call['call_id']}")
        self.assertGreater(int(ttl), 60_000)
        yield self.answer(call, type="progress", seq=2, data={"n": 2})
        yield self.answer(call, type="result", result={"echo": "a"})
        again = yield client.call("rpc.cancel", {"id": "x"})
        self.assertEqual(again, {"id": "x", "cancelled": False})
        self.assertEqual(list(client.messages), [], "nothing about the call after its reply")
        reply = yield client.request("rpc.cancel", {"id": True})
        self.assertEqual(reply["error"]["code"], -32602)

    @inlineCallbacks
    def test_cancel_by_disconnect(self) -> Any:
        """A connection that goes away cancels its calls (reason "disconnect")."""
        client = yield self.ready()
        client.send({"jsonrpc": "2.0", "id": 1, "method": "demo.echo", "params": {"text": "a"}})
        call = yield self.next_call()
        yield client.drop()
        key = f"unrealon:backend:cancel:{call['call_id']}"
        for _ in range(50):
            reason = yield self.redis.get(key)
            if reason is not None:
                break
            yield wait(0.05)
        self.assertEqual(reason, "disconnect")
        self.assertEqual(self.running.node.backend.in_flight(), 0)

    @inlineCallbacks
    def test_worker_errors(self) -> Any:
        """A worker's own code reaches the client as it is; a malformed error is -32603."""
        client = yield self.ready()
        client.send({"jsonrpc": "2.0", "id": 1, "method": "demo.echo", "params": {"text": "a"}})
        call = yield self.next_call()
        yield self.answer(call, type="error",
                          error={"code": 4040, "message": "no such file", "data": {"p": "a"}})
        reply = yield client.next()
        self.assertEqual(reply["error"], {"code": 4040, "message": "no such file",
                                          "data": {"p": "a"}})
        client.send({"jsonrpc": "2.0", "id": 2, "method": "demo.echo", "params": {"text": "a"}})
        call = yield self.next_call()
        yield self.answer(call, type="error", error={"code": "bad", "message": "x"})
        reply = yield client.next()
        self.assertEqual(reply["error"]["code"], -32603)
        client.send({"jsonrpc": "2.0", "id": 3, "method": "demo.echo", "params": {"text": "a"}})
        call = yield self.next_call()
        yield self.answer(call, type="error",
                          error={"code": -32015, "message": "Backend worker lost",
                                 "data": {"retryable": False}})
        reply = yield client.next()
        self.assertEqual(reply["error"]["code"], -32015)

    @inlineCallbacks
    def test_discover_lists_what_the_user_may_call(self) -> Any:
        """rpc.discover shows a backend method with its schemas to those its methods claim allows."""
        client = yield self.ready(methods=["demo.echo"])
        doc = yield client.call("rpc.discover")
        method = next(m for m in doc["methods"] if m["name"] == "demo.echo")
        self.assertEqual(method["x-backend"], True)
        self.assertEqual(method["x-progress"], ECHO["progress"])
        self.assertEqual(method["x-timeout"], 30)
        self.assertEqual(method["x-idempotent"], False)
        self.assertEqual({p["name"]: p["required"] for p in method["params"]},
                         {"text": True, "times": False})
        self.assertEqual(method["result"]["schema"], ECHO["result"])
        nobody = yield self.client()
        doc = yield nobody.call("rpc.discover")
        self.assertNotIn("demo.echo", {m["name"] for m in doc["methods"]})

    @inlineCallbacks
    def test_notification_call(self) -> Any:
        """A notification to a backend method is appended; no progress and no reply come back."""
        client = yield self.ready()
        client.send({"jsonrpc": "2.0", "method": "demo.echo", "params": {"text": "n"}})
        call = yield self.next_call()
        self.assertEqual(call["params"], {"text": "n"})
        yield self.answer(call, type="progress", seq=1, data={"n": 1})
        yield self.answer(call, type="result", result={"echo": "n"})
        yield client.call("system.ping")
        self.assertEqual(list(client.messages), [])

    @inlineCallbacks
    def test_declaration_change_seen(self) -> Any:
        """A changed declaration is in force within 2 s; a removed one stops being callable."""
        client = yield self.ready()
        yield self.declare({**ECHO, "params": {"type": "object", "properties": {
            "text": {"type": "string", "maxLength": 1}}}})
        for _ in range(30):
            doc = yield client.call("rpc.discover")
            method = next(m for m in doc["methods"] if m["name"] == "demo.echo")
            if method["params"][0]["schema"].get("maxLength") == 1:
                break
            yield wait(0.1)
        else:
            self.fail("the new declaration was not seen")
        reply = yield client.request("demo.echo", {"text": "long"})
        self.assertEqual(reply["error"]["code"], -32602)
        yield self.redis.execute_command("HDEL", METHODS, "demo.echo")
        yield self.declared(client, "demo.echo", present=False)
        reply = yield client.request("demo.echo", {"text": "a"})
        self.assertEqual(reply["error"]["code"], -32601)

    @inlineCallbacks
    def test_redis_gone(self) -> Any:
        """Redis unreachable: a backend call is answered -32011 within 5 s."""
        client = yield self.ready()
        yield self.server.kill()
        started = time.monotonic()
        reply = yield client.request("demo.echo", {"text": "a"}, timeout=8)
        self.assertLess(time.monotonic() - started, 5.5)
        self.assertEqual(reply["error"]["code"], -32011)
        self.assertEqual(reply["error"]["data"], {"retryable": True})
        yield self.server.start()  # the node's cleanup leaves presence on a live Redis

    @inlineCallbacks
    def test_ids_not_reused_by_a_restarted_node(self) -> Any:
        """
        A node that restarts (same node id) numbers its calls anew: a worker's
        late reply to a call of the previous start finds nothing, and the new
        call with the same counter gets only its own reply.
        """
        client = yield self.ready()
        client.send({"jsonrpc": "2.0", "id": 1, "method": "demo.echo", "params": {"text": "a"}})
        old = yield self.next_call()
        yield self.running.service.stopService()
        yield self.start()
        client = yield self.client(["demo.*"])
        yield self.declared(client, "demo.echo")
        client.send({"jsonrpc": "2.0", "id": 1, "method": "demo.echo", "params": {"text": "b"}})
        new = yield self.next_call()
        self.assertNotEqual(old["call_id"], new["call_id"])
        self.assertNotEqual(old["connection_id"], new["connection_id"])
        self.assertEqual(old["reply_to"], new["reply_to"])
        yield self.answer(old, type="result", result={"echo": "from the previous start"})
        yield self.answer(new, type="result", result={"echo": "b"})
        reply = yield client.next()
        self.assertEqual(reply["result"], {"echo": "b"})

    @inlineCallbacks
    def test_directory_lost_with_redis_data(self) -> Any:
        """
        Redis comes back empty (declarations and heartbeats gone): until the
        workers declare again a call is -32013 (retryable), not -32601; then
        it works again.
        """
        client = yield self.ready()
        yield self.redis.execute_command("DEL", METHODS, WORKERS)
        backend = self.running.node.backend
        yield wait_until(lambda: backend.served() == 0, timeout=5, what="the loss seen")
        for _ in range(3):  # over more than one directory refresh
            reply = yield client.request("demo.echo", {"text": "a"})
            self.assertEqual(reply["error"]["code"], -32013)
            self.assertEqual(reply["error"]["data"], {"retryable": True})
            yield wait(0.5)
        yield self.declare(ECHO)
        yield wait_until(lambda: backend.served() == 1, timeout=5, what="served again")
        client.send({"jsonrpc": "2.0", "id": 9, "method": "demo.echo", "params": {"text": "b"}})
        call = yield self.next_call()
        yield self.answer(call, type="result", result={"echo": "b"})
        reply = yield client.next()
        self.assertEqual(reply["result"], {"echo": "b"})
