"""
JWT authentication and room authorization, end to end (PROTOCOL.md sections 2 and 4).

Almost everything here runs a real node on a real port and talks to it with a real
Autobahn client (or raw HTTP bytes when the point is the status line of a refused
handshake).  The expiry timer is also driven by a L{task.Clock}: there the session is
built on a fake transport, with the clock as the node's reactor, so the tests can step
exactly to C{exp + leeway}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import time
from typing import Any
from urllib.parse import quote

import jwt
import txaio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import eventAsJSON, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.helpers.node import SECRET, mint_token, raw_handshake, start_node, test_config
from tests.helpers.waiting import wait_until
from unrealon.authstate import AuthState
from unrealon.closecodes import TOO_MANY_CONNECTIONS as CLOSE_TOO_MANY_CONNECTIONS
from unrealon.service import makeService

UNAUTHENTICATED = -32001
FORBIDDEN = -32003
NOT_FOUND = -32004
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

#: methods the backend may call and a browser must never be able to call or see
BACKEND_ONLY = (
    "publish",
    "notification.send",
    "notification.broadcast",
    "connections.disconnect",
    "presence.online",
    "workspace.file_changed",
    "workspace.snapshot_created",
    "session.message",
)

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


# -- helpers -------------------------------------------------------------------


def closed_within(client: Any, seconds: float = 5.0) -> Deferred[Any]:
    """C{client.closed}, failing the test if the server has not closed in C{seconds}."""
    d: Deferred[Any] = Deferred()

    def fire(result: Any) -> Any:
        if not d.called:
            d.callback(result)
        return result

    client.closed.addBoth(fire)
    d.addTimeout(seconds, reactor)
    return d


def handshake_bytes(
    path: str = "/ws", headers: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> bytes:
    """A complete, valid WebSocket upgrade request."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {WS_KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@inlineCallbacks
def upgrade_status(port: int, request: bytes) -> Any:
    """
    The status line the server answers C{request} with; the connection is then dropped
    at once (L{raw_handshake} would hold an accepted one open for 3 s).
    """
    got: Deferred[bytes] = Deferred()

    class Head(Protocol):
        data = b""

        def dataReceived(self, data: bytes) -> None:
            self.data += data
            if b"\r\n\r\n" in self.data and not got.called:
                got.callback(status_line(self.data))
                self.transport.abortConnection()

        def connectionLost(self, reason: Any = None) -> None:
            if not got.called:
                got.callback(status_line(self.data))

    proto = Head()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), proto)
    proto.transport.write(request)
    got.addTimeout(5, reactor)
    return (yield got)


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(sub: str = "alice", ttl: float = 300) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "exp": now + int(ttl), "iat": now}


