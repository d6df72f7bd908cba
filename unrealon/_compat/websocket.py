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
  - Autobahn colours the arguments of its debug lines (C{autobahn.util.hl},
    C{hltype}) with click whenever click is importable, whether or not the
    line is logged: ~22 calls per connection, a tenth of the node's CPU per
    connection in a reconnect storm (bench/, reconnect_storm), in any
    environment that has click for another reason (import-linter brings it
    to ours).  L{plain_log_highlights} turns the colouring off; our logs are
    JSON or plain text and never wanted the escape codes.  Upstream: style
    lazily, in the observer.
  - Autobahn leaves its closing-handshake timer (C{closeHandshakeTimeoutCall})
    running when the peer drops TCP instead of answering our close; it
    keeps the protocol alive for the handshake timeout.
    L{cancel_close_handshake_timer}.  Upstream: cancel it in
    C{_connectionLost}, as it does the other timers.
  - Autobahn applies C{maxMessagePayloadSize} to outgoing messages too; the
    limit is for client messages only.  L{outgoing_size_unlimited} lifts it
    around one send.  Upstream: separate incoming and outgoing limits.
  - Autobahn keeps the opening handshake for the connection's life: the raw
    request, its status line, URI, parsed headers and query, and the raw
    response, about 2.5 KiB per connection, never read after the handshake.
    L{release_handshake} drops them when the connection opens.  It also
    gives every connection an empty C{deque} for chopped and "sync" writes
    (760 bytes; neither is used here): L{lazy_send_queue} puts an empty
    tuple in its place and L{ensure_send_queue} makes the deque before the
    first write that needs one.  Together a quarter of the memory of an idle
    connection (bench/, idle_memory).  Upstream: drop the handshake data
    after C{succeedHandshake} unless a debug option keeps it, and make the
    send queue on first use.
"""

from __future__ import annotations

import pprint
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from autobahn import util as autobahn_util
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol

from unrealon._compat import require, unsupported

#: registered close codes (RFC 6455 section 7.4, IANA) a peer may send
REGISTERED_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)


#: what Autobahn's server protocol keeps of the opening handshake, and the
#: empty value each is left with (the types Autobahn itself starts from)
HANDSHAKE_LEFTOVERS: dict[str, Any] = {
    "http_request_data": b"",
    "http_status_line": "",
    "http_request_uri": "",
    # read-only: one empty mapping shared by every connection
    "http_headers": MappingProxyType({}),
    "http_request_params": MappingProxyType({}),
    "http_response_data": "",
}


def check() -> None:
    require("autobahn", WebSocketProtocol, ("CLOSE_STATUS_CODES_ALLOWED", "_connectionMade",
                                            "sendData", "_send"))
    require("autobahn", autobahn_protocol, ("pformat",))
    require("autobahn", autobahn_util, ("_HAS_CLICK", "hl"))
    if not isinstance(WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED, list):
        raise unsupported("autobahn", "CLOSE_STATUS_CODES_ALLOWED is no longer a list")
    if "maxMessagePayloadSize" not in getattr(WebSocketProtocol, "CONFIG_ATTRS_COMMON", ()):
        raise unsupported("autobahn", "maxMessagePayloadSize is no longer a protocol option")


def plain_log_highlights() -> None:
    """Autobahn's debug-line highlights as plain text (no click styling)."""
    autobahn_util._HAS_CLICK = False


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


def release_handshake(protocol: Any) -> None:
    """
    Drop what Autobahn kept of an opened connection's handshake.  Each
    attribute is rebound to a shared empty value rather than deleted: code
    that reads one later (a log line) finds it empty instead of failing.
    """
    for name, empty in HANDSHAKE_LEFTOVERS.items():
        if name in protocol.__dict__:
            setattr(protocol, name, empty)


def lazy_send_queue(protocol: Any) -> None:
    """Replace the connection's (still empty) send queue with an empty tuple."""
    if not protocol.send_queue:
        protocol.send_queue = ()


def ensure_send_queue(protocol: Any, sync: bool, chopsize: int | None) -> None:
    """
    Before C{sendData(data, sync, chopsize)}: a write Autobahn would queue
    gets a real deque.  Autobahn queues a write when it is "sync", chopped,
    or something is queued already (then the deque exists).
    """
    if (sync or chopsize) and type(protocol.send_queue) is tuple:
        protocol.send_queue = deque()


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
plain_log_highlights()
