"""
The WebSocket edge: Autobahn protocol and factory for browser sessions.

One L{RPCSession} per connection.  It owns what belongs to a connection and
nothing more: the handshake checks (path, Origin, token), authentication
state and its timers, the call rate limit, size limits (through Autobahn's
options), JSON-RPC framing of replies, room membership as the hub sees it
(including the buffer that keeps live events behind a join's reply), the
outgoing byte budget that closes a slow reader, and the close codes of
PROTOCOL.md section 3.  What a method does lives in the handlers; the session
only validates, dispatches and answers.
"""

from __future__ import annotations

import http
import itertools
import pprint
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from unrealon import jsonrpc
from unrealon.auth import AuthError, Identity
from unrealon.engine.interfaces import RoomEvent
from unrealon.frames import DirectFrames
from unrealon.hub import IMember
from unrealon.jsonrpc import RPCError
from unrealon.limits import RateGuard, Verdict
from unrealon.node import Node
from unrealon.outbox import IConnection, Outbox, WriteCoalescer
from unrealon.rpc import Caller

log = Logger(namespace="unrealon.ws")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_UNAUTHENTICATED = 4001
CLOSE_DISCONNECTED = 4003
CLOSE_SLOW_CONSUMER = 4008
CLOSE_TOKEN_EXPIRED = 4009
CLOSE_RATE_ABUSE = 4029
CLOSE_TOO_MANY_CONNECTIONS = 4030

#: an error reply is never larger than the message that caused it plus this
#: (PROTOCOL.md section 3)
ERROR_REPLY_ALLOWANCE = 1024
#: seconds a client refused for too many unauthenticated connections should wait
RETRY_AFTER_UNAUTHENTICATED = 5

_conn_ids = itertools.count(1)


class ClientCall:
    """
    What a client method handler is given: the calling session, the node,
    and a way to act once the reply has been written (a join flushes the
    live events it held back only after its reply, so nothing overtakes it).
    """

    caller = Caller.CLIENT

    def __init__(self, session: RPCSession) -> None:
        self.session = session
        self.node = session.node
        self._after: list[Callable[[], None]] = []

    def after_reply(self, action: Callable[[], None]) -> None:
        self._after.append(action)

    def run_after_reply(self) -> None:
        actions, self._after = self._after, []
        for action in actions:
            action()


