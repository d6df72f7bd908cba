"""
Test fixtures: a real node on real listeners, and a real WebSocket client.

L{start_node} runs a node in the test's own reactor on C{tcp:0} ports and
stops it (gracefully, as SIGTERM would) in cleanup.  L{WSClient} is an
Autobahn client that queues everything it receives, so a test can say
"call this, then expect that notification, then expect a close with 4009".
L{mint_token} signs test JWTs with the shared test secret.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any
from urllib.parse import quote

import attrs
import jwt
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from unrealon.config import Config, load_config
from unrealon.node import Node
from unrealon.service import Extension, NodeService, makeService

SECRET = "unrealon-test-secret-0123456789abcdef0123456789"


def mint_token(
    sub: Any = "alice",
    *,
    ttl: float = 300,
    rooms: list[str] | None = None,
    secret: str = SECRET,
    now: float | None = None,
    **claims: Any,
) -> str:
    """A connection token (or, with C{room=...}, a room token)."""
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {"sub": sub, "exp": int(issued + ttl), "iat": int(issued)}
    if rooms is not None:
        payload["rooms"] = rooms
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


def test_config(**overrides: Any) -> Config:
    """A config for a node on free ports, with the test secret."""
    values = {
        "ws_endpoint": "tcp:0:interface=127.0.0.1",
        "http_endpoint": "tcp:0:interface=127.0.0.1",
        "jwt_secret": SECRET,
        "node_id": "test-node",
    }
    values.update({k: str(v) for k, v in overrides.items() if v is not None})
    return load_config(cli=values, environ={}, dotenv={})


@attrs.define
class RunningNode:
    service: NodeService

    @property
    def node(self) -> Node:
        return self.service.node

    @property
    def ws_port(self) -> int:
        assert self.service.ws_port is not None
        return int(self.service.ws_port.getHost().port)  # type: ignore[attr-defined]

    @property
    def http_port(self) -> int:
        assert self.service.http_port is not None
        return int(self.service.http_port.getHost().port)  # type: ignore[attr-defined]

    def url(self, token: str | None = None, path: str = "/ws") -> str:
        url = f"ws://127.0.0.1:{self.ws_port}{path}"
        if token is not None:
            url += "?token=" + quote(token)
        return url

    def connect(
        self,
        token: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        path: str = "/ws",
    ) -> Deferred[WSClient]:
        return connect(self.url(token, path), headers=headers, port=self.ws_port)

    @inlineCallbacks
    def http_get(self, path: str) -> Any:
        """(status, body bytes) of GET http://node/path."""
        agent = Agent(global_reactor)
        response = yield agent.request(
            b"GET", f"http://127.0.0.1:{self.http_port}{path}".encode()
        )
        body = yield readBody(response)
        return response.code, body


@inlineCallbacks
def start_node(
    testcase: TestCase, extensions: tuple[Extension, ...] = (), **overrides: Any
) -> Any:
    """Start a node in this reactor; it is stopped in the test's cleanup."""
    service = makeService(test_config(**overrides), global_reactor, extensions)
    service.startService()
    yield service.ready
    testcase.addCleanup(_stop, service)
    return RunningNode(service)


def _stop(service: NodeService) -> Deferred[None]:
    if not service.running:
        return succeed(None)
    return service.stopService()


class ClientProtocol(WebSocketClientProtocol):
    """Queues received messages; the test pulls them with L{WSClient}."""

    def __init__(self) -> None:
        super().__init__()
        self.client: WSClient | None = None

    def onOpen(self) -> None:
        assert self.client is not None
        self.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self.client is not None
        self.client._received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.client is not None:
            self.client._closed(wasClean, code, reason)


