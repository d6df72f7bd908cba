"""
A Redis Pub/Sub connection that says exactly when each channel is live.

A node subscribes to a room's channel before it reads the room's history for
a join, so that nothing published after that read can be missed
(PROTOCOL.md section 4).  That needs the confirmation of each channel.
txredisapi's C{SubscriberProtocol} cannot give it: it answers a SUBSCRIBE of
several channels with the first confirmation and hands the later ones to
whatever command waits next.  So the subscriber side is this small RESP2
client instead: it sends AUTH, SUBSCRIBE and UNSUBSCRIBE, and reports every
confirmation and message to its L{ISubscriptionListener}, in the order Redis
sent them.  It parses a burst of messages in one pass (txredisapi switches
its line parser into raw mode for every bulk string).

L{SubscriberConnection} keeps one such connection up with Twisted's
C{ClientService} (backoff 0.1 s doubling to 1 s); after every reconnect the
listener subscribes again (Redis forgot the subscriptions with the
connection).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from unrealon.redisurl import RedisAddress

log = Logger(namespace="unrealon.engine.pubsub")

#: bytes of messages handed on per reactor turn at most: Twisted reads a
#: socket at most this much at a time (C{FileDescriptor.bufferSize}), and
#: the listener hands each read on before the next.  So a burst of a room's
#: events reaches its members' transports a slice at a time, each turn's
#: writes reach the kernel before the next slice, and only real slow readers
#: accumulate past UNREALON_SEND_BUFFER_LIMIT (and are closed with 4008).
READ_SLICE = 64 * 1024
#: channels per SUBSCRIBE/UNSUBSCRIBE command (a reconnect resubscribes all)
CHANNELS_PER_COMMAND = 1000
CONNECT_TIMEOUT = 5.0


class ISubscriptionListener(Interface):
    """What a L{SubscriberConnection} reports, in Redis' order."""

    def connected(protocol: SubscriberProtocol) -> None:
        """A connection is up (authenticated if needed): subscribe through it."""

    def disconnected() -> None:
        """The connection is gone: every subscription with it."""

    def subscribed(channel: bytes) -> None:
        """Redis confirmed a SUBSCRIBE of C{channel}: its messages follow."""

    def message(channel: bytes, payload: bytes) -> None:
        """A message published on C{channel}."""


class ReplyError(Exception):
    """An error reply (C{-ERR ...}) on the subscriber connection."""


class _Incomplete(Exception):
    pass


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2 value at C{pos}: (value, end); raises L{_Incomplete}."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[end + 2 : stop], stop + 2
    if kind == 42:  # * array
        count = int(buf[pos + 1 : end])
        items = []
        at = end + 2
        for _ in range(count):
            item, at = _parse(buf, at)
            items.append(item)
        return items, at
    if kind == 58:  # : integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # - error
        return ReplyError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise ValueError(f"not a RESP2 reply (first byte {kind!r})")


def encode_command(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class SubscriberProtocol(Protocol):
    """One subscriber connection: commands out, confirmations and messages in."""

    def __init__(
        self, listener: ISubscriptionListener, address: RedisAddress, name: str | None = None
    ) -> None:
        self._listener = listener
        self._address = address
        self._name = name
        self._buffer = b""
        self._ready = False
        self._out: ITransport | None = None

    def connectionMade(self) -> None:
        self._out = out = self.transport
        assert out is not None
        address = self._address
        if address.password is not None:
            login = ([address.username] if address.username else []) + [address.password]
            out.write(encode_command("AUTH", *login))
        if self._name:
            # operators (and the fault tests) find it in CLIENT LIST
            out.write(encode_command("CLIENT", "SETNAME", self._name))
        self._ready = True
        self._listener.connected(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._ready:
            self._ready = False
            self._listener.disconnected()

    def subscribe(self, channels: Sequence[bytes]) -> None:
        self._send(b"SUBSCRIBE", channels)

    def unsubscribe(self, channels: Sequence[bytes]) -> None:
        self._send(b"UNSUBSCRIBE", channels)

    def _send(self, command: bytes, channels: Sequence[bytes]) -> None:
        if not self._ready or self._out is None:
            return
        for start in range(0, len(channels), CHANNELS_PER_COMMAND):
            self._out.write(
                encode_command(command, *channels[start : start + CHANNELS_PER_COMMAND])
            )

    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        pos, size = 0, len(buf)
        listener = self._listener
        try:
            while pos < size:
                try:
                    reply, pos = _parse(buf, pos)
                except _Incomplete:
                    break
                if isinstance(reply, list) and len(reply) == 3:
                    kind = reply[0]
                    if kind == b"message":
                        listener.message(reply[1], reply[2])
                    elif kind == b"subscribe":
                        listener.subscribed(reply[1])
                    # unsubscribe confirmations: the listener forgot the
                    # channel when it asked; nothing to do
                elif isinstance(reply, ReplyError):
                    # AUTH refused, or a command refused: without a working
                    # login nothing will be delivered; start over (and log)
                    log.error("Redis refused the subscriber connection's command: {error}",
                              error=str(reply))
                    self._close()
                    return
        except ValueError:
            log.failure("malformed reply on the subscriber connection; reconnecting")
            self._buffer = b""
            self._close()
            return
        self._buffer = buf[pos:]

    def _close(self) -> None:
        if self._out is not None:
            self._out.loseConnection()


class _Factory(Factory):
    def __init__(
        self, listener: ISubscriptionListener, address: RedisAddress, name: str | None
    ) -> None:
        self._listener = listener
        self._address = address
        self._name = name

    def buildProtocol(self, addr: Any) -> SubscriberProtocol:
        return SubscriberProtocol(self._listener, self._address, self._name)


def endpoint_for(reactor: Any, address: RedisAddress) -> IStreamClientEndpoint:
    if address.kind == "unix":
        assert address.path is not None
        return UNIXClientEndpoint(reactor, address.path, timeout=CONNECT_TIMEOUT)
    assert address.host is not None and address.port is not None
    return HostnameEndpoint(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT)


class SubscriberConnection:
    """Keeps one L{SubscriberProtocol} connected (reconnecting with backoff)."""

    def __init__(
        self, reactor: Any, address: RedisAddress, name: str | None = None,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        """
        @param name: the connection's CLIENT SETNAME (no spaces; others are
            replaced), so it can be told apart in CLIENT LIST.
        @param endpoint: where to connect (a Sentinel address needs its
            L{unrealon.engine.sentinel.MasterEndpoint}); else C{address}'s.
        """
        self._reactor = reactor
        self.address = address
        self._endpoint = endpoint
        self.name = None if name is None else re.sub(r"[^A-Za-z0-9_.:@-]", "_", name)
        self._service: ClientService | None = None

    def start(self, listener: ISubscriptionListener) -> None:
        self._service = ClientService(
            self._endpoint or endpoint_for(self._reactor, self.address),
            _Factory(listener, self.address, self.name),
            # little jitter: every moment away is a moment a repair must cover
            retryPolicy=backoffPolicy(initialDelay=0.1, factor=2.0, maxDelay=1.0,
                                      jitter=lambda: random.uniform(0, 0.1)),
            clock=self._reactor,
        )
        self._service.startService()

    def stop(self) -> Deferred[None]:
        service, self._service = self._service, None
        if service is None:
            from twisted.internet.defer import succeed

            return succeed(None)
        stopping: Deferred[None] = service.stopService()
        return stopping