def unsigned_token(claims: dict[str, Any]) -> str:
    """An C{alg: none} token: header, payload and an empty signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def hmac_token(claims: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """An HS* token signed with any bytes (pyjwt refuses a PEM as HMAC key)."""
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def error_code(reply: dict[str, Any]) -> int | None:
    return reply.get("error", {}).get("code")


def session_of(running: Any, user: str) -> list[Any]:
    """The server-side sessions of C{user} on this node."""
    return [s for s in running.service.factory.connections if s.user_id == user]


class NodeTestCase(TestCase):
    """Closes every client a test opened, so no connection outlives its test."""

    timeout = 30

    def setUp(self) -> None:
        self._clients: list[Any] = []

    @inlineCallbacks
    def open(self, running: Any, token: str | None = None, **kwargs: Any) -> Any:
        client = yield running.connect(token, **kwargs)
        self._clients.append(client)
        return client

    @inlineCallbacks
    def tearDown(self) -> Any:
        for client in self._clients:
            if not client.closed.called:
                yield client.close()


# -- handshake -------------------------------------------------------------------


class HandshakeTokenTests(NodeTestCase):
    @inlineCallbacks
    def assert_authenticated_as(self, client: Any, user: str) -> Any:
        info = yield client.call("system.info")
        self.assertEqual(info["protocol"], 1)
        rooms = yield client.call("rooms.list")
        self.assertEqual(sorted(rooms["rooms"]), ["broadcast", f"user:{user}"])

    @inlineCallbacks
    def test_bearer_header_authenticates(self):
        """A valid token in C{Authorization: Bearer} authenticates the connection at once."""
        running = yield start_node(self)
        client = yield self.open(
            running, headers={"Authorization": "Bearer " + mint_token("alice")}
        )
        yield self.assert_authenticated_as(client, "alice")

    @inlineCallbacks
    def test_query_token_authenticates(self):
        """A valid token in C{?token=} authenticates the connection at once."""
        running = yield start_node(self)
        client = yield self.open(running, mint_token("bob"))
        yield self.assert_authenticated_as(client, "bob")

    @inlineCallbacks
    def test_numeric_and_user_id_claims(self):
        """A numeric C{sub} is its decimal string; C{user_id} stands in for a missing C{sub}."""
        running = yield start_node(self)
        numeric = yield self.open(running, mint_token(42))
        yield self.assert_authenticated_as(numeric, "42")
        payload = {k: v for k, v in _claims().items() if k != "sub"} | {"user_id": "carol"}
        token = jwt.encode(payload, SECRET, "HS256")
        carol = yield self.open(running, token)
        yield self.assert_authenticated_as(carol, "carol")

    @inlineCallbacks
    def assert_refused(self, running: Any, token: str, status: bytes = b"401") -> Any:
        """C{token} is refused with C{status} before the upgrade, by header and by query."""
        before = running.node.hub.connection_count
        for request in (
            handshake_bytes(headers={"Authorization": f"Bearer {token}"}),
            handshake_bytes(path="/ws?token=" + quote(token)),
        ):
            response = yield raw_handshake(running.ws_port, request)
            self.assertTrue(
                status_line(response).startswith(b"HTTP/1.1 " + status + b" "),
                f"{status_line(response)!r} for {request.splitlines()[0]!r}",
            )
            self.assertNotIn(b"101 Switching Protocols", response)
        self.assertEqual(running.node.hub.connection_count, before)

    @inlineCallbacks
    def test_bad_tokens_get_401_before_upgrade(self):
        """
        Garbage, expired (past the leeway), wrong-signature, C{alg: none}, no-exp and
        bad-sub tokens given in the handshake are all HTTP 401, never an upgrade.
        """
        running = yield start_node(self)
        bad = {
            "garbage": "not-a-jwt",
            "three garbage parts": "a.b.c",
            "expired": mint_token("alice", ttl=-60),
            "wrong signature": mint_token("alice", secret="another-secret-" + "x" * 40),
            "alg none": unsigned_token(_claims()),
            "alg none, signature kept": unsigned_token(_claims())
            + mint_token("alice").rsplit(".", 1)[1],
            "no exp": jwt.encode({"sub": "alice"}, SECRET, "HS256"),
            "bad sub": mint_token("alice smith"),
            "HS512 not allowed": hmac_token(_claims(), SECRET.encode(), "HS512"),
        }
        for name, token in bad.items():
            with self.subTest(name):
                yield self.assert_refused(running, token)
        # the control: the same requests with a good token are upgraded
        for request in (
            handshake_bytes(headers={"Authorization": "Bearer " + mint_token("alice")}),
            handshake_bytes(path="/ws?token=" + quote(mint_token("alice"))),
        ):
            response = yield upgrade_status(running.ws_port, request)
            self.assertEqual(response, b"HTTP/1.1 101 Switching Protocols")
        yield wait_until(lambda: running.node.hub.connection_count == 0)

    @inlineCallbacks
    def test_algorithm_confusion_refused(self):
        """
        With an RSA key configured and C{RS256,HS256} allowed, an HS256 token signed with
        the RSA public PEM as HMAC secret is 401; a real RS256 token is accepted (so the
        key is in use and the refusal is the confusion guard, not a misconfiguration).
        """
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path = self.mktemp() + ".pem"
        with open(path, "wb") as f:
            f.write(pem)
        running = yield start_node(self, jwt_public_key_files=path, jwt_algorithms="RS256,HS256")

        good = jwt.encode(_claims("rsa-user"), private, algorithm="RS256")
        client = yield self.open(running, good)
        rooms = yield client.call("rooms.list")
        self.assertIn("user:rsa-user", rooms["rooms"])

        for key in (pem, pem.strip(), pem.replace(b"\n", b"\r\n")):
            yield self.assert_refused(running, hmac_token(_claims("mallory"), key))
        # HS256 with the configured secret still works next to RS256
        hs = yield self.open(running, mint_token("hs-user"))
        rooms = yield hs.call("rooms.list")
        self.assertIn("user:hs-user", rooms["rooms"])

    @inlineCallbacks
    def test_leeway_and_not_before(self):
        """
        JWT_LEEWAY (default 5 s) applies to the handshake: a token 2 s past its exp is
        accepted, 30 s past is 401; C{nbf} 60 s ahead is 401, 2 s ahead accepted.
        """
        running = yield start_node(self)
        for claims in ({"ttl": -2}, {"nbf": int(time.time()) + 2}):
            client = yield self.open(running, mint_token("alice", **claims))
            yield client.call("system.ping")
            yield client.close()
        yield self.assert_refused(running, mint_token("alice", ttl=-30))
        yield self.assert_refused(running, mint_token("alice", nbf=int(time.time()) + 60))

    @inlineCallbacks
    def test_audience_and_issuer_when_configured(self):
        """
        With JWT_AUDIENCE and JWT_ISSUER set, a connection token must carry both (else
        401), and so must a room token (else -32003).
        """
        running = yield start_node(self, jwt_audience="unrealon", jwt_issuer="https://auth.test")
        right = {"aud": "unrealon", "iss": "https://auth.test"}
        for claims in ({}, {"aud": "unrealon"}, {"iss": "https://auth.test"},
                       {**right, "aud": "other"}, {**right, "iss": "https://evil.test"}):
            yield self.assert_refused(running, mint_token("alice", **claims))
        client = yield self.open(running, mint_token("alice", **right))
        reply = yield client.request(
            "rooms.join", {"room": "s:1", "token": mint_token("alice", room="s:1", aud="x")}
        )
        self.assertEqual(error_code(reply), FORBIDDEN)
        yield client.call(
            "rooms.join", {"room": "s:1", "token": mint_token("alice", room="s:1", **right)}
        )

    @inlineCallbacks
    def test_plain_http_gets_no_page_and_no_redirect(self):
        """
        A GET without Upgrade on the WebSocket port is refused (426): no HTML status
        page naming the server, and no redirect to a C{?redirect=} URL (open redirect).
        """
        running = yield start_node(self)
        for path in ("/ws?redirect=https%3A%2F%2Fevil.example%2F", "/?redirect=x&after=0", "/"):
            response = yield raw_handshake(
                running.ws_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            self.assertTrue(status_line(response).startswith(b"HTTP/1.1 426 "), response)
            self.assertNotIn(b"evil.example", response)
            self.assertNotIn(b"<html", response.lower())

    @inlineCallbacks
    def test_room_token_is_not_a_connection_token(self):
        """A validly signed room token (it has a C{room} claim) is 401 in the handshake."""
        running = yield start_node(self)
        yield self.assert_refused(running, mint_token("alice", room="workspace:1"))

    @inlineCallbacks
    def test_bad_query_token_is_401_beside_basic_auth(self):
        """A non-Bearer C{Authorization} does not hide a bad C{?token=}: still 401."""
        running = yield start_node(self)
        response = yield raw_handshake(
            running.ws_port,
            handshake_bytes(
                path="/ws?token=" + mint_token("alice", ttl=-60),
                headers={"Authorization": "Basic YWxpY2U6cHc="},
            ),
        )
        self.assertTrue(status_line(response).startswith(b"HTTP/1.1 401 "))


# -- after the handshake ------------------------------------------------------------


class FirstMessageTests(NodeTestCase):
    @inlineCallbacks
    def test_authenticate_after_handshake(self):
        """No handshake token, then C{auth.authenticate} within the timeout authenticates."""
        running = yield start_node(self)
        client = yield self.open(running)
        token = mint_token("alice")
        result = yield client.call("auth.authenticate", {"token": token})
        self.assertEqual(result["user_id"], "alice")
        self.assertEqual(result["expires_at"], jwt.decode(token, SECRET, ["HS256"])["exp"])
        rooms = yield client.call("rooms.list")
        self.assertEqual(sorted(rooms["rooms"]), ["broadcast", "user:alice"])
        # authenticated: the auth timer is replaced by the token's expiry
        [session] = session_of(running, "alice")
        self.assertIs(session.auth.state, AuthState.AUTHENTICATED)

    @inlineCallbacks
    def test_bad_token_keeps_connection_until_timeout(self):
        """
        A bad token in C{auth.authenticate} is -32001 and the connection stays usable
        (ping answers) until the auth timeout, then it is closed with 4001.
        """
        running = yield start_node(self, auth_timeout=1.0)
        started = time.monotonic()
        client = yield self.open(running)
        for token in ("nope", mint_token("alice", ttl=-60), mint_token("alice", room="r:1")):
            reply = yield client.request("auth.authenticate", {"token": token})
            self.assertEqual(error_code(reply), UNAUTHENTICATED)
            self.assertNotIn(token, json.dumps(reply))
        pong = yield client.call("system.ping")
        self.assertIs(pong["pong"], True)
        self.assertFalse(client.closed.called)
        code, _ = yield closed_within(client)
        self.assertEqual(code, 4001)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)

    @inlineCallbacks
    def test_no_token_closed_4001_after_timeout(self):
        """A connection that never authenticates is closed with 4001 after UNREALON_AUTH_TIMEOUT."""
        running = yield start_node(self, auth_timeout=0.5)
        started = time.monotonic()
        client = yield self.open(running)
        code, reason = yield closed_within(client)
        elapsed = time.monotonic() - started
        self.assertEqual(code, 4001)
        self.assertTrue(reason)
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 3.0)

    @inlineCallbacks
    def test_only_authenticate_and_ping_before_auth(self):
        """Unauthenticated, every method but auth.authenticate and system.ping is -32001."""
        running = yield start_node(self)
        client = yield self.open(running)
        pong = yield client.call("system.ping")
        self.assertIs(pong["pong"], True)
        calls = {
            "system.info": None,
            "rpc.discover": None,
            "rooms.list": None,
            "rooms.join": {"room": "user:alice"},
            "rooms.leave": {"room": "broadcast"},
            "presence.list": {"room": "x"},
            "presence.count": {"room": "x"},
            "auth.refresh": {"token": mint_token("alice")},
            "no.such.method": None,
            "publish": {"room": "x", "event": "e", "data": {}},
            "connections.disconnect": {"user_id": "alice"},
        }
        for method, params in calls.items():
            reply = yield client.request(method, params)
            self.assertEqual(error_code(reply), UNAUTHENTICATED, method)
        # and none of that authenticated it
        self.assertEqual(running.node.hub.user_count, 0)

    @inlineCallbacks
    def test_authenticate_when_authenticated_is_refresh(self):
        """
        C{auth.authenticate} on an authenticated connection is C{auth.refresh}: same sub
        swaps the token, another sub is -32003, a bad token -32001 (old one kept).
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", ttl=100))
        session = session_of(running, "alice")[0]
        newer = mint_token("alice", ttl=1000)
        result = yield client.call("auth.authenticate", {"token": newer})
        self.assertEqual(result["user_id"], "alice")
        self.assertEqual(result["expires_at"], jwt.decode(newer, SECRET, ["HS256"])["exp"])
        self.assertEqual(session.identity.expires_at, result["expires_at"])
        reply = yield client.request("auth.authenticate", {"token": mint_token("bob")})
        self.assertEqual(error_code(reply), FORBIDDEN)
        reply = yield client.request("auth.authenticate", {"token": "nope"})
        self.assertEqual(error_code(reply), UNAUTHENTICATED)
        self.assertEqual(session.user_id, "alice")
        self.assertEqual(session.identity.expires_at, result["expires_at"])


