"""
The HTTP API's C{Idempotency-Key} replies (PROTOCOL.md section 8).

A request with an C{Idempotency-Key} that repeats one already handled in the
last five minutes on the cluster is not handled again: it gets the first
request's reply.  Each key has one record:

  - I{pending}, while one request handles it.  Taken atomically (C{SET NX}
    in Redis), so of two requests with the same key -- on one node or on two
    -- exactly one handles it; the other waits for the record to become...
  - I{done}: the first request's status and exact body, kept
    L{REPLY_TTL} seconds and replayed byte for byte.

A pending record lives L{PENDING_TTL} seconds, so a node that dies while
handling does not block the key for long.  A request that was not handled
(refused params, unknown method, Redis unreachable) releases its record, so
a retry is handled.

Keys are scoped by method and hashed (L{scoped_key}): the raw header value
never becomes a Redis key name or a dictionary key, and the same key sent to
two methods names two requests.  They are not scoped by API key: every key
belongs to the one backend, and a retry that straddles a key rotation must
still find its first reply.

The memory engine keeps records in this process (L{MemoryReplyStore}), the
Redis engine in Redis (L{unrealon.engine.redisreplies.RedisReplyStore}),
where every node sees them.
"""

from __future__ import annotations

import hashlib

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import Interface, implementer

#: how long a handled request's reply is replayed (PROTOCOL.md: 5 minutes)
REPLY_TTL = 300
#: how long a request may hold a key while handling it; far above the API's
#: own deadline, so only a dead node's record ever expires this way
PENDING_TTL = 30
#: how often a request waiting for another one's reply looks again
POLL_INTERVAL = 0.05

def scoped_key(method: str, idempotency_key: str) -> str:
    """The record's name for this method and header value: a SHA-256, hex."""
    return hashlib.sha256(f"{method}\n{idempotency_key}".encode()).hexdigest()


@attrs.frozen
class StoredReply:
    """A reply as it was sent: status and exact body bytes."""

    status: int
    body: bytes


@attrs.frozen
class Claim:
    """
    The outcome of asking for a key: C{mine} (handle the request), or the
    first request's C{reply}, or neither (another request is handling it).
    """

    mine: bool = False
    reply: StoredReply | None = None


class IReplyStore(Interface):
    """Where the pending and done records of idempotency keys live."""

    def claim(key: str, token: str) -> Deferred[Claim]:
        """Take C{key} for the request C{token} if nobody has it, else say who has."""

    def finish(key: str, token: str, reply: StoredReply) -> Deferred[None]:
        """Store the reply of the request that holds C{key} (unless another took it over)."""

    def release(key: str, token: str) -> Deferred[None]:
        """Forget C{key} if this request still holds it (it was not handled)."""


@implementer(IReplyStore)
class MemoryReplyStore:
    """Records in this process: the memory engine's, which is one node."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: key -> (expires at, holder's token or None once done, reply or None)
        self._records: dict[str, tuple[float, str | None, StoredReply | None]] = {}
        self._next_sweep = 0.0

    def _sweep(self, now: float) -> None:
        # at most every few seconds: memory stays bounded by five minutes of keys
        if now < self._next_sweep:
            return
        self._next_sweep = now + 5.0
        for key in [k for k, (expires, _, _) in self._records.items() if expires <= now]:
            del self._records[key]

    def _live(self, key: str) -> tuple[float, str | None, StoredReply | None] | None:
        record = self._records.get(key)
        if record is not None and record[0] <= self._clock.seconds():
            del self._records[key]
            return None
        return record

    def claim(self, key: str, token: str) -> Deferred[Claim]:
        now = self._clock.seconds()
        self._sweep(now)
        record = self._live(key)
        if record is None:
            self._records[key] = (now + PENDING_TTL, token, None)
            return succeed(Claim(mine=True))
        return succeed(Claim(reply=record[2]))

    def finish(self, key: str, token: str, reply: StoredReply) -> Deferred[None]:
        record = self._live(key)
        if record is None or record[1] == token:
            self._records[key] = (self._clock.seconds() + REPLY_TTL, None, reply)
        return succeed(None)

    def release(self, key: str, token: str) -> Deferred[None]:
        record = self._live(key)
        if record is not None and record[1] == token:
            del self._records[key]
        return succeed(None)


async def claim_or_wait(
    store: IReplyStore, key: str, token: str, clock: IReactorTime, deadline: float
) -> Claim:
    """
    Claim C{key}, or wait (polling) until the request holding it has stored
    its reply.  At C{deadline} (reactor time) a key still held by another
    request gives C{Claim()}: neither mine nor answered.  A store that does
    not answer by then (Redis away) fails with
    L{twisted.internet.defer.TimeoutError}.
    """
    while True:
        d = store.claim(key, token)
        d.addTimeout(max(0.001, deadline - clock.seconds()), clock)
        claim = await d
        if claim.mine or claim.reply is not None:
            return claim
        if clock.seconds() + POLL_INTERVAL >= deadline:
            return claim
        await deferLater(clock, POLL_INTERVAL, lambda: None)
