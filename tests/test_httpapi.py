"""
The HTTP server API (PROTOCOL.md section 8) through a real listener.

Every status of the section's table, key rotation, a publish through the API
reaching a WebSocket client (with the cursor layout of the ingress stream's
publishes, on the Redis engine), C{Idempotency-Key} on one node and across
two nodes on one Redis (concurrent requests included), 503 within 5 s when
Redis is gone, the OpenAPI document, the metrics, and logs that never hold a
key or a body.  The stores' expiry rules are driven by a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import ingress_support
from tests.helpers.apiclient import API_KEY, API_KEY_2, api_request, post
from tests.helpers.node import mint_token, raw_handshake, start_node
from tests.helpers.redis_server import start_redis
from unrealon.config import ConfigError, load_config
from unrealon.engine.rediskeys import api_reply_key
from unrealon.httpapi import DEADLINE
from unrealon.httpbody import MAX_BODY
from unrealon.idempotency import (
    PENDING_TTL,
    REPLY_TTL,
    MemoryReplyStore,
    StoredReply,
    scoped_key,
)
from unrealon.rpc import Caller, Registry, param

KEYS = f"{API_KEY},{API_KEY_2}"
ROOM = "workspace:42"


def publish_params(text: str = "hi", room: str = ROOM) -> dict[str, Any]:
    return {"room": room, "event": "demo.hello", "data": {"text": text}}


@inlineCallbacks
def joined_client(running: Any, room: str = ROOM, user: str = "alice") -> Any:
    client = yield running.connect(mint_token(user, rooms=["*"]))
    yield client.call("rooms.join", {"room": room})
    return client


@inlineCallbacks
def next_event(client: Any, method: str | None = None) -> Any:
    """The next room event (presence notifications skipped)."""
    while True:
        message = yield client.next()
        if message.get("method", "").startswith("presence."):
            continue
        if method is None or message.get("method") == method:
            return message
        raise AssertionError(f"expected {method}, got {message}")


class OffTests(TestCase):
    @inlineCallbacks
    def test_off_without_key(self) -> Any:
        """Without UNREALON_API_KEY every /api path is 404, the document included."""
        running = yield start_node(self)
        reply = yield post(running.http_port, "publish", publish_params())
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.json["error"]["code"], "method_not_found")
        reply = yield api_request(running.http_port, b"GET", "/api/openapi.json")
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.header("content-type"), "application/json")


class StatusTests(TestCase):
    """Each status of section 8 on the memory engine."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.running = yield start_node(
            self, extensions=(ingress_support.register,), api_keys=KEYS
        )
        self.port = self.running.http_port

    def assertError(self, reply: Any, status: int, code: str) -> dict[str, Any]:
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.header("content-type"), "application/json")
        error: dict[str, Any] = reply.json["error"]
        self.assertEqual(error["code"], code)
        self.assertIsInstance(error["message"], str)
        return error

    @inlineCallbacks
    def test_publish_reaches_client(self) -> Any:
        """200 {"result": {room, cursor}}; the client in the room gets the event with that cursor."""
        client = yield joined_client(self.running)
        reply = yield post(self.port, "publish", publish_params())
        self.assertEqual(reply.status, 200)
        result = reply.json["result"]
        self.assertEqual(set(reply.json), {"result"})
        self.assertEqual(result["room"], ROOM)
        event = yield next_event(client, "demo.hello")
        self.assertEqual(event["params"],
                         {"room": ROOM, "cursor": result["cursor"], "data": {"text": "hi"}})
        # the cursor is one the room's history knows: a rejoin with it misses nothing
        rejoined = yield client.call("rooms.join", {"room": ROOM, "since": result["cursor"]})
        self.assertEqual((rejoined["recovered"], rejoined["missed"]), (True, []))

    @inlineCallbacks
    def test_catalogue_event(self) -> Any:
        """A catalogue event: validated, routed to its room, extras kept in data."""
        client = yield joined_client(self.running)
        reply = yield post(self.port, "workspace.file_changed",
                           {"workspace_id": 42, "path": "src/a.py", "change": "modified",
                            "editor": "vim"})
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(reply.json["result"]["room"], ROOM)
        event = yield next_event(client, "workspace.file_changed")
        self.assertEqual(event["params"]["data"], {"workspace_id": "42", "path": "src/a.py",
                                                   "change": "modified", "editor": "vim"})

    @inlineCallbacks
    def test_streamed_message(self) -> Any:
        """
        session.message chunks through the API are a streamed message
        (PROTOCOL.md 5.1): posted out of order, they reach the client in seq
        order, and a later join shows the answer so far in `streaming`.
        """
        room = "session:s1"
        client = yield joined_client(self.running, room)
        base = {"session_id": "s1", "message_id": "m1", "role": "assistant"}
        for seq, content in ((0, "Hel"), (2, "wor"), (1, "lo "), (3, "ld")):
            reply = yield post(self.port, "session.message", {**base, "seq": seq,
                                                              "content": content})
            self.assertEqual(reply.status, 200, reply.body)
            self.assertEqual(reply.json["result"]["room"], room)
        got = []
        while not got or got[-1][1] < 3:
            event = yield next_event(client, "session.message")
            data = event["params"]["data"]
            got.append((data["seq"], data["last_seq"], data["content"]))
        self.assertEqual(got, [(0, 0, "Hel"), (1, 2, "lo wor"), (3, 3, "ld")])
        late = yield joined_client(self.running, room, user="bob")
        joined = yield late.call("rooms.join", {"room": room})
        [streaming] = joined["streaming"]
        self.assertEqual(streaming["params"]["data"],
                         {**base, "content": "Hello world", "seq": 0, "last_seq": 3,
                          "done": False})
        reply = yield post(self.port, "session.message", {**base, "seq": 4, "content": "",
                                                          "done": True, "error": "cut off"})
        self.assertEqual(reply.status, 200, reply.body)
        event = yield next_event(late, "session.message")
        self.assertEqual((event["params"]["data"]["done"], event["params"]["data"]["error"]),
                         (True, "cut off"))

    @inlineCallbacks
    def test_presence_and_disconnect(self) -> Any:
        """presence.online, presence.list and connections.disconnect (close 4003)."""
        client = yield joined_client(self.running)
        reply = yield post(self.port, "presence.online", {"user_ids": ["alice", "bob"]})
        self.assertEqual(reply.json, {"result": {"online": ["alice"]}})
        reply = yield post(self.port, "presence.list", {"room": ROOM})
        self.assertEqual([u["user_id"] for u in reply.json["result"]["users"]], ["alice"])
        reply = yield post(self.port, "connections.disconnect", {"user_id": "alice"})
        self.assertEqual(reply.json, {"result": {"user_id": "alice"}})
        code, _ = yield client.closed
        self.assertEqual(code, 4003)

    @inlineCallbacks
    def test_rotation(self) -> Any:
        """Both configured keys work; the scheme name is case-insensitive."""
        for key in (API_KEY, API_KEY_2):
            reply = yield post(self.port, "publish", publish_params(), key=key)
            self.assertEqual(reply.status, 200)
        reply = yield post(self.port, "publish", publish_params(), key=None,
                           headers={"Authorization": f"ApiKey {API_KEY_2}"})
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_unauthorized(self) -> Any:
        """Missing, wrong, truncated or other-scheme keys: 401, WWW-Authenticate: apikey."""
        cases: list[dict[str, str]] = [
            {},
            {"Authorization": "apikey wrong-key-0123456789abcdef"},
            {"Authorization": f"apikey {API_KEY[:-1]}"},
            {"Authorization": f"apikey {API_KEY}x"},
            {"Authorization": f"Bearer {API_KEY}"},
            {"Authorization": API_KEY},
            {"Authorization": "apikey "},
        ]
        for headers in cases:
            reply = yield post(self.port, "publish", publish_params(), key=None, headers=headers)
            self.assertError(reply, 401, "unauthorized")
            self.assertEqual(reply.header("www-authenticate"), "apikey")
        # an unknown method is not confirmed to a caller without a key
        reply = yield post(self.port, "no.such.method", {}, key=None)
        self.assertError(reply, 401, "unauthorized")

    @inlineCallbacks
    def test_invalid_body(self) -> Any:
        """A body that is not a JSON object: 400 invalid_params with errors."""
        for body in (b"", b"[]", b'"text"', b"42", b"null", b"{not json", b'{"a": NaN}',
                     b"\xff\xfe{}", b"[" * 100_000):
            reply = yield post(self.port, "publish", body)
            error = self.assertError(reply, 400, "invalid_params")
            self.assertEqual(error["errors"][0]["field"], "body")

    @inlineCallbacks
    def test_invalid_params(self) -> Any:
        """Params invalid: 400 with {field, message} per problem, at most 20."""
        reply = yield post(self.port, "workspace.file_changed", {"workspace_id": 42})
        error = self.assertError(reply, 400, "invalid_params")
        self.assertEqual(sorted(e["field"] for e in error["errors"]), ["change", "path"])
        reply = yield post(self.port, "publish", {"room": "bad room!", "event": "e"})
        error = self.assertError(reply, 400, "invalid_params")
        self.assertEqual([e["field"] for e in error["errors"]], ["room"])
        many = {f"unknown{i}": i for i in range(30)}
        reply = yield post(self.port, "connections.disconnect", {"user_id": "a", **many})
        error = self.assertError(reply, 400, "invalid_params")
        self.assertEqual(len(error["errors"]), 20)
        self.assertEqual(set(error["errors"][0]), {"field", "message"})

    @inlineCallbacks
    def test_method_not_found(self) -> Any:
        """Unknown names, client-only names and odd paths: 404 method_not_found."""
        for name in ("no.such.method", "rooms.join", "system.ping", "auth.authenticate",
                     "rpc.discover", "", "publish/extra", "%2e%2e"):
            reply = yield post(self.port, name, {"room": ROOM})
            self.assertError(reply, 404, "method_not_found")
        reply = yield api_request(self.port, b"POST", "/api",
                                  headers={"Authorization": f"apikey {API_KEY}"})
        self.assertError(reply, 404, "method_not_found")

    @inlineCallbacks
    def test_method_not_allowed(self) -> Any:
        """Not POST: 405 with Allow: POST."""
        for method in (b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"):
            reply = yield api_request(self.port, method, "/api/publish",
                                      headers={"Authorization": f"apikey {API_KEY}"})
            self.assertError(reply, 405, "method_not_allowed")
            self.assertEqual(reply.header("allow"), "POST")

    @inlineCallbacks
    def test_unsupported_media_type(self) -> Any:
        """Not application/json: 415; a UTF-8 charset parameter is fine."""
        body = json.dumps(publish_params()).encode()
        auth = {"Authorization": f"apikey {API_KEY}"}
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                             "application/jsonx", "application/json; charset=latin-1"):
            headers = dict(auth)
            if content_type is not None:
                headers["Content-Type"] = content_type
            reply = yield api_request(self.port, b"POST", "/api/publish", body=body,
                                      headers=headers)
            self.assertError(reply, 415, "unsupported_media_type")
        for content_type in ("application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
            reply = yield api_request(self.port, b"POST", "/api/publish", body=body,
                                      headers={**auth, "Content-Type": content_type})
            self.assertEqual(reply.status, 200, content_type)

    def _body_of_size(self, size: int) -> bytes:
        """A valid publish body of exactly C{size} bytes."""
        head = json.dumps(publish_params("")).encode()[:-3]  # ... "text": "
        body = head + b"a" * (size - len(head) - 3) + b'"}}'
        self.assertEqual(len(body), size)
        json.loads(body)
        return body

    @inlineCallbacks
    def test_body_limit_by_length(self) -> Any:
        """Exactly 1 MiB is served; one byte more (Content-Length) is 413."""
        reply = yield post(self.port, "publish", self._body_of_size(MAX_BODY))
        self.assertEqual(reply.status, 200)
        reply = yield post(self.port, "publish", self._body_of_size(MAX_BODY + 1))
        self.assertError(reply, 413, "payload_too_large")

    @inlineCallbacks
    def test_body_limit_chunked(self) -> Any:
        """A chunked body (no Content-Length) is counted as it arrives: 413 past 1 MiB."""
        headers = {"Content-Type": "application/json", "Authorization": f"apikey {API_KEY}"}
        reply = yield api_request(self.port, b"POST", "/api/publish",
                                  body=self._body_of_size(MAX_BODY + 1), headers=headers,
                                  chunked=True)
        self.assertError(reply, 413, "payload_too_large")
        reply = yield api_request(self.port, b"POST", "/api/publish",
                                  body=self._body_of_size(1000), headers=headers, chunked=True)
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_body_limit_before_the_body(self) -> Any:
        """
        With Expect: 100-continue, or a length no client should make us
        read, the 413 comes before any body is sent (no 100 Continue).
        """
        for extra in (b"Expect: 100-continue\r\n", b""):
            length = MAX_BODY + 1 if extra else 1024 * MAX_BODY
            head = (b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Authorization: apikey " + API_KEY.encode() + b"\r\n" + extra +
                    b"Content-Length: %d\r\n\r\n" % length)
            data = yield raw_handshake(self.port, head)
            status, _, rest = data.partition(b"\r\n")
            self.assertTrue(status.startswith(b"HTTP/1.1 413"), data[:200])
            self.assertNotIn(b"100 Continue", data)
            body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
            self.assertEqual(body["error"]["code"], "payload_too_large")

    @inlineCallbacks
    def test_errors_of_methods(self) -> Any:
        """
        An application's backend methods are served too; their failures map
        to 500 internal_error (no exception text), 403 forbidden, and 503
        backend_unavailable with retryable.
        """
        reply = yield post(self.port, "test.fail", {})
        error = self.assertError(reply, 500, "internal_error")
        self.assertNotIn(b"poison", reply.body)
        self.assertNotIn(b"RuntimeError", reply.body)
        self.assertEqual(error["message"], "Internal error")
        self.flushLoggedErrors(RuntimeError)
        reply = yield post(self.port, "test.forbidden", {})
        self.assertError(reply, 403, "forbidden")
        reply = yield post(self.port, "test.unavailable", {})
        error = self.assertError(reply, 503, "backend_unavailable")
        self.assertIs(error["retryable"], True)

    @inlineCallbacks
    def test_bad_idempotency_key(self) -> Any:
        """An Idempotency-Key that is empty, too long or not printable ASCII: 400."""
        for value in ("x" * 129, "caf\u00e9", "tab\there"):
            reply = yield post(self.port, "publish", publish_params(),
                               headers={"Idempotency-Key": value})
            error = self.assertError(reply, 400, "invalid_params")
            self.assertEqual(error["errors"][0]["field"], "Idempotency-Key")
        reply = yield api_request(
            self.port, b"POST", "/api/publish", body=json.dumps(publish_params()).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"apikey {API_KEY}",
                     "Idempotency-Key": ""},
        )
        self.assertError(reply, 400, "invalid_params")
        reply = yield post(self.port, "publish", publish_params(),
                           headers={"Idempotency-Key": "x" * 128})
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_metrics(self) -> Any:
        """API requests are counted by method and status."""
        yield post(self.port, "publish", publish_params())
        yield post(self.port, "publish", {})
        yield post(self.port, "no.such.method", {})
        status, body = yield self.running.http_get("/metrics")
        text = body.decode()
        self.assertEqual(status, 200)
        self.assertIn('unrealon_api_requests_total{method="publish",status="200"} 1.0', text)
        self.assertIn('unrealon_api_requests_total{method="publish",status="400"} 1.0', text)
        self.assertIn('unrealon_api_requests_total{method="other",status="404"} 1.0', text)