# -- expiry, on a task.Clock ----------------------------------------------------------


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame (RFC 6455 5.2)."""
    mask = b"\x11\x22\x33\x44"
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every unmasked server frame after the HTTP response."""
    _, _, data = data.partition(b"\r\n\r\n")
    frames = []
    while data:
        opcode, n, i = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, i = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, i = struct.unpack("!Q", data[2:10])[0], 10
        frames.append((opcode, data[i : i + n]))
        data = data[i + n :]
    return frames


class _Transport(StringTransport):
    # autobahn unregisters its producer when dropping the connection
    def unregisterProducer(self) -> None:
        self.producer = None


class ClockSession:
    """An RPCSession over a fake transport whose node runs on a L{Clock}."""

    START = 1_800_000_000.0

    def __init__(self, **overrides: Any) -> None:
        self.clock = Clock()
        self.clock.advance(self.START)
        overrides.setdefault("jwt_leeway", 5)
        service = makeService(test_config(**overrides), self.clock)
        self.node = service.node
        factory = service.factory
        # no real timers from Autobahn: everything below runs on the clock
        factory.setProtocolOptions(
            autoPingInterval=0, openHandshakeTimeout=0, closeHandshakeTimeout=0
        )
        self.transport = _Transport()
        self.session = factory.buildProtocol(None)
        self.session.makeConnection(self.transport)
        self._next_id = 0

    def token(self, sub: str = "alice", ttl: float = 100, **claims: Any) -> str:
        return mint_token(sub, ttl=ttl, now=self.clock.seconds(), **claims)

    def handshake(self, token: str | None = None) -> None:
        path = "/ws" if token is None else "/ws?token=" + token
        self.session.dataReceived(handshake_bytes(path=path))
        assert self.transport.value().startswith(b"HTTP/1.1 101"), self.transport.value()

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        message = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params}
        self.session.dataReceived(client_frame(json.dumps(message).encode()))
        self.clock.advance(0)  # the turn ends: its writes go out
        for opcode, payload in reversed(server_frames(self.transport.value())):
            if opcode == 1:
                reply = json.loads(payload)
                if reply.get("id") == self._next_id:
                    return reply
        raise AssertionError("no reply")

    def close_code(self) -> int | None:
        for opcode, payload in server_frames(self.transport.value()):
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0])
        return None

    def finish(self) -> None:
        self.session.connectionLost(Failure(ConnectionDone()))


