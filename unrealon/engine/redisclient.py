"""
Typed Redis helpers over txredisapi: URLs, connections, streams, Lua.

Why this module exists: txredisapi (1.6.0) has no stream commands at all (no
XADD, XREADGROUP, XACK, XAUTOCLAIM, XPENDING, XINFO, ...), returns untyped
nested lists, and has a few behaviours that bite a long-running server.  This
module is the one place that knows about them; everything above it gets attrs
values and Deferreds.

The rules it encodes (see the project notes on txredisapi, twisted-notes.md section 1):

* Every connection uses C{convertNumbers=False}: otherwise txredisapi turns
  any bulk string that looks like a number (C{"007"}, C{"1_000"}, C{"1.5"})
  into an C{int}/C{float}, field values included.  Replies therefore come
  back as nested lists of C{str} (plus C{int} for RESP integer replies and
  C{None} for nils) and are converted to typed values here, at the edge.
* A bulk string that is not valid UTF-8 would come back as C{bytes}; stream
  field values are decoded with C{errors="replace"} so a consumer always sees
  C{str} (our payloads are JSON, so a mangled one fails JSON parsing and is
  dead-lettered instead of poisoning the consumer).
* Blocking reads (C{XREADGROUP}/C{XREAD} with C{BLOCK}) are not known to
  txredisapi as blocking: on a shared pool the commands that land on the same
  connection queue behind them, and with C{replyTimeout} shorter than the
  block the connection is aborted.  So blocking reads go on a dedicated
  connection (C{connect(..., blocking=True)}) and are sent with
  C{apply_timeout=False}.  Send nothing else on that connection.
* With C{reconnect=True} a command issued while no connection exists does not
  fail, it waits (for ever) until one comes back; C{replyTimeout} does not
  cover that wait.  L{StreamClient.ping} puts its own deadline on it;
  callers that must not hang should do the same (C{Deferred.addTimeout}).
  Commands in flight when a connection drops fail with
  C{txredisapi.ConnectionError("Lost connection")}.
* Error replies surface as C{txredisapi.ResponseError} whose text is the
  server's, unchanged (C{"BUSYGROUP ..."}, C{"NOGROUP ..."}, C{"ERR ..."};
  txredisapi means to strip C{ERR} but never does).  Use
  L{redis_error_code} rather than matching strings.
* Scripts are flushed by a Redis restart: L{LuaScript} re-loads on
  C{NOSCRIPT}.  Prefer one Lua script to txredisapi's MULTI/pipeline API,
  which holds a pool connection until commit and leaks it on error paths.

Importing txredisapi imports the global reactor (it binds C{callLater} at
import time), so import this module only after the reactor is chosen, i.e.
not from the twistd plugin module itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure

from unrealon._compat import redis as compat_redis
from unrealon.engine.interfaces import BackendUnavailable
from unrealon.redisurl import RedisAddress, parse_redis_url

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_REPLY_TIMEOUT",
    "REPLY_SCRIPT",
    "AutoClaim",
    "GroupInfo",
    "LuaScript",
    "PendingEntry",
    "PendingSummary",
    "RedisAddress",
    "RedisHandler",
    "StreamClient",
    "StreamEntry",
    "UnexpectedReply",
    "connect",
    "parse_redis_url",
    "push_reply",
    "redis_error_code",
    "stream_id_key",
    "unavailable",
]

#: txredisapi's ConnectionHandler (the library is untyped).
RedisHandler = Any

#: Seconds before a non-blocking command is failed (and its connection aborted).
DEFAULT_REPLY_TIMEOUT = 10.0
#: Seconds allowed for establishing one connection.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Reconnect backoff: the first retry after this long, then x e, capped.
RECONNECT_INITIAL_DELAY = 0.2
RECONNECT_MAX_DELAY = 1.0


class UnexpectedReply(Exception):
    """Redis answered with a reply of a shape this module does not understand."""


def redis_error_code(error: BaseException) -> str | None:
    """
    The error code of a Redis error reply (C{"BUSYGROUP"}, C{"NOGROUP"},
    C{"NOSCRIPT"}, C{"ERR"}, ...), or None when C{error} is not an error
    reply (a lost connection, a timeout, anything else).
    """
    if not isinstance(error, txredisapi.ResponseError):
        return None
    text = str(error.args[0]) if error.args else ""
    code = text.split(" ", 1)[0]
    return code if code.isupper() else None


# -------------------------------------------------------------- connections


def connect(
    address: RedisAddress,
    *,
    blocking: bool = False,
    poolsize: int = 1,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    scripts: Sequence[LuaScript] = (),
    endpoint: IStreamClientEndpoint | None = None,
) -> RedisHandler:
    """
    A lazy txredisapi handler (C{poolsize} connections) that reconnects by
    itself (backoff 0.2 s, x e, capped at 1 s, with jitter).

    Returned at once; commands wait until a connection is ready.  Replies keep
    strings as strings (C{convertNumbers=False}), text is UTF-8.  Ordinary
    handlers fail a command after L{DEFAULT_REPLY_TIMEOUT} seconds.
    C{blocking=True} makes a dedicated single connection without a reply
    timeout, for C{XREADGROUP}/C{XREAD ... BLOCK} (which this module sends
    with C{apply_timeout=False}); keep other commands off it.

    C{scripts} are loaded on every new connection before anything else is
    sent on it: after a Redis restart (which empties the script cache) calls
    keep the order they were made in, instead of the first ones failing with
    NOSCRIPT and being retried after later ones went through.

    When AUTH or SELECT fails the handler gives up for good: commands
    issued before that wait for ever (use a deadline), later ones fail with
    C{txredisapi.ConnectionError("Not connected")}.

    A C{sentinel} address needs C{endpoint}, a
    L{unrealon.engine.sentinel.MasterEndpoint}: every connection attempt
    goes to the master the Sentinels name at that time.

    Close it with C{yield handler.disconnect()}.
    """
    if poolsize < 1:
        raise ValueError("poolsize must be at least 1")
    if blocking and poolsize != 1:
        raise ValueError("a blocking handler is a single dedicated connection (poolsize=1)")
    options: dict[str, Any] = {
        "dbid": address.db,
        "poolsize": poolsize,
        "reconnect": True,
        "charset": "utf-8",
        "password": address.password,
        "username": address.username,
        "connectTimeout": connect_timeout,
        "replyTimeout": None if blocking else DEFAULT_REPLY_TIMEOUT,
        "convertNumbers": False,
    }
    if address.kind == "sentinel":
        if endpoint is None:
            raise ValueError("a Sentinel address needs its MasterEndpoint")
        factory = txredisapi.RedisFactory(
            address.display(), address.db, poolsize, isLazy=True, charset="utf-8",
            password=address.password, username=address.username,
            replyTimeout=options["replyTimeout"], convertNumbers=False,
        )
        factory.reconnect = True
        factory.startConnecting(endpoint)
        handler = factory.handler
    elif address.kind == "unix":
        handler = txredisapi.lazyUnixConnectionPool(address.path, **options)
    else:
        handler = txredisapi.lazyConnectionPool(address.host, address.port, **options)
    # Reconnect attempts at most RECONNECT_MAX_DELAY apart (jitter kept):
    # PROTOCOL.md section 1 asks a node to serve within 3 s of Redis answering
    # again; txredisapi's own backoff reaches 10 s.
    return compat_redis.lean_handler(
        handler, initial_delay=RECONNECT_INITIAL_DELAY, max_delay=RECONNECT_MAX_DELAY,
        preload=[script.source for script in scripts],
    )


def unavailable(failure: Any) -> Any:
    """
    An errback: Redis unreachable becomes L{BackendUnavailable} (callers
    answer -32011 or retry); error replies (a script's bug) stay as they are.
    """
    if failure.check(txredisapi.ConnectionError, ConnectionError):
        raise BackendUnavailable("Redis is unavailable") from None
    return failure


# ------------------------------------------------------------ reply values


@attrs.frozen
class StreamEntry:
    """
    One stream entry.  C{fields} is None for an entry that is still pending
    in a consumer group but was deleted from the stream (XDEL, trimming).
    Repeated field names keep the last value.
    """

    id: str
    fields: Mapping[str, str] | None

    @property
    def deleted(self) -> bool:
        return self.fields is None

    def ms(self) -> int:
        """The millisecond timestamp part of the id."""
        return int(self.id.partition("-")[0])


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """A stream id (C{"<ms>-<seq>"}) as a tuple that orders like the ids; ValueError if it is not one."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@attrs.frozen
class AutoClaim:
    """XAUTOCLAIM's answer: where to continue, what was claimed, what had been deleted."""

    next_id: str
    entries: list[StreamEntry]
    deleted_ids: list[str]


@attrs.frozen
class PendingSummary:
    count: int
    min_id: str | None
    max_id: str | None
    consumers: Mapping[str, int]


@attrs.frozen
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


@attrs.frozen
class GroupInfo:
    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    #: Redis >= 7.0; None when Redis cannot tell (or is older)
    entries_read: int | None
    lag: int | None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise UnexpectedReply(f"expected a string, got {type(value).__name__}")


def _int(value: Any) -> int:
    if isinstance(value, bool) or value is None:
        raise UnexpectedReply(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UnexpectedReply(f"expected an integer, got {value!r}") from None


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise UnexpectedReply(f"expected an array, got {type(value).__name__}")
    return value


def _pairs(flat: Any) -> dict[str, Any]:
    items = _list(flat)
    if len(items) % 2:
        raise UnexpectedReply("expected an even number of elements")
    return {_text(items[i]): items[i + 1] for i in range(0, len(items), 2)}


def _entry(raw: Any) -> StreamEntry:
    item = _list(raw)
    if len(item) != 2:
        raise UnexpectedReply("a stream entry must be [id, fields]")
    entry_id = _text(item[0])
    if item[1] is None:
        return StreamEntry(entry_id, None)
    return StreamEntry(entry_id, {k: _text(v) for k, v in _pairs(item[1]).items()})


def _entries(raw: Any) -> list[StreamEntry]:
    if raw is None:
        return []
    return [_entry(item) for item in _list(raw)]


def _streams(raw: Any) -> list[tuple[str, list[StreamEntry]]]:
    # nil (a BLOCK that timed out, or nothing to read) -> []
    if raw is None:
        return []
    result = []
    for item in _list(raw):
        pair = _list(item)
        if len(pair) != 2:
            raise UnexpectedReply("a stream reply must be [name, entries]")
        result.append((_text(pair[0]), _entries(pair[1])))
    return result


def _autoclaim(raw: Any) -> AutoClaim:
    reply = _list(raw)
    if len(reply) not in (2, 3):
        raise UnexpectedReply("XAUTOCLAIM must answer [next, entries(, deleted)]")
    # Redis 6.2 lists deleted entries among the claimed ones with nil fields;
    # Redis 7 drops them from the PEL and lists their ids separately.
    claimed = _entries(reply[1])
    entries = [e for e in claimed if not e.deleted]
    deleted = [e.id for e in claimed if e.deleted]
    if len(reply) == 3 and reply[2] is not None:
        deleted += [_text(i) for i in _list(reply[2])]
    return AutoClaim(_text(reply[0]), entries, deleted)


def _pending_summary(raw: Any) -> PendingSummary:
    reply = _list(raw)
    if len(reply) != 4:
        raise UnexpectedReply("XPENDING must answer [count, min, max, consumers]")
    consumers: dict[str, int] = {}
    for item in _list(reply[3]) if reply[3] is not None else []:
        name, count = _list(item)
        consumers[_text(name)] = _int(count)
    return PendingSummary(
        count=_int(reply[0]),
        min_id=None if reply[1] is None else _text(reply[1]),
        max_id=None if reply[2] is None else _text(reply[2]),
        consumers=consumers,
    )


def _pending_range(raw: Any) -> list[PendingEntry]:
    result = []
    for item in _list(raw) if raw is not None else []:
        fields = _list(item)
        if len(fields) != 4:
            raise UnexpectedReply("XPENDING entries must be [id, consumer, idle, deliveries]")
        result.append(
            PendingEntry(
                id=_text(fields[0]),
                consumer=_text(fields[1]),
                idle_ms=_int(fields[2]),
                deliveries=_int(fields[3]),
            )
        )
    return result


def _group_infos(raw: Any) -> list[GroupInfo]:
    result = []
    for item in _list(raw):
        info = _pairs(item)
        try:
            result.append(
                GroupInfo(
                    name=_text(info["name"]),
                    consumers=_int(info["consumers"]),
                    pending=_int(info["pending"]),
                    last_delivered_id=_text(info["last-delivered-id"]),
                    entries_read=_optional_int(info.get("entries-read")),
                    lag=_optional_int(info.get("lag")),
                )
            )
        except KeyError as e:
            raise UnexpectedReply(f"XINFO GROUPS lacks {e.args[0]!r}") from None
    return result


# ---------------------------------------------------------------- streams


class StreamClient:
    """Typed stream/Lua commands over one txredisapi handler."""

    def __init__(self, redis: RedisHandler) -> None:
        self.redis = redis

    def _execute(self, *args: object, apply_timeout: bool = True) -> Deferred[Any]:
        d: Deferred[Any] = self.redis.execute_command(*args, apply_timeout=apply_timeout)
        return d

    def xadd(
        self,
        stream: str,
        fields: Mapping[str, str | bytes],
        *,
        maxlen: int | None = None,
        approximate: bool = True,
        id: str = "*",
    ) -> Deferred[str]:
        """XADD; fires with the new entry's id."""
        if not fields:
            raise ValueError("a stream entry needs at least one field")
        args: list[object] = ["XADD", stream]
        if maxlen is not None:
            args += ["MAXLEN", "~" if approximate else "=", maxlen]
        args.append(id)
        for name, value in fields.items():
            args += [name, value]
        return self._execute(*args).addCallback(_text)

    def xgroup_create(
        self, stream: str, group: str, start_id: str = "0", mkstream: bool = True
    ) -> Deferred[bool]:
        """XGROUP CREATE; True when created, False when the group already existed."""
        args: list[object] = ["XGROUP", "CREATE", stream, group, start_id]
        if mkstream:
            args.append("MKSTREAM")
        return Deferred.fromCoroutine(self._xgroup_create(args))

    async def _xgroup_create(self, args: list[object]) -> bool:
        try:
            await self._execute(*args)
        except txredisapi.ResponseError as e:
            if redis_error_code(e) == "BUSYGROUP":
                return False
            raise
        return True

    def xreadgroup(
        self,
        group: str,
        consumer: str,
        streams: Mapping[str, str],
        *,
        count: int,
        block_ms: int | None,
    ) -> Deferred[list[tuple[str, list[StreamEntry]]]]:
        """
        XREADGROUP; C{streams} maps stream -> id (C{">"} for new entries, C{"0"}
        for this consumer's pending ones).  Fires with [] when a BLOCK timed out.
        """
        args: list[object] = ["XREADGROUP", "GROUP", group, consumer]
        return self._read(args, streams, count, block_ms)

    def xread(
        self, streams: Mapping[str, str], *, count: int, block_ms: int | None
    ) -> Deferred[list[tuple[str, list[StreamEntry]]]]:
        """XREAD; C{streams} maps stream -> last id seen (C{"$"}: only new ones)."""
        return self._read(["XREAD"], streams, count, block_ms)

    def _read(
        self,
        args: list[object],
        streams: Mapping[str, str],
        count: int,
        block_ms: int | None,
    ) -> Deferred[list[tuple[str, list[StreamEntry]]]]:
        if not streams:
            raise ValueError("nothing to read: no streams given")
        args += ["COUNT", count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", *streams.keys(), *streams.values()]
        d = self._execute(*args, apply_timeout=block_ms is None)
        return d.addCallback(_streams)

    def xack(self, stream: str, group: str, *ids: str) -> Deferred[int]:
        """XACK; fires with how many entries were acknowledged."""
        if not ids:
            raise ValueError("nothing to acknowledge")
        return self._execute("XACK", stream, group, *ids).addCallback(_int)

    def xdel(self, stream: str, *ids: str) -> Deferred[int]:
        """XDEL; fires with how many entries were deleted."""
        if not ids:
            raise ValueError("nothing to delete")
        return self._execute("XDEL", stream, *ids).addCallback(_int)

    def xautoclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        min_idle_ms: int,
        start: str = "0-0",
        count: int = 100,
    ) -> Deferred[AutoClaim]:
        """XAUTOCLAIM entries idle for at least C{min_idle_ms} to C{consumer}."""
        d = self._execute("XAUTOCLAIM", stream, group, consumer, min_idle_ms, start, "COUNT", count)
        return d.addCallback(_autoclaim)

    def xpending_summary(self, stream: str, group: str) -> Deferred[PendingSummary]:
        return self._execute("XPENDING", stream, group).addCallback(_pending_summary)

    def xpending_range(
        self,
        stream: str,
        group: str,
        start: str = "-",
        end: str = "+",
        count: int = 100,
        consumer: str | None = None,
        idle_ms: int | None = None,
    ) -> Deferred[list[PendingEntry]]:
        args: list[object] = ["XPENDING", stream, group]
        if idle_ms is not None:
            args += ["IDLE", idle_ms]
        args += [start, end, count]
        if consumer is not None:
            args.append(consumer)
        return self._execute(*args).addCallback(_pending_range)

    def xrange(
        self, stream: str, start: str = "-", end: str = "+", count: int | None = None
    ) -> Deferred[list[StreamEntry]]:
        args: list[object] = ["XRANGE", stream, start, end]
        if count is not None:
            args += ["COUNT", count]
        return self._execute(*args).addCallback(_entries)

    def xrevrange(
        self, stream: str, end: str = "+", start: str = "-", count: int | None = None
    ) -> Deferred[list[StreamEntry]]:
        """XREVRANGE (newest first); note Redis's argument order: end, then start."""
        args: list[object] = ["XREVRANGE", stream, end, start]
        if count is not None:
            args += ["COUNT", count]
        return self._execute(*args).addCallback(_entries)

    def xlen(self, stream: str) -> Deferred[int]:
        return self._execute("XLEN", stream).addCallback(_int)

    def xinfo_groups(self, stream: str) -> Deferred[list[GroupInfo]]:
        return self._execute("XINFO", "GROUPS", stream).addCallback(_group_infos)

    def client_id(self) -> Deferred[int | None]:
        """
        This connection's CLIENT ID, so a blocking read on it can be ended
        with CLIENT UNBLOCK; None where the server refuses CLIENT (ACLs).
        """

        def refused(failure: Failure) -> None:
            failure.trap(txredisapi.ResponseError)
            return None

        return self._execute("CLIENT", "ID").addCallbacks(int, refused)

    def ping(self, timeout: float, clock: IReactorTime) -> Deferred[float]:
        """
        PING with a deadline of its own: fires with the round trip in
        milliseconds, or fails with C{twisted.internet.defer.TimeoutError}
        after C{timeout} seconds (txredisapi alone would wait for ever while
        no connection exists).
        """
        started = clock.seconds()

        def done(reply: Any) -> float:
            if reply != "PONG":
                raise UnexpectedReply(f"PING answered {reply!r}")
            return (clock.seconds() - started) * 1000.0

        d = self._execute("PING")
        d.addTimeout(timeout, clock)
        return d.addCallback(done)


# -------------------------------------------------------------------- Lua


class LuaScript:
    """
    A script loaded once with SCRIPT LOAD, run with EVALSHA, re-loaded
    transparently on NOSCRIPT (Redis restarts and SCRIPT FLUSH drop scripts).

    The SHA1 is computed locally, so a call is a single EVALSHA while the
    server knows the script; the first call on a server that does not costs
    EVALSHA (NOSCRIPT) + SCRIPT LOAD + EVALSHA.  L{load} loads it up
    front (e.g. at startup, to find a broken script early).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"<LuaScript {self.sha[:12]}>"

    def load(self, redis: RedisHandler) -> Deferred[str]:
        """SCRIPT LOAD; fires with the SHA1."""

        def check(sha: Any) -> str:
            if _text(sha) != self.sha:
                raise UnexpectedReply("SCRIPT LOAD answered an unexpected SHA1")
            return self.sha

        d: Deferred[Any] = redis.execute_command("SCRIPT", "LOAD", self.source)
        return d.addCallback(check)

    def __call__(
        self,
        redis: RedisHandler,
        keys: Sequence[str],
        args: Sequence[str | bytes | int],
    ) -> Deferred[Any]:
        """Run the script; fires with its reply (strings as C{str}, integers as C{int})."""
        # an errback, not a coroutine: this is on the path of every publish
        # and backend call, and a coroutine's Deferred costs more than the rest
        keys, args = list(keys), list(args)
        d = self._evalsha(redis, keys, args)
        return d.addErrback(self._load_and_retry, redis, keys, args)

    def _load_and_retry(
        self, failure: Failure, redis: RedisHandler, keys: list[str], args: list[Any]
    ) -> Any:
        """NOSCRIPT (Redis restarted, or SCRIPT FLUSH): load it and run it again."""
        error = failure.value
        if not isinstance(error, txredisapi.ResponseError) or redis_error_code(
                error) != "NOSCRIPT":
            return failure
        d = self.load(redis)
        return d.addCallback(lambda _: self._evalsha(redis, keys, args))

    def _evalsha(self, redis: RedisHandler, keys: list[str], args: list[Any]) -> Deferred[Any]:
        d: Deferred[Any] = redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        return d


#: KEYS[1] = reply list, ARGV[1] = payload, ARGV[2] = TTL in seconds.
#: LPUSH and EXPIRE in one step, so a reply list never outlives its TTL.
REPLY_SCRIPT = LuaScript(
    """\
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
)


def push_reply(
    redis: RedisHandler, reply_to: str, payload: bytes | str, ttl: int = 60
) -> Deferred[None]:
    """LPUSH C{payload} onto the list C{reply_to} and (re)set its TTL, atomically."""
    if ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    d = REPLY_SCRIPT(redis, [reply_to], [payload, ttl])
    return d.addCallback(lambda _: None)
