"""
The HTTP API's C{Idempotency-Key} records in Redis, shared by every node of
the cluster (L{unrealon.idempotency} says what the records are for).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from unrealon.engine.rediskeys import api_reply_key
from unrealon.idempotency import PENDING_TTL, REPLY_TTL, Claim, IReplyStore, StoredReply

# Records in Redis are strings: "p:<token>" while pending, "d:<status>:<body>"
# when done.  Each step is one script, so checking who holds a key and
# changing it happen together.  EVAL (not EVALSHA): the API is not a hot
# path, and Redis caches the compiled script anyway.

#: KEYS[1] = record; ARGV = pending value, pending ttl.  "" when claimed, else the record.
_CLAIM = """\
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return '' end
return redis.call('GET', KEYS[1]) or ''
"""

#: KEYS[1] = record; ARGV = pending value, done value, reply ttl.
_FINISH = """\
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or not current then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
  return 1
end
return 0
"""

#: KEYS[1] = record; ARGV = pending value.
_RELEASE = """\
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
        d: Deferred[Any] = self._redis.execute_command(
            "EVAL", _CLAIM, 1, api_reply_key(key), "p:" + token, PENDING_TTL
        )
        return d.addCallback(_parse_record)

    def finish(self, key: str, token: str, reply: StoredReply) -> Deferred[None]:
        done = f"d:{reply.status}:".encode() + reply.body
        d: Deferred[Any] = self._redis.execute_command(
            "EVAL", _FINISH, 1, api_reply_key(key), "p:" + token, done, REPLY_TTL
        )
        return d.addCallback(lambda _: None)

    def release(self, key: str, token: str) -> Deferred[None]:
        d: Deferred[Any] = self._redis.execute_command(
            "EVAL", _RELEASE, 1, api_reply_key(key), "p:" + token
        )
        return d.addCallback(lambda _: None)