class ExpiryClockTests(TestCase):
    def test_expiry_closes_4009_at_exp_plus_leeway(self):
        """The server closes with 4009 exactly when C{exp + JWT_LEEWAY} passes, not before."""
        s = ClockSession(jwt_leeway=5)
        s.handshake(s.token(ttl=100))
        self.addCleanup(s.finish)
        s.clock.advance(104.9)
        self.assertIsNone(s.close_code())
        s.clock.advance(0.2)
        self.assertEqual(s.close_code(), 4009)

    def test_expiry_after_first_message_auth(self):
        """A token given by C{auth.authenticate} expires the same way (leeway 0 here)."""
        s = ClockSession(jwt_leeway=0)
        s.handshake()
        self.addCleanup(s.finish)
        reply = s.call("auth.authenticate", {"token": s.token(ttl=30)})
        self.assertEqual(reply["result"]["user_id"], "alice")
        s.clock.advance(29.9)
        self.assertIsNone(s.close_code())
        s.clock.advance(0.2)
        self.assertEqual(s.close_code(), 4009)

    def test_refresh_moves_expiry(self):
        """
        After C{auth.refresh} with a later token the old C{exp} passes without a close;
        the new one closes with 4009.  C{auth.authenticate} does the same.
        """
        for method in ("auth.refresh", "auth.authenticate"):
            with self.subTest(method):
                s = ClockSession(jwt_leeway=5)
                s.handshake(s.token(ttl=100))
                s.clock.advance(50)
                reply = s.call(method, {"token": s.token(ttl=300)})
                self.assertIn("result", reply)
                s.clock.advance(100)  # at 150: well past the old exp + leeway (105)
                self.assertIsNone(s.close_code())
                s.clock.advance(204.9)  # at 354.9: just before the new exp + leeway
                self.assertIsNone(s.close_code())
                s.clock.advance(0.2)
                self.assertEqual(s.close_code(), 4009)
                s.finish()

    def test_failed_refresh_keeps_old_expiry(self):
        """A refused refresh (other sub, expired, garbage) leaves the old expiry in force."""
        s = ClockSession(jwt_leeway=5)
        s.handshake(s.token(ttl=100))
        self.addCleanup(s.finish)
        for token, code in (
            (s.token("bob", ttl=1000), FORBIDDEN),
            (s.token(ttl=-60), UNAUTHENTICATED),
            ("garbage", UNAUTHENTICATED),
        ):
            self.assertEqual(error_code(s.call("auth.refresh", {"token": token})), code)
        s.clock.advance(105.1)
        self.assertEqual(s.close_code(), 4009)

    def test_auth_timeout_on_clock(self):
        """Without a token the session is closed with 4001 when UNREALON_AUTH_TIMEOUT passes."""
        s = ClockSession(auth_timeout=10)
        s.handshake()
        self.addCleanup(s.finish)
        s.clock.advance(9.9)
        self.assertIsNone(s.close_code())
        s.clock.advance(0.2)
        self.assertEqual(s.close_code(), 4001)


