"""
The one place that touches private internals of Twisted and Autobahn.

Each access is a small function with a docstring saying why no public API
does the job and which upstream change would remove it.  Everything it
relies on is checked when this module is imported (L{check}): a release of
a dependency that renames or removes one of them stops the server at start
with a clear error naming the package and its version, instead of breaking
it silently under load.  C{tests/test_compat.py} has a test per access.

Accesses here:

  - Twisted's TCP transport buffers (L{unsent}, L{write_through},
    L{try_send}): the send budget of PROTOCOL.md section 7 is "bytes the
    server has tried to write and the kernel has not taken", which only the
    transport's user-space buffer can tell, and writing at once when that
    buffer is empty saves a reactor turn and two C{epoll_ctl} calls per
    reply.  Upstream: a public C{bufferedBytes} / write-through option on
    C{ITCPTransport} would remove all three.
  - Autobahn's list of close codes a peer may send
    (C{WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED}) lacks 1014 ("bad
    gateway", in the IANA registry since 2016), so a client closing with it
    would get 1002.  L{allow_registered_close_codes} adds it.
  - Autobahn's C{_connectionMade} pretty-prints all ~40 protocol options
    for a debug line whether or not it is logged: a quarter of the server's
    CPU per connection in the connect benchmark.  L{lazy_options_dump} swaps
    the module's C{pformat} for a lazy one for that call.  Upstream: format
    lazily (the log call already takes the value as a field).
  - Autobahn leaves its closing-handshake timer (C{closeHandshakeTimeoutCall})
    running when the peer drops TCP instead of answering our close; it
    keeps the protocol alive for the handshake timeout.
    L{cancel_close_handshake_timer}.  Upstream: cancel it in
    C{_connectionLost}, as it does the other timers.
  - Autobahn applies C{maxMessagePayloadSize} to outgoing messages too;
    the limit is for client messages only.  L{outgoing_size_unlimited}
    lifts it around one send.  Upstream: separate in/out limits.
"""

from __future__ import annotations

import pprint
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import abstract, tcp
from twisted.internet.interfaces import ISSLTransport

#: registered close codes (RFC 6455 section 7.4, IANA) a peer may send
REGISTERED_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)


class IncompatibleDependency(ImportError):
    """An installed dependency no longer has an internal this module relies on."""


def _require(package: str, owner: Any, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise IncompatibleDependency(
            f"unrealon-ws needs {', '.join(missing)} of {getattr(owner, '__qualname__', owner)} "
            f"from {package} {version(package)}; this version is not supported "
            f"(see setup.cfg for the tested range)"
        )


def check() -> None:
    """Verify every internal used here still exists; raises L{IncompatibleDependency}."""
    probe = abstract.FileDescriptor(reactor=object())  # type: ignore[arg-type]
    _require("twisted", probe, ("dataBuffer", "offset", "_tempDataLen", "_tempDataBuffer"))
    _require("twisted", tcp.Connection, ("writeSomeData", "doWrite", "write", "TLS"))
    _require("autobahn", WebSocketProtocol, ("CLOSE_STATUS_CODES_ALLOWED", "_connectionMade"))
    if "maxMessagePayloadSize" not in getattr(WebSocketProtocol, "CONFIG_ATTRS_COMMON", ()):
        raise IncompatibleDependency(
            f"autobahn {version('autobahn')}: maxMessagePayloadSize is no longer a protocol option"
        )
    _require("autobahn", autobahn_protocol, ("pformat",))
    if not isinstance(WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED, list):
        raise IncompatibleDependency(
            f"autobahn {version('autobahn')}: CLOSE_STATUS_CODES_ALLOWED is no longer a list"
        )


# -- Twisted transports ------------------------------------------------------------


def _plain_tcp(transport: Any) -> bool:
    """A Twisted TCP (or Unix) socket transport without TLS: what the functions below know."""
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and not ISSLTransport.providedBy(transport)
    )


def unsent(transport: Any) -> int:
    """
    Bytes C{transport} holds in user space, written but not yet taken by the
    kernel (C{FileDescriptor}'s two buffers); 0 for transports without them.
    """
    try:
        return len(transport.dataBuffer) - int(transport.offset) + int(transport._tempDataLen)
    except (AttributeError, TypeError):
        return 0


def write_through(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, but when the transport holds nothing unsent,
    hand the bytes to the kernel now instead of on the reactor's next turn;
    only what the kernel does not take is buffered (and sent by the reactor
    as usual).  The order of bytes is unchanged: nothing is ever sent ahead
    of buffered data.
    """
    if (
        transport.connected
        and not transport.disconnecting
        and _plain_tcp(transport)
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            if sent == len(data):
                return
            data = data[sent:]
        # else: the connection is broken; the reactor finds out on its next
        # write attempt of the buffered data and reports it the usual way
    transport.write(data)


def try_send(transport: Any) -> None:
    """
    Try now to hand the transport's buffered bytes to the kernel (what the
    reactor does when the socket is writable), so that L{unsent} answers
    after a real attempt.  Only for a connection that is not closing: once
    Twisted is told to close after flushing, C{doWrite}'s return value is
    the reactor's to act on.
    """
    if transport.connected and not transport.disconnecting and _plain_tcp(transport):
        if transport._tempDataLen or transport.offset < len(transport.dataBuffer):
            # None, or the connection's loss, which the reactor's own next
            # doWrite reports again: the socket stays registered for writing
            transport.doWrite()


# -- Autobahn ------------------------------------------------------------------------


class _LazyPformat:
    """C{pprint.pformat(value)}, computed only when a log observer formats it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self.value), spec)

    def __str__(self) -> str:
        return pprint.pformat(self.value)


@contextmanager
def lazy_options_dump() -> Iterator[None]:
    """Within the block, Autobahn's protocol module formats its options dump lazily."""
    autobahn_protocol.pformat = _LazyPformat  # type: ignore[attr-defined,assignment]
    try:
        yield
    finally:
        autobahn_protocol.pformat = pprint.pformat  # type: ignore[attr-defined]


def cancel_close_handshake_timer(protocol: Any) -> None:
    """Cancel Autobahn's closing-handshake timer of a connection that is gone."""
    timer = getattr(protocol, "closeHandshakeTimeoutCall", None)
    if timer is not None:
        protocol.closeHandshakeTimeoutCall = None
        timer.cancel()


@contextmanager
def outgoing_size_unlimited(protocol: Any) -> Iterator[None]:
    """Within the block, Autobahn does not apply the incoming size limit to what we send."""
    limit, protocol.maxMessagePayloadSize = protocol.maxMessagePayloadSize, 0
    try:
        yield
    finally:
        protocol.maxMessagePayloadSize = limit


def allow_registered_close_codes() -> None:
    """Accept every registered close code from peers (Autobahn's list lacks 1014)."""
    allowed = WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED
    for code in REGISTERED_CLOSE_CODES:
        if code not in allowed:
            allowed.append(code)


check()
allow_registered_close_codes()
