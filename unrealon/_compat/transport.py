"""
Twisted's TCP transport buffers: how much is unsent, and writing through.

The send budget of PROTOCOL.md section 7 is "bytes the server has tried to
write and the kernel has not taken", which only the transport's user-space
buffer can tell (C{FileDescriptor.dataBuffer}, C{offset}, C{_tempDataLen});
and handing bytes to the kernel at once when that buffer is empty
(C{writeSomeData}) saves a reactor turn and two C{epoll_ctl} calls per write.
Upstream: a public C{bufferedBytes} and a write-through option on
C{ITCPTransport} would remove all of this (to be proposed to Twisted).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import ISSLTransport

from unrealon._compat import require


def check() -> None:
    probe = abstract.FileDescriptor(reactor=object())  # type: ignore[arg-type]
    require("twisted", probe, ("dataBuffer", "offset", "_tempDataLen", "_tempDataBuffer"))
    require("twisted", tcp.Connection, ("writeSomeData", "doWrite", "write", "TLS"))


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



check()
