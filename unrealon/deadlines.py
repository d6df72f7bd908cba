"""
Store calls made for a client, bounded: a client hears -32011 within
L{BACKEND_DEADLINE} seconds instead of waiting on a Redis that is gone
(PROTOCOL.md sections 1 and 3).
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime

from unrealon import jsonrpc
from unrealon.engine.interfaces import BackendUnavailable
from unrealon.jsonrpc import RPCError

#: longest a client call waits on the engine's store before -32011
BACKEND_DEADLINE = 5.0

T = TypeVar("T")


async def within_deadline(d: Deferred[T], clock: IReactorTime) -> T:
    """C{d}'s result, or -32011 (retryable) after L{BACKEND_DEADLINE} s or when the store is down."""
    d.addTimeout(BACKEND_DEADLINE, clock)
    try:
        result: Any = await d
    except (TimeoutError, BackendUnavailable, ConnectionError):
        raise RPCError(jsonrpc.BACKEND_UNAVAILABLE, data={"retryable": True}) from None
    return result  # type: ignore[no-any-return]
