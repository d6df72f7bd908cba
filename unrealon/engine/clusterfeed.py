"""
The cluster feed: orders every node must act on, in one ordered stream.

Room events and presence go only to the nodes with members in the room
(L{unrealon.engine.roomchannels}); a C{connections.disconnect} order is for
every node (the user's connections may be anywhere), so it goes on the feed,
a stream every node reads (XREAD BLOCK on a connection of its own) from the
last id it saw.  A node that loses Redis for a moment resumes from its last
id.  If it cannot -- the feed was trimmed past its position, went back, or
Redis came back empty (the feed's epoch key changed: ids alone cannot show
it once another node has written into the new feed) -- orders may have been
lost, and it makes every client recover; it never loses one silently.
Continuity is proven after every failed read, before the next one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from unrealon.engine import scripts
from unrealon.engine.interfaces import IDeliverySink
from unrealon.engine.redisclient import (
    RedisHandler,
    StreamClient,
    StreamEntry,
    stream_id_key,
    unavailable,
)
from unrealon.engine.rediskeys import FEED, FEED_EPOCH, FEED_MAXLEN
from unrealon.engine.supervision import RedisLink, SupervisedReader

log = Logger(namespace="unrealon.engine.clusterfeed")

#: the feed read blocks at most this long, so stopping is prompt
READ_BLOCK_MS = 1000
READ_COUNT = 1000


class ClusterFeed:
    """Disconnect orders: written by any node, read by every node."""

    def __init__(
        self,
        reactor: IReactorTime,
        sink: IDeliverySink,
        redis: RedisHandler,
        reader: RedisHandler,
        *,
        link: RedisLink | None = None,
        count_failure: Callable[[str], None] = lambda loop: None,
    ) -> None:
        """
        @param redis: the handler for ordinary commands.
        @param reader: a dedicated connection for the blocking read.
        """
        self.sink = sink
        self._reactor = reactor
        self._redis = redis
        self._streams = StreamClient(redis)
        self._reader = StreamClient(reader)
        self._last_id = "0-0"
        #: the feed's epoch when this node last proved continuity
        self._feed_epoch = ""
        #: False until the first read's position is known (the feed's end)
        self._positioned = False
        #: the reader connection's CLIENT ID, so stop() can end its BLOCK
        self._reader_id: int | None = None
        self.reader = SupervisedReader(
            "cluster feed reader", reactor, self._read_once, self._prepare,
            link=link, count_failure=count_failure,
        )

    def start(self) -> Deferred[None]:
        """Start reading; fires once the feed's position is known (Redis answered)."""
        self.reader.start()
        return self.reader.prepared()

    def stop(self) -> Deferred[None]:
        stopping = self.reader.stop()
        # End the read in flight now (CLIENT UNBLOCK: it returns as if its
        # BLOCK timed out); else it ends within READ_BLOCK_MS.  Don't cancel
        # it: a cancelled XREAD could drop entries already sent to us.
        if self._reader_id is not None and not stopping.called:
            unblock = self._redis.execute_command("CLIENT", "UNBLOCK", self._reader_id)
            unblock.addTimeout(1.0, self._reactor)
            unblock.addErrback(
                lambda f: log.info("CLIENT UNBLOCK failed ({error}); waiting for the read",
                                   error=f.getErrorMessage())
            )
        stopping.addTimeout(READ_BLOCK_MS / 1000 + 2, self._reactor)
        stopping.addErrback(
            lambda f: log.warn("the feed read did not end in time ({error})",
                               error=f.getErrorMessage())
        )
        return stopping

    def disconnect_user(self, user_id: str, reason: str) -> Deferred[None]:
        """Append an order to close C{user_id}'s connections on every node."""
        d = scripts.FEED(self._redis, [FEED], [FEED_MAXLEN, "d", f"{user_id}\n{reason}"])
        return d.addCallbacks(lambda _: None, unavailable)

    async def _reader_client_id(self) -> int | None:
        client_id = await self._reader.client_id()
        if client_id is None:
            log.info("CLIENT ID refused (ACLs?): stopping waits for the feed read's BLOCK")
        return client_id

    async def _feed_position(self) -> str:
        last = await self._streams.xrevrange(FEED, count=1)
        return last[0].id if last else "0-0"

    async def _current_feed_epoch(self) -> str:
        epoch = await scripts.FEED_EPOCH(self._redis, [FEED_EPOCH], [secrets.token_hex(8)])
        return str(epoch)

    async def _prepare(self) -> None:
        """
        Before the first read: start at the feed's end.  Before reading
        again after an error: prove nothing was lost in between (or make
        the clients recover).
        """
        if not self._positioned:
            self._feed_epoch = await self._current_feed_epoch()
            self._last_id = await self._feed_position()
            self._positioned = True
        else:
            await self._check_continuity()
        self._reader_id = await self._reader_client_id()

    async def _read_once(self) -> None:
        batches = await self._reader.xread(
            {FEED: self._last_id}, count=READ_COUNT, block_ms=READ_BLOCK_MS
        )
        for _, entries in batches:
            for entry in entries:
                self._last_id = entry.id
                self._dispatch(entry)

    async def _check_continuity(self) -> None:
        """
        After a failed read: is our position still in the feed?  If Redis
        lost its data (the feed's epoch changed), the feed went back, or
        entries after our position were removed, clients must recover.
        Raises while Redis cannot answer (the supervisor retries the check).
        """
        epoch = await self._current_feed_epoch()
        try:
            info = await self._streams.redis.execute_command("XINFO", "STREAM", FEED)
        except txredisapi.ResponseError:
            info = None  # no feed (yet): nothing was published since Redis lost it
        fields = dict(zip(info[::2], info[1::2], strict=False)) if info else {}
        last = str(fields.get("last-generated-id", "0-0"))
        first = str(fields.get("recorded-first-entry-id", "0-0"))
        deleted = str(fields.get("max-deleted-entry-id", "0-0"))
        position = stream_id_key(self._last_id)
        lost = (
            epoch != self._feed_epoch
            or stream_id_key(last) < position
            or stream_id_key(deleted) > position
            # trimmed past our position (trimming does not move max-deleted)
            or (info is not None and stream_id_key(first) > position and stream_id_key(first) != (0, 0))
        )
        if lost:
            log.warn(
                "cluster feed lost entries after {position}; making clients recover",
                position=self._last_id,
            )
            self._feed_epoch = epoch
            self._last_id = last
            self.sink.resync(None)

    def _dispatch(self, entry: StreamEntry) -> None:
        """
        Act on one feed entry.  An entry has one field whose name is its
        kind and whose value packs the rest, newline-separated: C{d}: user,
        reason -- C{connections.disconnect}.  (One field rather than one per
        part because txredisapi parses every bulk string of a reply in a
        reactor turn of its own.)
        """
        try:
            value = (entry.fields or {}).get("d")
            if value is None:
                log.warn("unknown cluster feed entry {id}", id=entry.id)
                return
            user, _, reason = value.partition("\n")
            self.sink.disconnect_user(user, reason)
        except Exception:
            log.failure("acting on cluster feed entry {id} failed", id=entry.id)