class _LazyPformat:
    """C{pprint.pformat(value)}, computed only when a log observer formats it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self.value), spec)

    def __str__(self) -> str:
        return pprint.pformat(self.value)


class HandshakeRefused(Exception):
    """
    A refused opening handshake: the HTTP status, a short plain-text body
    saying why (never the token), and extra response headers.
    """

    def __init__(self, code: int, why: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(code, why)
        self.code = code
        self.why = why
        self.headers = headers


# -- keeping tokens out of Autobahn's logs ---------------------------------------

_REDACTED = "[redacted]"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_SECRET_HEADER_LINE = re.compile(r"(?im)^((?:proxy-)?authorization|cookie)[ \t]*:[^\r\n]*")
_TOKEN_PARAM = re.compile(r"(?i)([?&;]token=)[^&;#\s]*")


def _scrub(value: Any) -> Any:
    """
    C{value} with handshake secrets blanked: the C{token} query parameter and the
    C{Authorization}/C{Cookie} headers, in request text (str or bytes), header
    dicts and lists of those.  Anything else is returned as it is.
    """
    if isinstance(value, str):
        value = _TOKEN_PARAM.sub(r"\1" + _REDACTED, value)
        return _SECRET_HEADER_LINE.sub(r"\1: " + _REDACTED, value)
    if isinstance(value, (bytes, bytearray)):
        return _scrub(bytes(value).decode("latin-1")).encode("latin-1")
    if isinstance(value, dict):
        return {
            k: _REDACTED if isinstance(k, str) and k.lower() in _SECRET_HEADERS else _scrub(v)
            for k, v in value.items()
        }
    if type(value) in (list, tuple):
        return type(value)(_scrub(v) for v in value)
    return value


class _ScrubbedLog:
    """
    Autobahn's txaio logger for sessions, with handshake secrets blanked.

    At debug level Autobahn logs the whole HTTP upgrade request, its request line
    and its headers, so the C{?token=} query and the C{Authorization} header would
    reach every log observer.  A log observer cannot take them back out (the
    runner's own observers see the event first), so the values are scrubbed here,
    before the event exists, whatever level is configured.
    """

    _EMITTERS = frozenset(
        {"trace", "debug", "info", "warn", "error", "critical", "failure", "emit"}
    )

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        # txaio binds the levels below the configured one to a no-op: keep it cheap
        if name not in self._EMITTERS or getattr(method, "__name__", "") == "_no_op":
            return method

        def emit(*args: Any, **kwargs: Any) -> Any:
            return method(
                *(_scrub(a) for a in args), **{k: _scrub(v) for k, v in kwargs.items()}
            )

        return emit


class _Joining:
    """The joins of one room in progress on one connection."""

    __slots__ = ("floor", "held", "pending", "succeeded", "was_member")

    def __init__(self, was_member: bool) -> None:
        #: whether the connection was in the room before the first of them
        self.was_member = was_member
        #: joins begun and not yet finished or aborted
        self.pending = 0
        #: whether one of them succeeded
        self.succeeded = False
        #: the highest cursor key their replies covered
        self.floor: Any = None
        #: live events held meanwhile: (event, prepared message, cursor key)
        self.held: list[tuple[RoomEvent, Any, Any]] = []

    def raise_floor(self, key: Any) -> None:
        self.succeeded = True
        if key is None:
            return
        # a later epoch replaces the floor; in one epoch the highest wins
        if self.floor is None or key[0] != self.floor[0] or key > self.floor:
            self.floor = key


@implementer(IMember, IConnection)
# (misc: with two bases mypy re-checks Autobahn's own adapter/protocol clash)
class RPCSession(DirectFrames, WebSocketServerProtocol):  # type: ignore[misc]
    """One browser connection speaking JSON-RPC 2.0."""

    factory: RPCServerFactory
    #: set by Autobahn from the factory's protocol options
    maxMessagePayloadSize: int

    #: Autobahn's logger (self.log) with tokens scrubbed; our own lines use the
    #: module's C{log}, which never receives a token.
    log = _ScrubbedLog(txaio.make_logger())  # type: ignore[attr-defined]

    def __init__(self) -> None:
        super().__init__()
        self.conn_id = f"c{next(_conn_ids)}"
        self.identity: Identity | None = None
        #: rooms this connection is in -> how it was admitted ("implicit",
        #: "pattern" or "token:<exp>")
        self.rooms: dict[str, str] = {}
        #: rooms being joined -> live events held until the join's reply
        self._joining: dict[str, _Joining] = {}
        #: rooms joined -> cursor key of the join's reply: live events at or
        #: before it were already in the reply (a node's feed may lag)
        self._floors: dict[str, Any] = {}
        #: what this connection writes, coalesced per turn (set on connect)
        self._outbox: Outbox | None = None
        #: the message rate limit, made on the first message (idle ones never need it)
        self._guard: RateGuard | None = None
        #: size of the message being handled plus the allowance: error replies fit in it
        self._reply_limit = 0
        #: counted in the factory's unauthenticated connections
        self._unauthenticated = False
        #: why the handshake was refused, for the HTTP answer's body
        self._refusal: HandshakeRefused | None = None
        self._auth_timer: IDelayedCall | None = None
        self._expiry_timer: IDelayedCall | None = None
        self._closing = False
        self._opened = False
        #: fires when the TCP connection is gone (graceful shutdown waits on it)
        self.closed: Deferred[None] = Deferred()

    @property
    def node(self) -> Node:
        return self.factory.node

    @property
    def user_id(self) -> str | None:
        return self.identity.user_id if self.identity else None

    # -- handshake ------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        node = self.node
        try:
            self._check_handshake(request)
        except HandshakeRefused as refused:
            node.metrics.handshakes_refused.labels(reason=str(refused.code)).inc()
            self._refusal = refused
            raise ConnectionDeny(refused.code, _status_phrase(refused.code)) from None
        except Exception:
            # Never let Autobahn put exception text in the HTTP answer.
            log.failure("handshake check failed")
            self._refusal = HandshakeRefused(500, "internal server error")
            raise ConnectionDeny(500, "Internal Server Error") from None

    def _check_handshake(self, request: ConnectionRequest) -> None:
        node = self.node
        if request.path != "/ws":
            raise HandshakeRefused(404, "not found: the WebSocket endpoint is /ws")
        if node.stopping:
            raise HandshakeRefused(503, "server shutting down", (("Retry-After", "1"),))
        origin = request.headers.get("origin")
        allowed = node.config.allowed_origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            raise HandshakeRefused(403, "origin not allowed")
        token = _handshake_token(request.headers, request.params)
        if token is None:
            if self.factory.unauthenticated >= node.config.max_unauthenticated:
                raise HandshakeRefused(
                    503,
                    "too many unauthenticated connections: send a token in the handshake, "
                    "or retry later",
                    (("Retry-After", str(RETRY_AFTER_UNAUTHENTICATED)),),
                )
            return
        verifier = node.verifier
        if verifier is None:
            raise HandshakeRefused(401, "unauthorized: no key is configured", _BEARER)
        try:
            identity = verifier.verify_connection_token(token)
        except AuthError as e:
            log.info("handshake refused: {reason}", reason=e.reason, peer=request.peer)
            raise HandshakeRefused(401, f"unauthorized: {e.reason}", _BEARER) from None
        if node.hub.user_connections(identity.user_id) >= node.config.max_connections_per_user:
            raise HandshakeRefused(429, "too many connections for this user")
        self.identity = identity

    def sendHttpErrorResponse(
        self, code: int, reason: str, responseHeaders: Any = None
    ) -> None:
        """
        Autobahn's refusal answers with a status line and no body; ours says
        why in a short plain-text body (PROTOCOL.md section 2), with the
        headers the refusal needs (C{Retry-After}, C{WWW-Authenticate}).
        """
        refused = self._refusal or HandshakeRefused(code, reason)
        body = (refused.why + "\n").encode("utf-8")
        lines = [
            f"HTTP/1.1 {code} {_status_phrase(code)}",
            f"Server: {self.factory.server}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        lines += [f"{name}: {value}" for name, value in (*refused.headers, *(responseHeaders or ()))]
        self.sendData("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)

    # -- lifecycle ------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections.add(self)
        self._outbox = Outbox(self, factory.coalescer, self.node.config.send_buffer_limit)
        super().connectionMade()

    def _connectionMade(self) -> None:
        # Autobahn's _connectionMade pretty-prints all ~40 protocol options
        # for a debug line, logged or not: a quarter of the server's CPU per
        # connection in the connect benchmark.  Its module's pformat is made
        # lazy for the call (the reactor thread is the only caller).
        autobahn_protocol.pformat = _LazyPformat  # type: ignore[attr-defined,assignment]
        try:
            super()._connectionMade()
        finally:
            autobahn_protocol.pformat = pprint.pformat  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
            # Autobahn leaves its closing-handshake timer running when the
            # peer drops the TCP connection instead of answering our close;
            # it would keep this protocol alive for handshake_timeout s.
            timer = getattr(self, "closeHandshakeTimeoutCall", None)
            if timer is not None:
                self.closeHandshakeTimeoutCall = None
                timer.cancel()
        finally:
            self.factory.connections.discard(self)
            if not self.closed.called:
                self.closed.callback(None)

    def onOpen(self) -> None:
        self.enable_direct_frames()
        node = self.node
        self._opened = True
        node.metrics.connections_opened.inc()
        node.hub.add(self)
        identity, self.identity = self.identity, None
        if identity is not None:
            self.authenticated(identity)
        else:
            self._unauthenticated = True
            self.factory.unauthenticated += 1
            self._auth_timer = node.reactor.callLater(
                node.config.auth_timeout, self._auth_timed_out
            )

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self._opened:
            return
        self._opened = False
        self._closing = True
        self._count_authenticated()
        for timer in (self._auth_timer, self._expiry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        node = self.node
        node.hub.remove(self)
        self._joining.clear()
        if self.identity is not None:
            user = self.identity.user_id
            for room in list(self.rooms):
                if presence_tracked(room):
                    _quietly(node.presence.leave(room, user, self.conn_id), "presence.leave")
            _quietly(node.presence.disconnect(user, self.conn_id), "presence.disconnect")
        self.rooms.clear()

    def _count_authenticated(self) -> None:
        """Leave the factory's count of unauthenticated connections (once)."""
        if self._unauthenticated:
            self._unauthenticated = False
            self.factory.unauthenticated -= 1

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        if self.identity is None:
            self.close_with(CLOSE_UNAUTHENTICATED, "authentication timeout")

    # -- authentication state -------------------------------------------------

    def authenticated(self, identity: Identity) -> None:
        """Become C{identity}: implicit rooms, presence, expiry timer."""
        node = self.node
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None
        self._count_authenticated()
        self.identity = identity
        node.hub.bind_user(self, identity.user_id)
        for room in (f"user:{identity.user_id}", "broadcast"):
            self.rooms[room] = "implicit"
            node.hub.join(room, self)
        _quietly(node.presence.connect(identity.user_id, self.conn_id), "presence.connect")
        self._schedule_expiry(identity.expires_at)

    def refreshed(self, identity: Identity) -> list[str]:
        """
        Swap in a newer token of the same user; leave the rooms it no longer
        grants (telling the client with C{rooms.revoked}) and return them.
        """
        from unrealon.auth import may_join

        self.identity = identity
        self._schedule_expiry(identity.expires_at)
        now = self.node.reactor.seconds()
        revoked = []
        for room, how in list(self.rooms.items()):
            if how == "implicit":
                continue
            if how.startswith("token:") and float(how[6:]) + self.node.config.jwt_leeway >= now:
                continue
            if may_join(identity.room_patterns, room):
                self.rooms[room] = "pattern"
                continue
            self.leave_room(room)
            revoked.append(room)
            self.send_json(jsonrpc.notification("rooms.revoked", {"room": room}))
        return revoked

    def _schedule_expiry(self, expires_at: float) -> None:
        node = self.node
        if self._expiry_timer is not None and self._expiry_timer.active():
            self._expiry_timer.cancel()
        delay = max(0.0, expires_at + node.config.jwt_leeway - node.reactor.seconds())
        self._expiry_timer = node.reactor.callLater(delay, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry_timer = None
        self.close_with(CLOSE_TOKEN_EXPIRED, "token expired")

    # -- rooms ------------------------------------------------------------------

    def begin_join(self, room: str, admitted: str) -> bool:
        """
        Start receiving C{room}'s live events into a holding buffer.
        Returns whether the connection was already in the room.
        """
        already = room in self.rooms
        if not already:
            self.rooms[room] = admitted
        elif self.rooms[room] != "implicit":
            self.rooms[room] = admitted
        joining = self._joining.get(room)
        if joining is None:
            # a join while another of the same room waits shares its buffer:
            # replacing it would lose the events held for the first
            joining = self._joining[room] = _Joining(was_member=already)
        joining.pending += 1
        self.node.hub.join(room, self)
        return already

    def finish_join(self, room: str, cursor: str) -> None:
        """
        The join's reply is written: send the held events that come after
        C{cursor} (the ones before it were in the reply's C{missed}), and
        drop later arrivals that are not after it either.
        """
        joining = self._joining.get(room)
        if joining is None:
            return
        joining.raise_floor(self.node.broker.cursor_key(cursor))
        self._end_join(room, joining)

    def abort_join(self, room: str, was_member: bool) -> None:
        """The join failed: undo L{begin_join}, resending held events if member."""
        joining = self._joining.get(room)
        if joining is None:
            return
        self._end_join(room, joining)

    def _end_join(self, room: str, joining: _Joining) -> None:
        """
        One join of C{room} is over.  While another is still waiting, keep
        holding (its reply must come first); after the last, release what
        was held: after the highest cursor the joins' replies covered if any
        succeeded, else as before the joins (member) or not at all.
        """
        joining.pending -= 1
        if joining.pending > 0:
            return
        del self._joining[room]
        if joining.floor is not None:
            self._floors[room] = joining.floor
            for event, prepared, key in joining.held:
                self.send_event(event, prepared, key)
        elif joining.succeeded or joining.was_member:
            for event, prepared, key in joining.held:
                self.send_event(event, prepared, key)
        else:
            self.rooms.pop(room, None)
            self.node.hub.leave(room, self)

    def leave_room(self, room: str) -> None:
        self.rooms.pop(room, None)
        self._joining.pop(room, None)
        self._floors.pop(room, None)
        self.node.hub.leave(room, self)
        if self.identity is not None and presence_tracked(room):
            _quietly(
                self.node.presence.leave(room, self.identity.user_id, self.conn_id),
                "presence.leave",
            )

    # -- sending ---------------------------------------------------------------

    def send_event(self, event: RoomEvent, prepared: Any, key: Any) -> None:
        joining = self._joining.get(event.room)
        if joining is not None:
            joining.held.append((event, prepared, key))
            return
        floor = self._floors.get(event.room)
        if floor is not None:
            if key is not None and key[0] == floor[0] and key <= floor:
                return  # already sent in the join's reply
            # events arrive in cursor order: nothing older can follow
            del self._floors[event.room]
        self.send_prepared(prepared)
        self.node.metrics.events_delivered.inc()

    def send_prepared(self, prepared: Any) -> None:
        if self._closing:
            return
        self.write_prepared(prepared)

    def send_json(self, message: Any) -> None:
        if self._closing:
            return
        self.send_payload(jsonrpc.encode(message))

    def send_payload(self, payload: bytes) -> None:
        """Send one encoded JSON text message."""
        if self._closing:
            return
        self.send_text(payload)
        self.node.metrics.bytes_sent.inc(len(payload))

    def queue_frame(self, frame: bytes) -> None:
        """A complete frame of the direct path: written at the end of this turn."""
        outbox = self._outbox
        assert outbox is not None
        outbox.add(frame)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Autobahn's own writes (handshake answers, control frames, messages
        it frames itself) go straight to the transport: whatever this turn
        queued goes first, so nothing overtakes a reply.
        """
        if self._outbox is not None:
            self._outbox.flush()
        super().sendData(data, sync, chopsize)

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> None:
        """
        Autobahn applies maxMessagePayloadSize to what we send as well (it
        raises PayloadExceededError); UNREALON_MAX_MESSAGE_SIZE limits client
        messages only, and an rpc.discover document or a rooms.join replay
        may well be larger.  Messages Autobahn frames itself (compression)
        are judged against the send budget like the direct path's.
        """
        limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
        try:
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
        finally:
            self.maxMessagePayloadSize = limit
        if self._outbox is not None:
            self._outbox.judge()

    def sendPreparedMessage(self, preparedMsg: Any) -> None:
        super().sendPreparedMessage(preparedMsg)
        if self._outbox is not None:
            self._outbox.judge()

    def close_slow_consumer(self) -> None:
        """
        Stop sending and close with 4008.  The close frame queues behind what
        the reader has not taken; Autobahn drops the TCP connection when the
        closing handshake times out, so memory stays bounded either way.
        """
        if self._closing:
            return
        log.info(
            "closing slow consumer {conn_id} of {user}",
            conn_id=self.conn_id,
            user=self.user_id,
        )
        if self._outbox is not None:
            self._outbox.drop()
        self.close_with(CLOSE_SLOW_CONSUMER, "slow consumer")

    def dropConnection(self, abort: bool = False) -> None:
        """
        End the TCP connection.  Autobahn aborts it (a reset, discarding
        unsent bytes) after every closing handshake a server completes,
        including the one where it answers a protocol violation with 1002 or
        1007; the contract asks for FIN there (PROTOCOL.md section 3).  A
        reset stays for peers that are not clean: no answer to our close in
        time, no pong, no finished opening handshake.
        """
        super().dropConnection(abort=abort and not self.wasClean)

    def close_with(self, code: int, reason: str) -> None:
        """Close with an application code (1000 or 4000-4999)."""
        if self._closing:
            return
        self._closing = True
        self.node.metrics.closes.labels(code=str(code)).inc()
        self.sendClose(code, reason)

    def close_going_away(self, reason: str = "server shutting down") -> None:
        """
        Close with 1001.  Autobahn's sendClose refuses 1001 (it allows only
        1000 and 3000-4999), so this uses the frame-level call.
        """
        if self._closing or self.state != self.STATE_OPEN:
            if self.state == self.STATE_CONNECTING:
                self.dropConnection(abort=True)
            return
        self._closing = True
        self.node.metrics.closes.labels(code=str(CLOSE_GOING_AWAY)).inc()
        self.sendCloseFrame(CLOSE_GOING_AWAY, reason.encode("utf-8"))

    def close_by_backend(self, reason: str) -> None:
        self.close_with(CLOSE_DISCONNECTED, reason[:120] or "disconnected")

    def resync(self, room: str) -> None:
        # A gap in live delivery we cannot fill: the client must rejoin with
        # its cursors, which recovers or reports recovered: false.
        self.close_going_away("resync")

    # -- receiving -------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closing:
            return
        if isBinary:
            self._closing = True
            self.node.metrics.closes.labels(code=str(CLOSE_UNSUPPORTED)).inc()
            self.sendCloseFrame(CLOSE_UNSUPPORTED, b"binary messages are not supported")
            return
        guard = self._guard
        if guard is None:
            guard = self._guard = RateGuard(self.node.config.rate_limit, self.node.reactor)
        # the message's own token (a batch's first entry: the others take theirs)
        verdict = guard.admit()
        if verdict is not Verdict.HANDLE and self._refused_cheaply(payload, verdict):
            return
        self._reply_limit = len(payload) + ERROR_REPLY_ALLOWANCE
        incoming = jsonrpc.parse_message(payload)
        if incoming.error is not None:
            # not JSON, or not a usable batch: one message
            if verdict is Verdict.HANDLE:
                self.send_json(jsonrpc.error_response(None, incoming.error))
            else:
                self._refuse(None, False, verdict)
            return
        if not incoming.is_batch:
            # the common case, and synchronous handlers answer without a Deferred
            entry = incoming.entries[0]
            call = ClientCall(self)
            reply = self._handle(entry, call)
            if isinstance(reply, Deferred):
                reply.addCallback(self._send_single, call)
                reply.addErrback(self._reply_failed)
            else:
                self._send_single(reply, call)
            return
        self._handle_batch(incoming.entries, guard, verdict)

    def _handle_batch(
        self, entries: tuple[jsonrpc.Entry, ...], guard: RateGuard, first: Verdict
    ) -> None:
        """A batch: each entry counts on its own; refused ones are answered -32029 in place."""
        calls: list[ClientCall] = []
        replies: list[Any] = []
        abuse = False
        for i, entry in enumerate(entries):
            verdict = guard.admit() if i else first
            if verdict is Verdict.HANDLE:
                call = ClientCall(self)
                calls.append(call)
                replies.append(self._handle(entry, call))
                continue
            self.node.metrics.rate_limited.inc()
            abuse = abuse or verdict is Verdict.CLOSE
            if not _is_notification(entry):
                error = RPCError(
                    jsonrpc.RATE_LIMITED, data={"retry_after_ms": guard.retry_after_ms()}
                )
                replies.append(jsonrpc.error_response(entry.id, error))
        if abuse:
            calls.append(ClientCall(self))
            calls[-1].after_reply(self._close_for_abuse)
        if any(isinstance(r, Deferred) for r in replies):
            d = gatherResults(
                [r if isinstance(r, Deferred) else succeed(r) for r in replies],
                consumeErrors=True,
            )
            d.addCallback(self._send_batch, calls)
            d.addErrback(self._reply_failed)
        else:
            self._send_batch(replies, calls)

    def _refused_cheaply(self, payload: bytes, verdict: Verdict) -> bool:
        """
        Refuse a single message over the rate limit, reading no more of it
        than its id: no entry objects, no lookup, no params.  A batch is
        not refused here (each entry counts and is answered on its own):
        returns False for one.
        """
        start = payload[:1]
        if start.isspace():
            start = payload.lstrip()[:1]
        if start == b"[":
            return False
        request_id: jsonrpc.RequestId = None
        if start == b"{":
            try:
                message = jsonrpc.decode_json(payload)
            except (ValueError, RecursionError):
                message = None
            if isinstance(message, dict):
                if "id" in message:
                    raw = message["id"]
                    request_id = raw if jsonrpc.valid_id(raw) else None
                elif message.get("jsonrpc") == "2.0" and isinstance(message.get("method"), str):
                    self._refuse(None, True, verdict)  # a notification: dropped
                    return True
        self._refuse(request_id, False, verdict)
        return True

    def _refuse(self, request_id: jsonrpc.RequestId, notification: bool, verdict: Verdict) -> None:
        """
        A message over the rate limit: -32029 unless it is a notification,
        then 4029 if the guard says so.  Nothing else is done for it: this
        is the path a flood takes, and it must stay cheap.
        """
        self.node.metrics.rate_limited.inc()
        if not notification:
            assert self._guard is not None
            self.send_payload(jsonrpc.rate_limited_reply(request_id, self._guard.retry_after_ms()))
        if verdict is Verdict.CLOSE:
            self._close_for_abuse()

    def _close_for_abuse(self) -> None:
        log.info("closing {conn_id} of {user}: rate limit abuse",
                 conn_id=self.conn_id, user=self.user_id)
        self.close_with(CLOSE_RATE_ABUSE, "rate limit exceeded")

    def _send_single(self, reply: Any, call: ClientCall) -> None:
        if reply is not None:
            self.send_payload(_encode_reply(reply))
        call.run_after_reply()

    def _send_batch(self, replies: list[Any], calls: list[ClientCall]) -> None:
        answered = [r for r in replies if r is not None]
        if answered:
            self.send_payload(_encode_reply(answered))
        for call in calls:
            call.run_after_reply()

    def _reply_failed(self, failure: Failure) -> None:
        log.failure("sending a reply failed", failure)

    def _handle(self, entry: jsonrpc.Entry, call: ClientCall) -> Any:
        """One entry: its reply object (None for a notification), or a Deferred of it."""
        if isinstance(entry, jsonrpc.Invalid):
            return jsonrpc.error_response(entry.id, entry.error)
        metrics = self.node.metrics
        started = time.perf_counter()
        try:
            spec = self._admit(entry)
        except RPCError as e:
            metrics.call_outcome("-", str(e.code))
            return None if entry.is_notification else jsonrpc.error_response(entry.id, e)

        def done(result: Any) -> Any:
            metrics.call_outcome(spec.name, "ok")
            metrics.call_seconds.observe(time.perf_counter() - started)
            if entry.is_notification:
                return None
            return jsonrpc.result_response(entry.id, result)

        def failed(failure: Failure) -> Any:
            error = failure.value if failure.check(RPCError) else RPCError(jsonrpc.INTERNAL_ERROR)
            return refused(error)

        def refused(error: Any) -> Any:
            metrics.call_outcome(spec.name, str(error.code))
            if entry.is_notification:
                return None
            return _fit(jsonrpc.error_response(entry.id, error), self._reply_limit)

        try:
            result = self.node.registry.invoke(spec, call, entry.params)
        except RPCError as e:
            return refused(e)
        if isinstance(result, Deferred):
            return result.addCallbacks(done, failed)
        return done(result)

    def _admit(self, entry: jsonrpc.Request) -> Any:
        """Authentication gate and lookup, in that order."""
        node = self.node
        if self.identity is None:
            spec = node.registry.lookup(entry.method, Caller.CLIENT) if entry.method in (
                "auth.authenticate",
                "system.ping",
            ) else None
            if spec is None or spec.requires_auth:
                raise RPCError(jsonrpc.UNAUTHENTICATED)
            return spec
        return node.registry.lookup(entry.method, Caller.CLIENT)


def _is_notification(entry: jsonrpc.Entry) -> bool:
    return isinstance(entry, jsonrpc.Request) and entry.is_notification


def _status_phrase(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


#: the challenge of a 401 answer (RFC 6750)
_BEARER = (("WWW-Authenticate", 'Bearer realm="unrealon-ws"'),)


def _fit(reply: dict[str, Any], limit: int) -> dict[str, Any]:
    """
    An error reply within C{limit} bytes (PROTOCOL.md section 3): entries of
    C{data.errors} are dropped from the end until it fits.  Only
    C{data.errors} grows with what the client sent; the rest is the echoed
    id and fixed text.
    """
    error = reply.get("error")
    data = error.get("data") if isinstance(error, dict) else None
    errors = data.get("errors") if isinstance(data, dict) else None
    if not errors:
        return reply
    while errors and len(_encode_reply(reply)) > limit:
        del errors[len(errors) // 2 if len(errors) > 1 else 0 :]
    return reply


def presence_tracked(room: str) -> bool:
    """Presence is not tracked for the implicit rooms (PROTOCOL.md section 4)."""
    return not (room.startswith("user:") or room == "broadcast")


def _handshake_token(headers: Mapping[str, str], params: Mapping[str, list[str]]) -> str | None:
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    values = params.get("token")
    if values and values[0]:
        return values[0]
    return None


def _encode_reply(reply: Any) -> bytes:
    """
    Encode a reply object or a batch's array of them.  A result JSON cannot
    carry (a handler returned an object, NaN, a cycle) is a handler's bug:
    that reply becomes a bare -32603, the rest of its batch goes as it is.
    """
    try:
        return jsonrpc.encode(reply)
    except (TypeError, ValueError, RecursionError):
        if isinstance(reply, list):
            return b"[" + b",".join(_encode_reply(r) for r in reply) + b"]"
        log.failure("a result could not be encoded as JSON")
        error = RPCError(jsonrpc.INTERNAL_ERROR)
        return jsonrpc.encode(jsonrpc.error_response(reply.get("id"), error))


def _quietly(d: Deferred[Any], what: str) -> None:
    d.addErrback(lambda f: log.failure("{what} failed", f, what=what))


class RPCServerFactory(WebSocketServerFactory):
    """Builds L{RPCSession}s for one node, with its limits applied."""

    protocol = RPCSession  # type: ignore[assignment]

    def __init__(self, node: Node, url: str = "ws://127.0.0.1/ws") -> None:
        super().__init__(url, server=f"unrealon-ws/{node.version}")
        self.node = node
        #: every connection, from TCP accept to close (handshakes included)
        self.connections: set[RPCSession] = set()
        #: connections open and not yet authenticated (UNREALON_MAX_UNAUTHENTICATED)
        self.unauthenticated = 0
        #: writes made outside a connection's own read leave at the end of the turn
        self.coalescer = WriteCoalescer(node.reactor)
        config = node.config
        options: dict[str, Any] = dict(
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            autoPingInterval=config.ping_interval,
            autoPingTimeout=config.ping_timeout,
            openHandshakeTimeout=config.handshake_timeout,
            closeHandshakeTimeout=config.handshake_timeout,
            # Origin is checked in onConnect (a missing Origin is allowed).
            allowedOrigins=["*"],
            allowNullOrigin=True,
            # a protocol violation is answered with its close frame (1002,
            # 1007) and a clean close, not a dropped connection
            failByDrop=False,
            # the server answers a client's close with the same code
            echoCloseCodeReason=True,
            tcpNoDelay=True,
            # Autobahn's default answers a plain GET (no Upgrade) with an HTML page
            # naming its version that meta-refreshes to any ?redirect= URL: an open
            # redirect on our port.  Off, such a request gets 426 Upgrade Required.
            webStatus=False,
        )
        if config.compression:
            limit = config.max_message_size

            def accept(offers: list[Any]) -> Any:
                for offer in offers:
                    if isinstance(offer, PerMessageDeflateOffer):
                        return PerMessageDeflateOfferAccept(offer, max_message_size=limit)
                return None

            options["perMessageCompressionAccept"] = accept
        # setProtocolOptions resets allowNullOrigin unless given: pass all at once.
        self.setProtocolOptions(**options)
