"""
The WebSocket edge: Autobahn protocol and factory for browser sessions.

L{RPCSession} is the transport adapter: it connects Autobahn's callbacks
(handshake, open, message, close) to the parts that each do one job --

  - L{unrealon.handshake}: who may upgrade, and what a refusal says;
  - L{unrealon.authstate.Authentication}: the identity and its two timers;
  - L{unrealon.limits.RateGuard}: the per-message rate limit;
  - L{unrealon.dispatch.Dispatcher}: JSON-RPC in, replies out (no socket);
  - L{unrealon.membership.RoomMembership}: rooms, joins and their buffers;
  - L{unrealon.outbox.Outbox}: coalesced writes and the send budget;
  - L{unrealon._compat.directframes.DirectFrames}: plain text frames without Autobahn's
    per-frame machinery;

-- and owns the close codes of PROTOCOL.md section 3.  Every close is a
close handshake ending in FIN (L{RPCSession.dropConnection}).
"""

from __future__ import annotations

import itertools
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from unrealon import closecodes, jsonrpc
from unrealon._compat import websocket as compat_websocket
from unrealon._compat.directframes import DirectFrames
from unrealon.auth import Identity
from unrealon.authstate import Authentication, IAuthOwner, UnauthenticatedConnections
from unrealon.dispatch import Dispatcher, IClientSession
from unrealon.engine.interfaces import RoomEvent
from unrealon.handshake import (
    HandshakeRefused,
    ScrubbedLog,
    check_handshake,
    refusal_response,
    status_phrase,
)
from unrealon.hub import IMember
from unrealon.limits import RateGuard
from unrealon.membership import IRoomConnection, RoomMembership, implicit_rooms, presence_tracked
from unrealon.node import Node
from unrealon.outbox import IConnection, Outbox, WriteCoalescer

log = Logger(namespace="unrealon.ws")

_conn_ids = itertools.count(1)