class IdempotencyTests(TestCase):
    """Idempotency-Key on the memory engine."""

    @inlineCallbacks
    def test_repeat_gets_first_reply(self) -> Any:
        """
        A repeat (sequential or concurrent) gets the first reply, byte for
        byte, and publishes nothing: the next event the client sees after
        the first is a marker published afterwards.
        """
        running = yield start_node(self, api_keys=KEYS)
        client = yield joined_client(running)
        headers = {"Idempotency-Key": "order-1"}
        replies = yield DeferredList(
            [post(running.http_port, "publish", publish_params("once"), headers=headers)
             for _ in range(3)],
            fireOnOneErrback=True, consumeErrors=True,
        )
        first, *others = [reply for _, reply in replies]
        self.assertEqual(first.status, 200)
        for other in others:
            self.assertEqual((other.status, other.body), (first.status, first.body))
        later = yield post(running.http_port, "publish", publish_params("twice"),
                           key=API_KEY_2, headers=headers)  # after a key rotation too
        self.assertEqual((later.status, later.body), (first.status, first.body))
        self.assertEqual(later.header("idempotent-replayed"), "true")
        yield post(running.http_port, "publish", publish_params("marker"))
        event = yield next_event(client)
        self.assertEqual(event["params"]["data"], {"text": "once"})
        event = yield next_event(client)
        self.assertEqual(event["params"]["data"], {"text": "marker"})

    @inlineCallbacks
    def test_scope_and_unhandled(self) -> Any:
        """
        The same key on another method is another request; a request that was
        not handled (invalid params) leaves the key free for its correction.
        """
        running = yield start_node(self, api_keys=KEYS)
        headers = {"Idempotency-Key": "k-1"}
        bad = yield post(running.http_port, "publish", {"room": ROOM}, headers=headers)
        self.assertEqual(bad.status, 400)
        good = yield post(running.http_port, "publish", publish_params(), headers=headers)
        self.assertEqual(good.status, 200)
        other = yield post(running.http_port, "workspace.state_changed",
                           {"workspace_id": "42", "state": "running"}, headers=headers)
        self.assertEqual(other.status, 200)
        self.assertNotEqual(other.body, good.body)


