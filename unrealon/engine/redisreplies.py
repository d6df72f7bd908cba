"""
The HTTP API's C{Idempotency-Key} records in Redis, shared by every node of
the cluster (L{unrealon.idempotency} says what the records are for).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from unrealon.engine import scripts
from unrealon.engine.rediskeys import api_reply_key
from unrealon.idempotency import PENDING_TTL, REPLY_TTL, Claim, IReplyStore, StoredReply

# Records in Redis are strings: "p:<token>" while pending, "d:<status>:<body>"
# when done.  Each step is one script (scripts.API_CLAIM, API_FINISH,
# API_RELEASE), so checking who holds a key and changing it happen together.


def _parse_record(value: Any) -> Claim:
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if text == "":
        return Claim(mine=True)
    if text.startswith("d:"):
        status, _, body = text[2:].partition(":")
        return Claim(reply=StoredReply(int(status), body.encode("utf-8")))
    return Claim()  # "p:...": another request is handling it


@implementer(IReplyStore)
class RedisReplyStore:
    """Records in Redis, shared by every node of the cluster."""

    def __init__(self, redis: Any) -> None:
        """
        @param redis: the node's txredisapi handler for ordinary commands.
            Its commands wait while Redis is away: callers put a deadline on
            every call.
        """
        self._redis = redis

    def claim(self, key: str, token: str) -> Deferred[Claim]:
        d = scripts.API_CLAIM(self._redis, [api_reply_key(key)], ["p:" + token, PENDING_TTL])
        return d.addCallback(_parse_record)

    def finish(self, key: str, token: str, reply: StoredReply) -> Deferred[None]:
        done = f"d:{reply.status}:".encode() + reply.body
        d = scripts.API_FINISH(self._redis, [api_reply_key(key)], ["p:" + token, done, REPLY_TTL])
        return d.addCallback(lambda _: None)

    def release(self, key: str, token: str) -> Deferred[None]:
        d = scripts.API_RELEASE(self._redis, [api_reply_key(key)], ["p:" + token])
        return d.addCallback(lambda _: None)