@implementer(IMember, IConnection, IClientSession, IAuthOwner, IRoomConnection)
# (misc: with two bases mypy re-checks Autobahn's own adapter/protocol clash)
class RPCSession(DirectFrames, WebSocketServerProtocol):  # type: ignore[misc]
    """One browser connection speaking JSON-RPC 2.0."""

    factory: RPCServerFactory
    #: set by Autobahn from the factory's protocol options
    maxMessagePayloadSize: int

    #: Autobahn's logger (self.log) with tokens scrubbed; our own lines use the
    #: module's C{log}, which never receives a token.
    log = ScrubbedLog(txaio.make_logger())  # type: ignore[attr-defined]

    def __init__(self) -> None:
        super().__init__()
        self.conn_id = f"c{next(_conn_ids)}"
        #: made on connect, when the factory is known
        self.auth: Authentication
        self.membership: RoomMembership
        self._outbox: Outbox
        #: the message rate limit, made on the first message (idle ones never need it)
        self._guard: RateGuard | None = None
        #: what the handshake proved, until the connection opens
        self._handshake_identity: Identity | None = None
        #: why the handshake was refused, for the HTTP answer's body
        self._refusal: HandshakeRefused | None = None
        self._closing = False
        self._opened = False
        #: fires when the TCP connection is gone (graceful shutdown waits on it)
        self.closed: Deferred[None] = Deferred()

    @property
    def node(self) -> Node:
        return self.factory.node

    @property
    def identity(self) -> Identity | None:
        return self.auth.identity

    @property
    def user_id(self) -> str | None:
        identity = self.auth.identity
        return identity.user_id if identity is not None else None

    # -- handshake ------------------------------------------------------------

    # Autobahn runs onConnect through txaio.as_future and answers the
    # handshake when a returned Deferred fires (its stub only names the sync
    # results, hence the ignore)
    def onConnect(  # type: ignore[override]
        self, request: ConnectionRequest
    ) -> Deferred[None] | None:
        node = self.node
        try:
            self._handshake_identity = check_handshake(
                request, node.config, node.verifier,
                stopping=node.stopping,
                user_connections=node.hub.user_connections,
                unauthenticated=self.factory.unauthenticated.count,
            )
        except HandshakeRefused as refused:
            if refused.code == 401:
                log.info("handshake refused: {reason}", reason=refused.why, peer=request.peer)
            node.metrics.handshakes_refused.labels(reason=str(refused.code)).inc()
            self._refusal = refused
            raise ConnectionDeny(refused.code, status_phrase(refused.code)) from None
        except Exception:
            # Never let Autobahn put exception text in the HTTP answer.
            log.failure("handshake check failed")
            self._refusal = HandshakeRefused(500, "internal server error")
            raise ConnectionDeny(500, "Internal Server Error") from None
        identity = self._handshake_identity
        if identity is None:
            return None
        # The connection is in its implicit rooms from the start (section
        # 4): open it once their events reach this node.
        waiting = node.hub.ready(implicit_rooms(identity.user_id))
        if waiting is None:
            return None
        waiting.addTimeout(OPEN_WAIT, node.reactor)
        return waiting.addBoth(_opened_anyway)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        """Our refusals say why in a short body (PROTOCOL.md section 2)."""
        refused = self._refusal or HandshakeRefused(code, reason)
        if responseHeaders:
            refused = HandshakeRefused(refused.code, refused.why,
                                       (*refused.headers, *responseHeaders))
        self.sendData(refusal_response(refused, self.factory.server))

    # -- lifecycle ------------------------------------------------------------

    def connectionMade(self) -> None:
        factory, node = self.factory, self.factory.node
        factory.connections.add(self)
        config = node.config
        self.auth = Authentication(
            self, node.reactor, factory.unauthenticated,
            auth_timeout=config.auth_timeout, leeway=config.jwt_leeway,
        )
        self.membership = RoomMembership(self, node.hub, node.broker, node.presence, node.reactor)
        self._outbox = Outbox(self, factory.coalescer, config.send_buffer_limit)
        # Autobahn's pretty-printed options dump for a debug line, made lazy
        with compat_websocket.lazy_options_dump():
            super().connectionMade()
        compat_websocket.lazy_send_queue(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
            compat_websocket.cancel_close_handshake_timer(self)
        finally:
            self.factory.connections.discard(self)
            if not self.closed.called:
                self.closed.callback(None)

    def onOpen(self) -> None:
        self.enable_direct_frames()
        compat_websocket.release_handshake(self)
        node = self.node
        self._opened = True
        node.metrics.connections_opened.inc()
        node.hub.add(self)
        identity, self._handshake_identity = self._handshake_identity, None
        self.auth.open(identity)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self._opened:
            return
        self._opened = False
        self._closing = True
        self._outbox.drop()
        node = self.node
        node.hub.remove(self)
        self.membership.close()
        if node.backend is not None:
            node.backend.connection_closed(self)
        identity = self.auth.identity
        if identity is not None:
            _quietly(node.presence.disconnect(identity.user_id, self.conn_id),
                     "presence.disconnect")
        self.auth.close()

    # -- authentication ---------------------------------------------------------

    def became(self, identity: Identity) -> None:
        """The connection is C{identity}'s from now on (IAuthOwner)."""
        node = self.node
        node.hub.bind_user(self, identity.user_id)
        self.membership.enter_implicit(identity.user_id)
        _quietly(node.presence.connect(identity.user_id, self.conn_id), "presence.connect")

    def authenticate(self, identity: Identity) -> None:
        self.auth.authenticate(identity)

    def refresh(self, identity: Identity) -> list[str]:
        """
        Swap in a newer token of the same user; leave the rooms it no longer
        grants (telling the client with C{rooms.revoked}) and return them.
        """
        self.auth.refresh(identity)
        revoked = self.membership.revoke(identity, self.node.config.jwt_leeway)
        for room in revoked:
            self.send_json(jsonrpc.notification("rooms.revoked", {"room": room}))
        return revoked

    # -- receiving -------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closing:
            return
        if isBinary:
            self._closing = True
            self.node.metrics.closes.labels(code=str(closecodes.UNSUPPORTED)).inc()
            self.sendCloseFrame(closecodes.UNSUPPORTED, b"binary messages are not supported")
            return
        guard = self._guard
        if guard is None:
            guard = self._guard = RateGuard(self.node.config.rate_limit, self.node.reactor)
        self.factory.dispatcher.message(payload, self, guard)

    # -- sending ---------------------------------------------------------------

    def send_event(self, event: RoomEvent, prepared: Any, key: Any) -> None:
        """A live room event from the hub: the membership decides whether it goes now."""
        self.membership.route(event, prepared, key)

    def deliver(self, event: RoomEvent, prepared: Any) -> None:
        self.send_prepared(prepared)
        self.node.metrics.events_delivered.inc()

    def send_prepared(self, prepared: Any) -> None:
        if not self._closing:
            self.write_prepared(prepared)

    def send_json(self, message: Any) -> None:
        if not self._closing:
            self.send_payload(jsonrpc.encode(message))

    def send_payload(self, payload: bytes) -> None:
        """Send one encoded JSON text message."""
        if self._closing:
            return
        self.send_text(payload)
        self.node.metrics.bytes_sent.inc(len(payload))

    def queue_frame(self, frame: bytes) -> None:
        """A complete frame of the direct path: written at the end of this turn."""
        self._outbox.add(frame)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Autobahn's own writes (handshake answers, control frames, messages
        it frames itself) go straight to the transport: whatever this turn
        queued goes first, so nothing overtakes a reply.
        """
        outbox = getattr(self, "_outbox", None)
        if outbox is not None:
            outbox.flush()
        compat_websocket.ensure_send_queue(self, sync, chopsize)
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
        UNREALON_MAX_MESSAGE_SIZE limits client messages only (Autobahn would
        apply it to ours too: an rpc.discover document or a replay may be
        larger).  Messages Autobahn frames itself (compression) are judged
        against the send budget like the direct path's.
        """
        with compat_websocket.outgoing_size_unlimited(self):
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
        self._outbox.judge()

    def sendPreparedMessage(self, preparedMsg: Any) -> None:
        super().sendPreparedMessage(preparedMsg)
        self._outbox.judge()

    # -- closing -----------------------------------------------------------------

    def close_slow_consumer(self) -> None:
        """
        Stop sending and close with 4008.  The close frame queues behind what
        the reader has not taken; Autobahn drops the TCP connection when the
        closing handshake times out, so memory stays bounded either way.
        """
        if self._closing:
            return
        log.info("closing slow consumer {conn_id} of {user}", conn_id=self.conn_id,
                 user=self.user_id)
        self._outbox.drop()
        self.close_with(closecodes.SLOW_CONSUMER, "slow consumer")

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
        self.node.metrics.closes.labels(code=str(closecodes.GOING_AWAY)).inc()
        self.sendCloseFrame(closecodes.GOING_AWAY, reason.encode("utf-8"))

    def close_by_backend(self, reason: str) -> None:
        self.close_with(closecodes.DISCONNECTED, reason[:120] or "disconnected")

    def resync(self, room: str) -> None:
        # A gap in live delivery we cannot fill: the client must rejoin with
        # its cursors, which recovers or reports recovered: false.
        self.close_going_away("resync")