class ReplyStoreTests(SynchronousTestCase):
    """L{MemoryReplyStore}'s rules, on a Clock."""

    def test_lifetimes(self) -> None:
        clock = Clock()
        store = MemoryReplyStore(clock)
        reply = StoredReply(200, b'{"result":{}}')
        self.assertTrue(self.successResultOf(store.claim("k", "a")).mine)
        held = self.successResultOf(store.claim("k", "b"))
        self.assertEqual((held.mine, held.reply), (False, None))
        self.successResultOf(store.finish("k", "a", reply))
        self.assertEqual(self.successResultOf(store.claim("k", "b")).reply, reply)
        clock.advance(REPLY_TTL - 1)
        self.assertEqual(self.successResultOf(store.claim("k", "b")).reply, reply)
        clock.advance(1)
        self.assertTrue(self.successResultOf(store.claim("k", "c")).mine)
        # a holder that never finishes loses the key after PENDING_TTL
        clock.advance(PENDING_TTL)
        self.assertTrue(self.successResultOf(store.claim("k", "d")).mine)
        # the expired holder's late reply does not overwrite the new holder's key
        self.successResultOf(store.finish("k", "c", reply))
        self.assertEqual(self.successResultOf(store.claim("k", "e")).reply, None)
        # release only by the holder
        self.successResultOf(store.release("k", "e"))
        self.assertFalse(self.successResultOf(store.claim("k", "e")).mine)
        self.successResultOf(store.release("k", "d"))
        self.assertTrue(self.successResultOf(store.claim("k", "e")).mine)

    def test_scoped_key(self) -> None:
        """Hashed, per method: the raw value never appears."""
        key = scoped_key("publish", "secret-order-7")
        self.assertEqual(len(key), 64)
        self.assertNotIn("secret-order-7", key)
        self.assertNotEqual(key, scoped_key("workspace.file_changed", "secret-order-7"))