# -- expiry and refresh, in real time ----------------------------------------------


class RealTimeExpiryTests(NodeTestCase):
    @inlineCallbacks
    def test_two_second_token_expires_and_refresh_outlives_it(self):
        """
        With JWT_LEEWAY=0 a 2 s token is closed with 4009 at its exp; a second
        connection of the same token that refreshed in time is still open afterwards.
        """
        running = yield start_node(self, jwt_leeway=0)
        exp = int(time.time()) + 2
        token = mint_token("alice", exp=exp)
        doomed = yield self.open(running, token)
        kept = yield self.open(running, token)
        yield kept.call("auth.refresh", {"token": mint_token("alice", ttl=300)})
        code, reason = yield closed_within(doomed)
        self.assertEqual(code, 4009)
        self.assertTrue(reason)
        self.assertGreaterEqual(time.time(), exp - 0.05)
        self.assertLess(time.time(), exp + 1.5)
        pong = yield kept.call("system.ping")
        self.assertIs(pong["pong"], True)
        self.assertGreater(time.time(), exp)
        self.assertFalse(kept.closed.called)


class RefreshTests(NodeTestCase):
    @inlineCallbacks
    def test_refresh_other_sub_forbidden(self):
        """C{auth.refresh} with another user's valid token is -32003 and changes nothing."""
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["doc:*"]))
        reply = yield client.request("auth.refresh", {"token": mint_token("bob", rooms=["*"])})
        self.assertEqual(error_code(reply), FORBIDDEN)
        rooms = yield client.call("rooms.list")
        self.assertEqual(sorted(rooms["rooms"]), ["broadcast", "user:alice"])
        # still alice's patterns: doc:* yes, bob's "*" no
        yield client.call("rooms.join", {"room": "doc:1"})
        reply = yield client.request("rooms.join", {"room": "other:1"})
        self.assertEqual(error_code(reply), FORBIDDEN)

    @inlineCallbacks
    def test_refresh_bad_token_keeps_old(self):
        """An invalid or expired refresh token is -32001 and the old token stays in force."""
        running = yield start_node(self)
        old = mint_token("alice", rooms=["doc:*"])
        client = yield self.open(running, old)
        session = session_of(running, "alice")[0]
        before = session.identity
        for token in ("nope", mint_token("alice", ttl=-60, rooms=["*"]),
                      mint_token("alice", rooms=["*"], secret="w" * 40)):
            reply = yield client.request("auth.refresh", {"token": token})
            self.assertEqual(error_code(reply), UNAUTHENTICATED)
        self.assertIs(session.identity, before)
        reply = yield client.request("rooms.join", {"room": "other:1"})
        self.assertEqual(error_code(reply), FORBIDDEN)
        yield client.call("rooms.join", {"room": "doc:1"})

    @inlineCallbacks
    def test_refresh_keeps_room_token_admission_after_pattern_rejoin(self):
        """
        A room entered with a (still valid) room token survives a refresh that drops the
        pattern, even when it was joined again in between by that pattern.
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["secret:*"]))
        room_token = mint_token("alice", room="secret:1")
        yield client.call("rooms.join", {"room": "secret:1", "token": room_token})
        yield client.call("rooms.join", {"room": "secret:1"})
        yield client.call("auth.refresh", {"token": mint_token("alice", rooms=[])})
        rooms = yield client.call("rooms.list")
        self.assertIn("secret:1", rooms["rooms"])
        self.assertEqual(list(client.messages), [])

    @inlineCallbacks
    def test_refresh_with_room_token_is_refused(self):
        """A room token is never a connection token, for auth.refresh either: -32001."""
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice"))
        reply = yield client.request(
            "auth.refresh", {"token": mint_token("alice", room="secret:1", ttl=9999)}
        )
        self.assertEqual(error_code(reply), UNAUTHENTICATED)

    @inlineCallbacks
    def test_refresh_revokes_rooms_no_longer_granted(self):
        """
        A refresh whose C{rooms} no longer grant a joined room leaves it and notifies
        C{rooms.revoked {room}}; rooms still granted, rooms admitted by a (valid) room
        token and the implicit rooms stay.
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["workspace:*", "doc:*"]))
        yield client.call("rooms.join", {"room": "workspace:1"})
        yield client.call("rooms.join", {"room": "doc:7"})
        yield client.call(
            "rooms.join", {"room": "secret:1", "token": mint_token("alice", room="secret:1")}
        )
        result = yield client.call(
            "auth.refresh", {"token": mint_token("alice", rooms=["doc:*"])}
        )
        self.assertIn("expires_at", result)
        note = yield client.next()
        self.assertEqual(
            note, {"jsonrpc": "2.0", "method": "rooms.revoked", "params": {"room": "workspace:1"}}
        )
        rooms = yield client.call("rooms.list")
        self.assertEqual(
            sorted(rooms["rooms"]), ["broadcast", "doc:7", "secret:1", "user:alice"]
        )
        self.assertEqual(list(client.messages), [])
        # and no more events of the revoked room reach it
        yield running.node.broker.publish("workspace:1", "publish", {"n": 1})
        yield running.node.broker.publish("doc:7", "publish", {"n": 2})
        event = yield client.next()
        self.assertEqual(event["params"]["room"], "doc:7")