def _quietly(d: Deferred[Any], what: str) -> None:
    d.addErrback(lambda f: log.failure("{what} failed", f, what=what))


#: longest an opening handshake waits for its user's rooms to be heard (a
#: confirmation takes a round trip to Redis; while Redis is away a node
#: still accepts connections, PROTOCOL.md section 1)
OPEN_WAIT = 1.0


def _opened_anyway(result: Any) -> None:
    if isinstance(result, Failure):
        # Redis is away: nothing is published meanwhile, and the rooms are
        # listened to again as soon as it is back; the token was good
        log.info("opening a connection before its user's rooms are listened to ({error})",
                 error=result.getErrorMessage())


class RPCServerFactory(WebSocketServerFactory):
    """Builds L{RPCSession}s for one node, with its limits applied."""

    protocol = RPCSession  # type: ignore[assignment]

    def __init__(self, node: Node, url: str = "ws://127.0.0.1/ws") -> None:
        super().__init__(url, server=f"unrealon-ws/{node.version}")
        self.node = node
        self.dispatcher = Dispatcher(node)
        #: every connection, from TCP accept to close (handshakes included)
        self.connections: set[RPCSession] = set()
        #: connections open and not yet authenticated (UNREALON_MAX_UNAUTHENTICATED)
        self.unauthenticated = UnauthenticatedConnections()
        #: writes leave at the end of the reactor turn, all connections' at once
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


__all__ = ["RPCServerFactory", "RPCSession", "presence_tracked"]