class OpenAPITests(TestCase):
    @inlineCallbacks
    def test_document(self) -> Any:
        """
        GET /api/openapi.json (no key needed): a valid OpenAPI 3.1 document
        with every backend method, the application's included, the apikey
        scheme and the error bodies.
        """
        running = yield start_node(self, extensions=(ingress_support.register,), api_keys=KEYS)
        reply = yield api_request(running.http_port, b"GET", "/api/openapi.json")
        self.assertEqual(reply.status, 200)
        doc = reply.json
        validate(doc)
        self.assertEqual(doc["openapi"], "3.1.0")
        names = {spec.name for spec in running.node.registry.methods(Caller.BACKEND)}
        self.assertIn("test.fail", names)
        self.assertLessEqual({"publish", "presence.list", "presence.online",
                              "connections.disconnect", "workspace.file_changed"}, names)
        paths = {p.removeprefix("/api/") for p, item in doc["paths"].items() if "post" in item}
        self.assertEqual(paths, names)
        self.assertEqual(doc["components"]["securitySchemes"]["apikey"],
                         {**doc["components"]["securitySchemes"]["apikey"],
                          "type": "http", "scheme": "apikey"})
        operation = doc["paths"]["/api/workspace.file_changed"]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        self.assertEqual(sorted(schema["required"]), ["change", "path", "workspace_id"])
        for status in ("400", "401", "404", "405", "413", "415", "500", "503"):
            self.assertIn(status, operation["responses"])
        self.assertIn("errors", doc["components"]["schemas"]["Error"]["properties"]["error"]
                      ["properties"])
        client_only = {s.name for s in running.node.registry.methods(Caller.CLIENT)} - names
        self.assertIn("rooms.join", client_only)
        for name in client_only:
            self.assertNotIn(f"/api/{name}", doc["paths"])


