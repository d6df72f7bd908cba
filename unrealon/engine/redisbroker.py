"""
The Redis broker: room history, idempotent publishing, and the cluster feed.

Publishing is one script (L{scripts.PUBLISH}) that appends the event to the
room's history stream and to the cluster feed, and records the idempotency
key, so an event is fully published or not at all.  Every node reads the
feed (XREAD BLOCK on a connection of its own) from the last id it saw, and
hands each entry to its hub: events, presence notifications and disconnect
orders all travel this one ordered stream, so all nodes see one order.

A node that loses Redis for a moment resumes from its last id and misses
nothing.  If it cannot -- the feed was trimmed past its position, or Redis
came back empty -- it tells the hub to make every client recover (the
clients rejoin with their cursors and get the replay or C{recovered: false});
it never loses events silently.

Why a stream rather than Pub/Sub for the fan-out (ARCHITECTURE.md allows
either): a stream keeps a position, so a reconnecting node knows exactly what
it missed and can prove it missed nothing; Pub/Sub would need a separate
position check to detect loss.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from unrealon.engine import scripts
from unrealon.engine.interfaces import (
    BackendUnavailable,
    EphemeralEvent,
    IBroker,
    IDeliverySink,
    Recovery,
    RoomEvent,
)
from unrealon.engine.redisclient import RedisHandler, StreamClient, StreamEntry

log = Logger(namespace="unrealon.engine.redisbroker")

PREFIX = "unrealon:"
FEED = PREFIX + "feed"
#: entries kept in the feed: minutes of traffic, so a node that loses Redis
#: for a moment finds its position still there
FEED_MAXLEN = 100_000
#: how long an ingress entry's publication is remembered (crash before ack)
IDEMPOTENCY_TTL = 86_400
#: the feed read blocks at most this long, so stopping is prompt
READ_BLOCK_MS = 1000
READ_COUNT = 1000

#: Redis unreachable (txredisapi's TimeoutError is one of its ConnectionErrors);
#: error replies (script bugs) are not this and stay loud
_REDIS_ERRORS = (txredisapi.ConnectionError, ConnectionError)


def history_key(room: str) -> str:
    return f"{PREFIX}h:{room}"


def epoch_key(room: str) -> str:
    return f"{PREFIX}e:{room}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def split_notification(event: str, room: str, data: Mapping[str, Any]) -> tuple[str, str]:
    """
    The event's notification as the text before and after its cursor, which
    only the publish script knows.  Joined, it is exactly what
    L{unrealon.jsonrpc.encode} would make of the notification.
    """
    head = f'{{"jsonrpc":"2.0","method":{_json(event)},"params":{{"room":{_json(room)},"cursor":"'
    tail = f'","data":{_json(data)}}}}}'
    return head, tail


def parse_cursor(cursor: str) -> tuple[str, int, int] | None:
    epoch, sep, stream_id = cursor.partition(":")
    ms, dash, seq = stream_id.partition("-")
    if not (sep and dash and epoch and ms.isdigit() and seq.isdigit()):
        return None
    if len(ms) > 16 or len(seq) > 19:
        return None
    return epoch, int(ms), int(seq)


@implementer(IBroker)
class RedisBroker:
    """Publish to rooms and receive the cluster's events through Redis."""

    def __init__(
        self,
        reactor: IReactorTime,
        sink: IDeliverySink,
        redis: RedisHandler,
        reader: RedisHandler,
        *,
        history_size: int,
        history_ttl: float,
    ) -> None:
        """
        @param redis: the handler for ordinary commands (one connection, so
            publishes reach Redis in the order they were made).
        @param reader: a dedicated connection for the blocking feed read.
        """
        self.sink = sink
        self._reactor = reactor
        self._redis = redis
        self._streams = StreamClient(redis)
        self._reader = StreamClient(reader)
        self._size = history_size
        self._ttl = max(1, int(history_ttl))
        self._last_id = "0-0"
        self._running = False
        self._loop: Deferred[None] | None = None
        #: False while the feed cannot be read (for /health)
        self.feed_ok = False

    def stopped(self) -> bool:
        # a method, not the attribute: mypy would narrow the attribute in loops
        return not self._running

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._running = True
        self._last_id = await self._feed_position()
        self.feed_ok = True
        self._loop = Deferred.fromCoroutine(self._read_feed())

    def stop(self) -> Deferred[None]:
        self._running = False
        loop = self._loop
        if loop is None:
            return succeed(None)
        # the read in flight ends within READ_BLOCK_MS; don't cancel it
        # (a cancelled XREAD could drop entries already sent to us)
        loop.addTimeout(READ_BLOCK_MS / 1000 + 2, self._reactor)
        loop.addErrback(lambda _: None)
        return loop

    async def _feed_position(self) -> str:
        last = await self._streams.xrevrange(FEED, count=1)
        return last[0].id if last else "0-0"

    async def _read_feed(self) -> None:
        delay = 0.1
        while self._running:
            try:
                batches = await self._reader.xread(
                    {FEED: self._last_id}, count=READ_COUNT, block_ms=READ_BLOCK_MS
                )
            except (*_REDIS_ERRORS, txredisapi.ResponseError) as e:
                if self.stopped():
                    return
                self.feed_ok = False
                log.warn("cluster feed read failed ({error}); retrying", error=type(e).__name__)
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 2.0)
                await self._check_continuity()
                continue
            delay = 0.1
            self.feed_ok = True
            for _, entries in batches:
                for entry in entries:
                    self._last_id = entry.id
                    self._dispatch(entry)

    async def _check_continuity(self) -> None:
        """
        After an outage: is our position still in the feed?  If entries after
        it are gone, or Redis lost the feed, clients must recover.
        """
        try:
            info = await self._streams.redis.execute_command("XINFO", "STREAM", FEED)
        except txredisapi.ResponseError:
            info = None  # no feed at all: Redis lost its data
        except _REDIS_ERRORS:
            return  # still down; the next read will tell
        fields = dict(zip(info[::2], info[1::2], strict=False)) if info else {}
        last = str(fields.get("last-generated-id", "0-0"))
        deleted = str(fields.get("max-deleted-entry-id", "0-0"))
        if _id_key(last) < _id_key(self._last_id) or _id_key(deleted) > _id_key(self._last_id):
            log.warn(
                "cluster feed lost entries after {position}; making clients recover",
                position=self._last_id,
            )
            self._last_id = last
            self.sink.resync(None)

    def _dispatch(self, entry: StreamEntry) -> None:
        fields = entry.fields
        if fields is None:
            return
        kind = fields.get("k")
        try:
            if kind == "e":
                self.sink.deliver(
                    RoomEvent(room=fields["r"], cursor=fields["c"], message=fields["m"].encode())
                )
            elif kind == "p":
                self.sink.deliver_ephemeral(
                    EphemeralEvent(
                        room=fields["r"],
                        message=fields["m"].encode(),
                        exclude_user=fields.get("x") or None,
                    )
                )
            elif kind == "d":
                self.sink.disconnect_user(fields["u"], fields.get("m", ""))
        except KeyError:
            log.warn("malformed cluster feed entry {id}", id=entry.id)
        except Exception:
            log.failure("delivering cluster feed entry {id} failed", id=entry.id)

    # -- IBroker -----------------------------------------------------------------

    def publish(
        self,
        room: str,
        event: str,
        data: Mapping[str, Any],
        idempotency_key: str | None = None,
    ) -> Deferred[str]:
        head, tail = split_notification(event, room, data)
        keys = [
            history_key(room),
            epoch_key(room),
            FEED,
            f"{PREFIX}idem:{idempotency_key}" if idempotency_key else "",
        ]
        args: list[str | bytes | int] = [
            head, tail, self._size, self._ttl, FEED_MAXLEN, IDEMPOTENCY_TTL, room,
        ]
        d = scripts.PUBLISH(self._redis, keys, args)
        return d.addCallbacks(str, _unavailable)

    def recover(self, room: str, since: str | None) -> Deferred[Recovery]:
        parsed = parse_cursor(since) if since is not None else None
        if since is None:
            args: list[Any] = ["", "0-0"]
        elif parsed is None:
            args = ["-", "0-0"]  # no epoch matches "-": recovered false
        else:
            args = [parsed[0], f"{parsed[1]}-{parsed[2]}"]
        d = scripts.RECOVER(
            self._redis, [history_key(room), epoch_key(room)], [*args, self._size, self._ttl]
        )

        def done(reply: list[Any]) -> Recovery:
            epoch, last, recovered, missed = reply
            return Recovery(
                cursor=f"{epoch}:{last}",
                recovered=bool(int(recovered)),
                missed=tuple(json.loads(m) for m in missed or ()),
            )

        return d.addCallbacks(done, _unavailable)

    def cursor_key(self, cursor: str) -> tuple[Any, ...] | None:
        return parse_cursor(cursor)

    def publish_ephemeral(self, event: EphemeralEvent) -> Deferred[None]:
        args: list[str | bytes | int] = [
            FEED_MAXLEN, "k", "p", "r", event.room, "m", event.message,
            "x", event.exclude_user or "",
        ]
        d = scripts.FEED(self._redis, [FEED], args)
        return d.addCallbacks(lambda _: None, _unavailable)

    def disconnect_user(self, user_id: str, reason: str) -> Deferred[None]:
        d = scripts.FEED(self._redis, [FEED], [FEED_MAXLEN, "k", "d", "u", user_id, "m", reason])
        return d.addCallbacks(lambda _: None, _unavailable)

    def healthy(self) -> Deferred[Mapping[str, Any] | None]:
        d = self._streams.ping(1.0, self._reactor)

        def up(latency: float) -> Mapping[str, Any]:
            return {"ok": self.feed_ok, "latency_ms": round(latency, 3)}

        return d.addCallbacks(up, lambda _: {"ok": False, "latency_ms": None})


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def _unavailable(failure: Any) -> Any:
    if failure.check(*_REDIS_ERRORS):
        raise BackendUnavailable("Redis is unavailable") from None
    return failure
