"""
Autobahn's WebSocket protocol: the internals the session adjusts.

  - Autobahn's list of close codes a peer may send
    (C{WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED}) lacks 1014 ("bad
    gateway", in the IANA registry since 2016), so a client closing with it
    would get 1002.  L{allow_registered_close_codes} adds it.  Upstream: add
    1014 to the list.
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
  - Autobahn applies C{maxMessagePayloadSize} to outgoing messages too; the
    limit is for client messages only.  L{outgoing_size_unlimited} lifts it
    around one send.  Upstream: separate incoming and outgoing limits.
"""

from __future__ import annotations

import pprint
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol

from unrealon._compat import require, unsupported

#: registered close codes (RFC 6455 section 7.4, IANA) a peer may send
REGISTERED_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)


def check() -> None:
    require("autobahn", WebSocketProtocol, ("CLOSE_STATUS_CODES_ALLOWED", "_connectionMade"))
    require("autobahn", autobahn_protocol, ("pformat",))
    if not isinstance(WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED, list):
        raise unsupported("autobahn", "CLOSE_STATUS_CODES_ALLOWED is no longer a list")
    if "maxMessagePayloadSize" not in getattr(WebSocketProtocol, "CONFIG_ATTRS_COMMON", ()):
        raise unsupported("autobahn", "maxMessagePayloadSize is no longer a protocol option")


def allow_registered_close_codes() -> None:
    """Accept every registered close code from peers (Autobahn's list lacks 1014)."""
    allowed = WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED
    for code in REGISTERED_CLOSE_CODES:
        if code not in allowed:
            allowed.append(code)


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


check()
allow_registered_close_codes()