class LogTests(TestCase):
    @inlineCallbacks
    def test_logs_hold_no_key_and_no_body(self) -> Any:
        """
        Every log event written while the API answers 200, 400, 401, 404,
        413, 500 and 503 is free of the API keys, the Idempotency-Key and
        the body.  (The 500 and 503 do log: proof the capture works.)
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        running = yield start_node(self, extensions=(ingress_support.register,), api_keys=KEYS)
        port = running.http_port
        marker = "BODY-MARKER-7f3a"
        idem = {"Idempotency-Key": "IDEM-MARKER-19c2"}
        wrong = "WRONG-KEY-MARKER-0123456789"
        yield post(port, "publish", publish_params(marker), headers=idem)
        yield post(port, "publish", {"room": marker + "!", "event": marker}, headers=idem)
        yield post(port, "publish", publish_params(marker), key=wrong)
        yield post(port, marker, {"x": marker})
        yield post(port, "publish", b'{"x": "' + marker.encode() + b'"' + b" " * MAX_BODY + b"}")
        yield post(port, "test.fail", {"note": marker}, headers=idem)
        yield post(port, "test.unavailable", {"note": marker})
        self.flushLoggedErrors(RuntimeError)
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("test.fail", text)
        self.assertIn("test.unavailable", text)
        for secret in (API_KEY, API_KEY_2, wrong, marker, "IDEM-MARKER-19c2"):
            self.assertNotIn(secret, text)


class SettingTests(SynchronousTestCase):
    def test_api_key_setting(self) -> None:
        """Comma-separated keys of 16+ characters; empty is off; a bad one names the setting, never the value."""
        base = {"JWT_SECRET": "k" * 48}
        config = load_config(cli={}, environ={**base, "UNREALON_API_KEY": f" {API_KEY} , {API_KEY_2} "},
                             dotenv={})
        self.assertEqual(config.api_keys, (API_KEY, API_KEY_2))
        self.assertNotIn(API_KEY, repr(config))
        self.assertEqual(load_config(cli={}, environ=base, dotenv={}).api_keys, ())
        self.assertEqual(load_config(cli={}, environ={**base, "UNREALON_API_KEY": ""},
                                     dotenv={}).api_keys, ())
        for bad in ("short-key", f"{API_KEY},tiny", "has space in the key 0123"):
            with self.assertRaises(ConfigError) as caught:
                load_config(cli={"api_keys": bad}, environ=base, dotenv={})
            message = str(caught.exception)
            self.assertIn("UNREALON_API_KEY", message)
            self.assertIn("--api-key", message)
            self.assertNotIn(bad.split(",")[-1], message)
            self.assertEqual(len(message.splitlines()), 1)


@attrs.frozen
class CountParams:
    note: str = param(default="")


class CountedCalls:
    """A backend method that counts how often it really runs (both nodes share it)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, registry: Registry) -> None:
        registry.method("test.count", params=CountParams, callers=Caller.BACKEND)(self.count)

    def count(self, call: Any, params: CountParams) -> Deferred[dict[str, Any]]:
        self.calls += 1
        seen = self.calls
        # answer a little later, so that concurrent requests overlap
        return deferLater(reactor, 0.2, lambda: {"calls": seen})  # type: ignore[arg-type]


