"""
A connection's outgoing bytes: coalesced per reactor turn, written through
to the kernel, and judged against the send budget (PROTOCOL.md section 7).

Everything a session sends in one reactor turn -- the replies to the
frames of a read, a feed batch's events -- goes to the kernel as one write
once every I/O event of that turn has been handled, from one shared
L{WriteCoalescer} call.  The write goes straight to the socket when the
transport holds nothing unsent (L{unrealon._compat.transport.write_through}), so a
reply costs one C{send} and no C{epoll_ctl}; what the kernel does not take
is buffered by Twisted as usual.

Why the end of the turn and not the end of each read: measured with 100
connections in a closed loop, writing each connection's replies as soon as
its read was handled woke the client for every reply and doubled the
kernel time per call (30.7k calls/s against 22.9k); writing them all after
the turn's reads gives 38.8k (Twisted's own buffering, which sends on the
next turn with an C{epoll_ctl} pair per reply: 30.7k).

The send budget is judged after that write attempt, on what the kernel did
not take (plus one more real attempt before closing), never on bytes merely
queued within a turn: a reader that keeps up is never cut, whatever the
size of a burst.  Past the budget the connection is a slow consumer.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from unrealon._compat import transport as _compat

log = Logger(namespace="unrealon.outbox")


class IFlushable(Interface):
    """Something holding bytes to write at the end of the reactor turn."""

    def flush() -> None:
        """Write what is held now."""


class IConnection(Interface):
    """What an L{Outbox} needs from the connection it writes for."""

    transport = Attribute("the Twisted transport, or None once the connection is gone")

    def close_slow_consumer() -> None:
        """The kernel left more than the budget unsent: close (4008)."""


class WriteCoalescer:
    """
    Flushes every L{Outbox} written to in this turn, once, at the start of
    the next reactor iteration (C{callLater(0)}: after this turn's I/O
    events, before the next poll).  One delayed call per turn serves every
    connection.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._waiting: list[IFlushable] = []
        self._call: IDelayedCall | None = None

    def later(self, outbox: IFlushable) -> None:
        self._waiting.append(outbox)
        if self._call is None:
            self._call = self._reactor.callLater(0, self.flush_all)

    def flush_all(self) -> None:
        self._call = None
        waiting, self._waiting = self._waiting, []
        for outbox in waiting:
            try:
                outbox.flush()
            except Exception:
                # one connection's failure must not keep the others' bytes
                log.failure("flushing a connection's writes failed")


@implementer(IFlushable)
class Outbox:
    """
    The bytes one connection will write at the end of this turn.

    The connection's C{transport} is read when flushing (Autobahn sets and
    clears it); its C{close_slow_consumer} is called when the kernel leaves
    more than C{limit} bytes unsent after a real attempt.  (One small object
    per connection, no closures: idle memory per connection counts.)
    """

    __slots__ = ("_chunks", "_coalescer", "_connection", "_limit", "closed")

    def __init__(self, connection: IConnection, coalescer: WriteCoalescer, limit: int) -> None:
        self._connection = connection
        self._coalescer = coalescer
        self._limit = limit
        self._chunks: list[bytes] | None = None
        self.closed = False

    def add(self, data: bytes) -> None:
        """Write C{data} at the end of this turn, after what came before it."""
        if self.closed:
            return
        chunks = self._chunks
        if chunks is None:
            self._chunks = [data]
            self._coalescer.later(self)
        else:
            chunks.append(data)

    def flush(self) -> None:
        """Write what is held now, then judge the budget."""
        chunks = self._chunks
        if chunks is None:
            return
        self._chunks = None
        transport = self._connection.transport
        if self.closed or transport is None:
            return
        _compat.write_through(transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        self.judge()

    def judge(self) -> None:
        """Close the connection if the kernel has not taken more than the budget after a real attempt."""
        transport = self._connection.transport
        if transport is None or _compat.unsent(transport) <= self._limit:
            return
        _compat.try_send(transport)
        if _compat.unsent(transport) > self._limit and not self.closed:
            self._connection.close_slow_consumer()

    def drop(self) -> None:
        """Send nothing more (the connection is closing or gone)."""
        self.closed = True
        self._chunks = None