# -- rooms ---------------------------------------------------------------------------


class RoomTests(NodeTestCase):
    @inlineCallbacks
    def test_star_pattern_semantics(self):
        """
        C{workspace:*} grants C{workspace:1}, C{workspace:} and C{workspace:a:b}
        (C{*} takes any run, empty and C{:} included) but not C{Workspace:1}
        (case-sensitive) nor C{workspace} (the C{:} is literal): those are -32003.
        A pattern without C{*} is one literal, case-sensitive name.
        """
        running = yield start_node(self)
        client = yield self.open(
            running, mint_token("alice", rooms=["workspace:*", "a*b", "Exact.1"])
        )
        for room in ("workspace:1", "workspace:", "workspace:a:b", "ab", "a:x:b", "Exact.1"):
            joined = yield client.call("rooms.join", {"room": room})
            self.assertEqual(joined["room"], room)
        for room in ("Workspace:1", "workspace", "xworkspace:1", "a:x:bc", "WORKSPACE:1",
                     "exact.1", "Exact.10", "Exact-1"):
            reply = yield client.request("rooms.join", {"room": room})
            self.assertEqual(error_code(reply), FORBIDDEN, room)
        rooms = yield client.call("rooms.list")
        self.assertEqual(
            sorted(rooms["rooms"]),
            sorted(["broadcast", "user:alice", "workspace:1", "workspace:", "workspace:a:b",
                    "ab", "a:x:b", "Exact.1"]),
        )

    @inlineCallbacks
    def test_no_rooms_claim_grants_nothing(self):
        """A token without C{rooms} may join only its implicit rooms."""
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice"))
        reply = yield client.request("rooms.join", {"room": "workspace:1"})
        self.assertEqual(error_code(reply), FORBIDDEN)

    @inlineCallbacks
    def test_reserved_names(self):
        """
        Names starting with C{__} are the server's (who is online anywhere is
        tracked as C{__online__}): -32003 even under C{*}; C{_x} is an ordinary name.
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["*"]))
        for room in ("__online__", "__", "__x"):
            reply = yield client.request("rooms.join", {"room": room})
            self.assertEqual(error_code(reply), FORBIDDEN, room)
        joined = yield client.call("rooms.join", {"room": "_x"})
        self.assertEqual(joined["room"], "_x")

    @inlineCallbacks
    def test_presence_shows_token_info(self):
        """
        The C{info} claim is what presence shows (C{{}} without one); presence is not
        tracked for C{user:} rooms and C{broadcast}.
        """
        running = yield start_node(self)
        alice = yield self.open(
            running, mint_token("alice", rooms=["doc:*"], info={"name": "Alice"})
        )
        bob = yield self.open(running, mint_token("bob", rooms=["doc:*"]))
        yield alice.call("rooms.join", {"room": "doc:1"})
        yield bob.call("rooms.join", {"room": "doc:1"})
        listed = yield bob.call("presence.list", {"room": "doc:1"})
        users = {u["user_id"]: u for u in listed["users"]}
        self.assertEqual(users["alice"]["info"], {"name": "Alice"})
        self.assertEqual(users["bob"]["info"], {})
        for room in ("broadcast", "user:bob"):
            listed = yield bob.call("presence.list", {"room": room})
            self.assertEqual(listed["users"], [])

    @inlineCallbacks
    def test_invalid_room_names(self):
        """Room names outside C{^[A-Za-z0-9_.:@-]{1,200}$} are -32602, even with C{*} granted."""
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["*"]))
        for room in ("", "a b", "x" * 201, "room\n", "caf\u00e9", "a/b", "a*", 5, None):
            for method in ("rooms.join", "rooms.leave"):
                reply = yield client.request(method, {"room": room})
                self.assertEqual(error_code(reply), INVALID_PARAMS, (method, room))
        joined = yield client.call("rooms.join", {"room": "x" * 200})
        self.assertEqual(joined["room"], "x" * 200)

    @inlineCallbacks
    def test_room_tokens(self):
        """
        A room token admits its user to its room; wrong sub, wrong room, expired, wrong
        key, C{alg: none}, or a connection token in its place are -32003.
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice"))
        refused = {
            "wrong sub": mint_token("bob", room="secret:1"),
            "wrong room": mint_token("alice", room="secret:2"),
            "expired": mint_token("alice", room="secret:1", ttl=-60),
            "wrong key": mint_token("alice", room="secret:1", secret="k" * 40),
            "alg none": unsigned_token({**_claims(), "room": "secret:1"}),
            "connection token": mint_token("alice", rooms=["secret:*"]),
            "garbage": "x.y.z",
        }
        for name, token in refused.items():
            reply = yield client.request("rooms.join", {"room": "secret:1", "token": token})
            self.assertEqual(error_code(reply), FORBIDDEN, name)
            self.assertNotIn(token, json.dumps(reply))
        rooms = yield client.call("rooms.list")
        self.assertNotIn("secret:1", rooms["rooms"])
        joined = yield client.call(
            "rooms.join", {"room": "secret:1", "token": mint_token("alice", room="secret:1")}
        )
        self.assertEqual(joined["room"], "secret:1")
        rooms = yield client.call("rooms.list")
        self.assertIn("secret:1", rooms["rooms"])
        # a member may join again (recovery) without showing the token again
        again = yield client.call("rooms.join", {"room": "secret:1"})
        self.assertEqual(again["room"], "secret:1")
        left = yield client.call("rooms.leave", {"room": "secret:1"})
        self.assertEqual(left, {"room": "secret:1"})
        # once left, the token is needed again
        reply = yield client.request("rooms.join", {"room": "secret:1"})
        self.assertEqual(error_code(reply), FORBIDDEN)

    @inlineCallbacks
    def test_pattern_is_enough_even_with_a_bad_room_token(self):
        """
        A pattern of the connection token admits on its own (PROTOCOL.md section 4: a
        pattern *or* a room token), so a useless room token shown with it is no refusal.
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["doc:*"]))
        for token in (mint_token("alice", room="doc:2"), mint_token("bob", room="doc:1"), "x"):
            joined = yield client.call("rooms.join", {"room": "doc:1", "token": token})
            self.assertEqual(joined["room"], "doc:1")

    @inlineCallbacks
    def test_implicit_rooms(self):
        """
        C{user:<sub>} and C{broadcast}: joining them is allowed (recovery), leaving them
        is -32003; leaving a room not joined is -32004; another user's room is -32003.
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["doc:*"]))
        for room in ("user:alice", "broadcast"):
            joined = yield client.call("rooms.join", {"room": room})
            self.assertEqual(joined["room"], room)
            self.assertEqual(joined["missed"], [])
            reply = yield client.request("rooms.leave", {"room": room})
            self.assertEqual(error_code(reply), FORBIDDEN, room)
        for room in ("doc:1", "user:bob"):
            reply = yield client.request("rooms.leave", {"room": room})
            self.assertEqual(error_code(reply), NOT_FOUND, room)
        reply = yield client.request("rooms.join", {"room": "user:bob"})
        self.assertEqual(error_code(reply), FORBIDDEN)
        yield client.call("rooms.join", {"room": "doc:1"})
        yield client.call("rooms.leave", {"room": "doc:1"})
        reply = yield client.request("rooms.leave", {"room": "doc:1"})
        self.assertEqual(error_code(reply), NOT_FOUND)
        rooms = yield client.call("rooms.list")
        self.assertEqual(sorted(rooms["rooms"]), ["broadcast", "user:alice"])