class RedisTests(TestCase):
    """Two nodes on one Redis."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.counted = CountedCalls()
        self.a = yield start_node(self, (self.counted,), redis_url=self.server.url,
                                  node_id="api-a", api_keys=KEYS, shutdown_timeout=2)
        self.b = yield start_node(self, (self.counted,), redis_url=self.server.url,
                                  node_id="api-b", api_keys=KEYS, shutdown_timeout=2)
        self.redis = ingress_support.sync_redis(self.server.url)
        self.addCleanup(self.redis.close)

    @inlineCallbacks
    def test_same_path_as_the_stream(self) -> Any:
        """
        A publish through node A's API and one from the ingress stream reach
        a client on node B in order, with cursors of one layout and history.
        """
        client = yield joined_client(self.b)
        ingress_support.xadd_payload(self.redis, {"method": "publish",
                                                  "params": publish_params("stream")})
        first = yield next_event(client)
        reply = yield post(self.a.http_port, "publish", publish_params("api"))
        self.assertEqual(reply.status, 200)
        second = yield next_event(client)
        self.assertEqual(second["params"]["cursor"], reply.json["result"]["cursor"])
        self.assertEqual([first["params"]["data"], second["params"]["data"]],
                         [{"text": "stream"}, {"text": "api"}])
        key = self.b.node.broker.cursor_key
        k1, k2 = key(first["params"]["cursor"]), key(second["params"]["cursor"])
        self.assertIsNotNone(k1)
        self.assertEqual(k1[0], k2[0])  # same epoch: one history
        self.assertLess(k1, k2)
        rejoined = yield client.call("rooms.join",
                                     {"room": ROOM, "since": first["params"]["cursor"]})
        self.assertEqual(rejoined["recovered"], True)
        self.assertEqual(rejoined["missed"], [second])

    @inlineCallbacks
    def test_idempotency_across_nodes(self) -> Any:
        """
        The same Idempotency-Key sent to both nodes at once, then again:
        one event published, every reply identical; Redis holds the record
        under a hash, never the raw key.
        """
        client = yield joined_client(self.b)
        headers = {"Idempotency-Key": "raw-order-key-42"}
        sent = [post(node.http_port, "publish", publish_params("once"), headers=headers)
                for node in (self.a, self.b, self.a, self.b)]
        replies = yield DeferredList(sent, fireOnOneErrback=True, consumeErrors=True)
        bodies = {(reply.status, reply.body) for _, reply in replies}
        self.assertEqual(len(bodies), 1, bodies)
        self.assertEqual(next(iter(bodies))[0], 200)
        again = yield post(self.b.http_port, "publish", publish_params("twice"), headers=headers)
        self.assertEqual({(again.status, again.body)}, bodies)
        yield post(self.a.http_port, "publish", publish_params("marker"))
        event = yield next_event(client)
        self.assertEqual(event["params"]["data"], {"text": "once"})
        event = yield next_event(client)
        self.assertEqual(event["params"]["data"], {"text": "marker"})
        names = list(self.redis.scan_iter(count=1000))
        self.assertIn(api_reply_key(scoped_key("publish", "raw-order-key-42")), names)
        self.assertEqual([n for n in names if "raw-order-key" in n], [])
        ttl = self.redis.ttl(api_reply_key(scoped_key("publish", "raw-order-key-42")))
        self.assertTrue(REPLY_TTL - 30 < ttl <= REPLY_TTL, ttl)

    @inlineCallbacks
    def test_handled_once_across_nodes(self) -> Any:
        """
        A method with no idempotency of its own runs once for one key sent
        concurrently to both nodes; the waiting requests get its reply.
        """
        headers = {"Idempotency-Key": "count-once"}
        sent = [post(node.http_port, "test.count", {}, headers=headers)
                for node in (self.a, self.b, self.b, self.a)]
        replies = yield DeferredList(sent, fireOnOneErrback=True, consumeErrors=True)
        self.assertEqual({(r.status, r.body) for _, r in replies},
                         {(200, b'{"result":{"calls":1}}')})
        self.assertEqual(self.counted.calls, 1)
        reply = yield post(self.a.http_port, "test.count", {}, headers={"Idempotency-Key": "two"})
        self.assertEqual(reply.json, {"result": {"calls": 2}})

    @inlineCallbacks
    def test_redis_down_is_503_within_5_s(self) -> Any:
        """With Redis gone, 503 backend_unavailable, retryable, answered within 5 s."""
        reply = yield post(self.a.http_port, "publish", publish_params())
        self.assertEqual(reply.status, 200)
        yield self.server.stop()
        for headers in ({}, {"Idempotency-Key": "during-outage"}):
            reply = yield post(self.a.http_port, "publish", publish_params(), headers=headers,
                               timeout=5.0)
            self.assertEqual(reply.status, 503, reply.body)
            error = reply.json["error"]
            self.assertEqual((error["code"], error["retryable"]), ("backend_unavailable", True))
        self.assertLess(DEADLINE, 5)
