"""
The Redis side of browser calls to backend methods (PROTOCOL.md section 9.2-9.3).

Three things, each a Redis operation or a supervised loop, nothing about
sessions or JSON-RPC (that is L{unrealon.backendcalls}):

  - the directory: every second, one script reads the declarations hash, the
    workers hash and Redis' clock, and hands the declarations and the names
    a live worker serves to C{on_directory};
  - a call is one script: C{XADD} to the backend stream with its deadline
    computed from Redis' clock (the workers judge deadlines by that clock);
    a cancel is another: the cancel key and the Pub/Sub message together;
  - the replies: this node's reply stream, read with a blocking C{XREAD} on
    its own connection (a stream, not Pub/Sub, so a connection blip loses
    nothing: the read resumes from the last id), each entry handed to
    C{on_reply}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from unrealon import jsoncodec
from unrealon.engine.interfaces import IBackendLink
from unrealon.engine.redisclient import LuaScript, RedisHandler, StreamClient, unavailable
from unrealon.engine.rediskeys import (
    BACKEND_CANCEL_CHANNEL,
    BACKEND_METHODS,
    BACKEND_WORKERS,
    backend_cancel_key,
    backend_reply_stream,
)
from unrealon.engine.supervision import RedisLink, SupervisedLoop, SupervisedReader

log = Logger(namespace="unrealon.engine.redisbackend")

#: the backend stream is trimmed to about this many entries (a backlog past
#: it is calls whose deadlines passed long ago)
CALLS_MAXLEN = 100_000
READ_BLOCK_MS = 1000
READ_COUNT = 1000
DIRECTORY_INTERVAL = 1.0

#: KEYS: methods hash, workers hash.  ARGV: none.
#: {now ms, methods (flat name/declaration), live workers' method lists (JSON)}
#: Worker fields that expired a minute ago are removed (a worker killed
#: without a clean stop leaves its field).
DIRECTORY = LuaScript(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = {}
local workers = redis.call('HGETALL', KEYS[2])
for i = 1, #workers, 2 do
  local ok, w = pcall(cjson.decode, workers[i + 1])
  local expires = ok and type(w) == 'table' and tonumber(w['expires']) or 0
  if expires > now then
    live[#live + 1] = workers[i + 1]
  elseif expires < now - 60000 then
    redis.call('HDEL', KEYS[2], workers[i])
  end
end
return {tostring(now), redis.call('HGETALL', KEYS[1]), live}
"""
)

#: KEYS: backend stream.  ARGV: payload without its closing brace, timeout ms, maxlen.
#: Appends the call with "deadline" = Redis' now + timeout; returns the entry id.
CALL = LuaScript(
    """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
                  'payload', ARGV[1] .. ',"deadline":' .. string.format('%d', deadline) .. '}')
"""
)

#: KEYS: cancel key.  ARGV: reason, lifetime ms, channel, call id.
CANCEL = LuaScript(
    """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('PUBLISH', ARGV[3], ARGV[4])
"""
)

SCRIPTS = (DIRECTORY, CALL, CANCEL)

#: what the directory hands on: declarations by name (raw JSON), the served names
DirectoryListener = Callable[[Mapping[str, str], frozenset[str]], None]
ReplyListener = Callable[[Any], None]


@implementer(IBackendLink)
class RedisBackendLink:
    """This node's calls to backend workers, through Redis."""

    def __init__(
        self,
        reactor: Any,
        redis: RedisHandler,
        reader: RedisHandler,
        *,
        node_id: str,
        stream: str,
        link: RedisLink | None = None,
        count_failure: Callable[[str], None] = lambda name: None,
    ) -> None:
        self._reactor = reactor
        self._redis = redis
        self._reader = StreamClient(reader)
        self._stream = stream
        self.reply_to = backend_reply_stream(node_id)
        self._last_id = "0-0"
        self._positioned = False
        self.on_directory: DirectoryListener = lambda declarations, served: None
        self.on_reply: ReplyListener = lambda reply: None
        self.reader = SupervisedReader(
            "backend replies reader", reactor, self._read_once, self._prepare,
            link=link, count_failure=count_failure,
        )
        self.directory = SupervisedLoop(
            "backend directory", reactor, DIRECTORY_INTERVAL, self._refresh,
            link=link, count_failure=count_failure,
        )
        self.loops = (self.reader, self.directory)

    def start(self) -> Deferred[None]:
        self.reader.start()
        self.directory.start(now=True)
        return self.reader.prepared()

    def stop(self) -> Deferred[None]:
        self.directory.stop()
        stopping = self.reader.stop()
        stopping.addTimeout(READ_BLOCK_MS / 1000 + 2, self._reactor)
        stopping.addErrback(
            lambda f: log.warn("the backend replies read did not end in time ({error})",
                               error=f.getErrorMessage())
        )
        return stopping

    # -- calls ------------------------------------------------------------------------

    def append_call(self, payload_prefix: str, timeout_ms: int) -> Deferred[Any]:
        """Append a call (its JSON without the closing brace); fires with the entry id."""
        d: Deferred[Any] = CALL(
            self._redis, [self._stream], [payload_prefix, timeout_ms, CALLS_MAXLEN]
        )
        return d.addErrback(unavailable)

    def cancel(self, call_id: str, reason: str, lifetime_ms: int) -> Deferred[Any]:
        """Tell the workers a call is cancelled: the key (for one not started) and the message."""
        d: Deferred[Any] = CANCEL(
            self._redis, [backend_cancel_key(call_id)],
            [reason, lifetime_ms, BACKEND_CANCEL_CHANNEL, call_id],
        )
        return d.addErrback(unavailable)

    # -- the directory ----------------------------------------------------------------

    async def _refresh(self) -> None:
        reply = await DIRECTORY(self._redis, [BACKEND_METHODS, BACKEND_WORKERS], [])
        _, flat, live = reply
        declarations = {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
        served: set[str] = set()
        for text in live:
            try:
                methods = jsoncodec.decode(str(text).encode()).get("methods", [])
            except (ValueError, AttributeError, RecursionError):
                log.warn("a backend worker's heartbeat is not the contract's JSON: ignored")
                continue
            served.update(m for m in methods if isinstance(m, str))
        self.on_directory(declarations, frozenset(served))

    # -- the replies ------------------------------------------------------------------

    async def _prepare(self) -> None:
        """
        Before the first read: start at the stream's end (nothing before it
        is for a call of this process).  After an error: go on from the last
        id, so replies written while the connection was away are read.
        """
        if not self._positioned:
            last = await StreamClient(self._redis).xrevrange(self.reply_to, count=1)
            self._last_id = last[0].id if last else "0-0"
            self._positioned = True

    async def _read_once(self) -> None:
        batches = await self._reader.xread(
            {self.reply_to: self._last_id}, count=READ_COUNT, block_ms=READ_BLOCK_MS
        )
        for _, entries in batches:
            for entry in entries:
                self._last_id = entry.id
                payload = (entry.fields or {}).get("payload")
                try:
                    reply = jsoncodec.decode(payload.encode()) if payload is not None else None
                except (ValueError, RecursionError):
                    reply = None
                if not isinstance(reply, dict):
                    log.warn("backend reply {id} is not a JSON object: dropped", id=entry.id)
                    continue
                try:
                    self.on_reply(reply)
                except Exception:
                    log.failure("handling backend reply {id} failed", id=entry.id)