# -- backend-only methods ------------------------------------------------------------


class BackendMethodTests(NodeTestCase):
    @inlineCallbacks
    def test_backend_methods_look_like_unknown_names(self):
        """
        A browser calling a backend-only method gets the very error object an unknown
        name gets (-32601, nothing more), and rpc.discover does not list it.
        """
        running = yield start_node(self)
        client = yield self.open(running, mint_token("alice", rooms=["*"]))
        unknown = yield client.request("no.such.method", {"room": "x"})
        self.assertEqual(error_code(unknown), METHOD_NOT_FOUND)
        params = {
            "publish": {"room": "x", "event": "e", "data": {}},
            "notification.send": {"user_id": "bob", "title": "t", "message": "m"},
            "connections.disconnect": {"user_id": "bob"},
            "presence.online": {"user_ids": ["bob"]},
            "workspace.file_changed": {"workspace_id": "1", "path": "a", "change": "created"},
        }
        for method in BACKEND_ONLY:
            for given in (params.get(method, {}), {"room": "x"}, None):
                reply = yield client.request(method, given)
                self.assertEqual(reply["error"], unknown["error"], method)
        document = yield client.call("rpc.discover")
        names = {m["name"] for m in document["methods"]}
        self.assertIn("rooms.join", names)
        self.assertEqual(names & set(BACKEND_ONLY), set())


# -- per-user connection limit -----------------------------------------------------