class WSClient:
    """A real WebSocket client with a receive queue and request ids."""

    def __init__(self) -> None:
        self.protocol: ClientProtocol | None = None
        self.messages: deque[Any] = deque()
        self._waiters: deque[Deferred[Any]] = deque()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.opened: Deferred[WSClient] = Deferred()
        self._next_id = 0

    # -- wiring -------------------------------------------------------------
    def _opened(self, protocol: ClientProtocol) -> None:
        self.protocol = protocol
        self.opened.callback(self)

    def _received(self, payload: bytes, is_binary: bool) -> None:
        message = payload if is_binary else json.loads(payload)
        if self._waiters:
            self._waiters.popleft().callback(message)
        else:
            self.messages.append(message)

    def _closed(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        self.close_code, self.close_reason = code, reason
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        while self._waiters:
            self._waiters.popleft().errback(ConnectionError(f"closed {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    # -- use ------------------------------------------------------------------
    def send_raw(self, payload: bytes | str, binary: bool = False) -> None:
        assert self.protocol is not None
        data = payload.encode() if isinstance(payload, str) else payload
        self.protocol.sendMessage(data, isBinary=binary)

    def send(self, message: Any) -> None:
        self.send_raw(json.dumps(message))

    def next(self, timeout: float = 5.0) -> Deferred[Any]:
        """The next message received (already queued or still to come)."""
        if self.messages:
            return succeed(self.messages.popleft())
        if self.closed.called:
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionError(f"closed {self.close_code} {self.close_reason}"))
            return d
        d = Deferred()
        self._waiters.append(d)
        d.addTimeout(timeout, global_reactor)
        return d

    @inlineCallbacks
    def request(self, method: str, params: Any = None, timeout: float = 5.0) -> Any:
        """Send a request and return its reply, skipping notifications (kept)."""
        self._next_id += 1
        rid = self._next_id
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        skipped = []
        try:
            while True:
                reply = yield self.next(timeout)
                if isinstance(reply, dict) and reply.get("id") == rid and "method" not in reply:
                    return reply
                skipped.append(reply)
        finally:
            self.messages.extendleft(reversed(skipped))

    @inlineCallbacks
    def call(self, method: str, params: Any = None, timeout: float = 5.0) -> Any:
        """The result of a request; fails the test on an error reply."""
        reply = yield self.request(method, params, timeout)
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def close(self, code: int = 1000) -> Deferred[tuple[int | None, str | None]]:
        if self.protocol is not None and not self.closed.called:
            self.protocol.sendClose(code)
        return self.closed

    def drop(self) -> Deferred[tuple[int | None, str | None]]:
        """Drop the TCP connection without a closing handshake."""
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()  # type: ignore[attr-defined]
        return self.closed


def connect(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    port: int,
    testcase: TestCase | None = None,
) -> Deferred[WSClient]:
    """Open a WebSocket; fires with the client once open, fails if refused."""
    client = WSClient()
    factory = WebSocketClientFactory(url, headers=headers or {})
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=5, closeHandshakeTimeout=2)

    def build(addr: Any) -> ClientProtocol:
        proto = ClientProtocol()
        proto.factory = factory
        proto.client = client
        return proto

    factory.buildProtocol = build  # type: ignore[method-assign]
    endpoint = TCP4ClientEndpoint(global_reactor, "127.0.0.1", port, timeout=5)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: client.opened)
    return d


@inlineCallbacks
def raw_handshake(port: int, request: bytes, *, head_only: bool = False) -> Any:
    """
    Send raw HTTP bytes to the WebSocket port; return what comes back until
    the server closes (or 3 s pass).  With C{head_only}, return just the
    response head (status line and headers) as soon as it is complete and
    drop the connection: an accepted upgrade is never closed by the server.
    """
    from twisted.internet.protocol import Protocol

    class Collect(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.done: Deferred[bytes] = Deferred()

        def dataReceived(self, data: bytes) -> None:
            self.data += data
            if head_only and b"\r\n\r\n" in self.data and not self.done.called:
                self.done.callback(self.data.split(b"\r\n\r\n", 1)[0])
                self.transport.abortConnection()  # type: ignore[union-attr]

        def connectionLost(self, reason: Any = None) -> None:
            if not self.done.called:
                self.done.callback(self.data)

    from twisted.internet.endpoints import connectProtocol

    proto = Collect()
    endpoint = TCP4ClientEndpoint(global_reactor, "127.0.0.1", port, timeout=5)
    yield connectProtocol(endpoint, proto)
    proto.transport.write(request)  # type: ignore[union-attr]

    def give_up() -> None:
        if proto.transport is not None:
            proto.transport.loseConnection()

    timer = global_reactor.callLater(3, give_up)  # type: ignore[attr-defined]
    data = yield proto.done
    if timer.active():
        timer.cancel()
    return data