class ConnectionLimitTests(NodeTestCase):
    @inlineCallbacks
    def test_handshake_over_limit_is_429_and_closing_frees_a_slot(self):
        """
        With UNREALON_MAX_CONNECTIONS_PER_USER=2 the third handshake-token connection of
        a user is HTTP 429 (other users are unaffected); closing one frees a slot.
        """
        running = yield start_node(self, max_connections_per_user=2)
        first = yield self.open(running, mint_token("alice"))
        yield self.open(running, mint_token("alice"))
        response = yield raw_handshake(
            running.ws_port, handshake_bytes(path="/ws?token=" + mint_token("alice"))
        )
        self.assertTrue(status_line(response).startswith(b"HTTP/1.1 429 "), response)
        yield self.open(running, mint_token("bob"))
        yield first.close()
        yield wait_until(lambda: running.node.hub.user_connections("alice") == 1)
        third = yield self.open(running, mint_token("alice"))
        rooms = yield third.call("rooms.list")
        self.assertIn("user:alice", rooms["rooms"])

    @inlineCallbacks
    def test_authenticate_over_limit_errors_and_closes(self):
        """
        Over the limit, C{auth.authenticate} answers -32003 and the server then closes
        the connection with CLOSE_TOO_MANY_CONNECTIONS and a reason saying why.
        """
        running = yield start_node(self, max_connections_per_user=2)
        first = yield self.open(running)
        yield first.call("auth.authenticate", {"token": mint_token("alice")})
        yield self.open(running, mint_token("alice"))
        third = yield self.open(running)
        reply = yield third.request("auth.authenticate", {"token": mint_token("alice")})
        self.assertEqual(error_code(reply), FORBIDDEN)
        self.assertIn("too many connections", reply["error"]["message"])
        code, reason = yield closed_within(third)
        self.assertEqual(code, CLOSE_TOO_MANY_CONNECTIONS)
        self.assertIn("too many connections", reason)
        self.assertEqual(running.node.hub.user_connections("alice"), 2)
        # closing one frees a slot for a first-message authentication too
        yield first.close()
        yield wait_until(lambda: running.node.hub.user_connections("alice") == 1)
        fourth = yield self.open(running)
        result = yield fourth.call("auth.authenticate", {"token": mint_token("alice")})
        self.assertEqual(result["user_id"], "alice")


# -- secrets never in logs -------------------------------------------------------------


#: the test's own Autobahn client logs its request (token included) at debug level:
#: that is the browser's side, not the server's, and is left out
_CLIENT_NAMESPACES = (
    "autobahn.twisted.websocket.WebSocketClient",
    "autobahn.websocket.protocol.WebSocketClient",
)


class SecretLogTests(NodeTestCase):
    def capture_logs(self) -> list[tuple[str, str]]:
        """Every log event from now to the test's end, formatted and as JSON, at debug."""
        seen: list[tuple[str, str]] = []

        def observer(event: dict[str, Any]) -> None:
            namespace = event.get("log_namespace") or ""
            if namespace.startswith(_CLIENT_NAMESPACES):
                return
            text = formatEvent(event) or ""
            failure = event.get("log_failure")
            if failure is not None:
                text += failure.getTraceback()
            seen.append((namespace, text + "\n" + eventAsJSON(event) + "\n" + repr(event)))

        previous = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(txaio.set_global_log_level, previous)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return seen

    @inlineCallbacks
    def test_no_token_or_secret_in_any_log_event(self):
        """
        Through a whole session at debug level -- C{?token=} and Bearer handshakes, a
        refused bad token (401), C{auth.authenticate}, C{auth.refresh} (good and bad), a
        room-token join and the disconnects -- no token, no signature part of one, and
        not the JWT secret appears in any log event, formatted or serialised.
        """
        running = yield start_node(self)
        seen = self.capture_logs()
        tokens = {
            "query": mint_token("alice", rooms=["workspace:*"]),
            "bearer": mint_token("alice"),
            "refused": mint_token("alice", secret="z" * 40),
            "refused header": mint_token("alice", ttl=-60),
            "first message": mint_token("bob"),
            "refresh": mint_token("bob", ttl=600, rooms=["doc:*"]),
            "refresh refused": mint_token("carol"),
            "room": mint_token("bob", room="secret:1"),
            "room refused": mint_token("bob", room="secret:3"),
        }
        query = yield self.open(running, tokens["query"])
        yield query.call("rooms.join", {"room": "workspace:1"})
        bearer = yield self.open(
            running, headers={"Authorization": "Bearer " + tokens["bearer"]}
        )
        yield bearer.call("system.ping")
        response = yield raw_handshake(
            running.ws_port, handshake_bytes(path="/ws?token=" + tokens["refused"])
        )
        self.assertTrue(status_line(response).startswith(b"HTTP/1.1 401 "))
        response = yield raw_handshake(
            running.ws_port,
            handshake_bytes(headers={"Authorization": "Bearer " + tokens["refused header"]}),
        )
        self.assertTrue(status_line(response).startswith(b"HTTP/1.1 401 "))
        later = yield self.open(running)
        yield later.call("auth.authenticate", {"token": tokens["first message"]})
        yield later.call("auth.refresh", {"token": tokens["refresh"]})
        reply = yield later.request("auth.refresh", {"token": tokens["refresh refused"]})
        self.assertEqual(error_code(reply), FORBIDDEN)
        yield later.call("rooms.join", {"room": "secret:1", "token": tokens["room"]})
        reply = yield later.request("rooms.join", {"room": "secret:2", "token": tokens["room refused"]})
        self.assertEqual(error_code(reply), FORBIDDEN)
        for client in (query, bearer, later):
            yield client.close()
        yield wait_until(lambda: running.node.hub.connection_count == 0)

        # the capture works: Autobahn's debug lines about these handshakes are in it
        self.assertTrue(
            any("opening handshake" in text for _, text in seen), "no handshake debug logged"
        )
        secrets = {"JWT secret": SECRET}
        for name, token in tokens.items():
            secrets[name] = token
            secrets[name + " signature"] = token.rsplit(".", 1)[1]
        for namespace, text in seen:
            for name, secret in secrets.items():
                self.assertNotIn(secret, text, f"{name} logged by {namespace}")
