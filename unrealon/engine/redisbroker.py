"""
The Redis broker: room history, idempotent publishing, and delivery to nodes.

Publishing is one script (L{scripts.PUBLISH}) that appends the event to the
room's history stream, publishes it on the room's channel with the history
id it follows, and records the idempotency key, so an event is fully
published or not at all.  Only nodes with members in the room hear it
(L{unrealon.engine.roomchannels}: interest routing, with positions and gap
repair from the history).

Disconnect orders (C{connections.disconnect}) are for every node: they go on
the cluster feed (L{unrealon.engine.clusterfeed}).  Streamed messages' chunks
are ordered by L{messagescripts.CHUNK}; history reads for joins are batched
per reactor turn (L{unrealon.engine.recoveries}).

With rooms sharded over several Redis instances (L{unrealon.engine.roomshards})
each shard has its own history reads, room channels and release loop, and
every per-room command goes to the room's shard; the feed stays on the first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from unrealon import jsoncodec
from unrealon.engine import messagescripts, rediskeys, scripts
from unrealon.engine.clusterfeed import ClusterFeed
from unrealon.engine.interfaces import (
    CHUNK_FIELDS,
    EphemeralEvent,
    IBroker,
    IDeliverySink,
    MessageChunk,
    Recovery,
)
from unrealon.engine.pubsub import SubscriberConnection
from unrealon.engine.redisclient import RedisHandler, StreamClient, unavailable
from unrealon.engine.rediskeys import (
    IDEMPOTENCY_TTL,
    epoch_key,
    history_key,
    message_keys,
    room_channel,
    streaming_key,
)
from unrealon.engine.roomchannels import Repair
from unrealon.engine.roomshards import RoomShard, ShardConnections, ShardedRooms
from unrealon.engine.supervision import ISupervised, RedisLink

log = Logger(namespace="unrealon.engine.redisbroker")

#: how often a node looks for streamed messages whose held chunks are due:
#: PROTOCOL.md section 5.1 reports a gap within a second after the wait
RELEASE_INTERVAL = 0.25
#: messages released per look (the rest at the next one)
RELEASE_BATCH = 100
#: streamed messages whose encoded fields a node keeps (the oldest goes first)
PREFIX_CACHE = 1024


def split_notification(event: str, room: str, data: Mapping[str, Any]) -> tuple[str, str]:
    """
    The event's notification as the text before and after its cursor, which
    only the publish script knows.  Joined, it is exactly what
    L{unrealon.jsonrpc.encode} would make of the notification.
    """
    head = f'{{"jsonrpc":"2.0","method":{jsoncodec.text(event)},"params":{{"room":{jsoncodec.text(room)},"cursor":"'
    tail = f'","data":{jsoncodec.text(data)}}}}}'
    return head, tail


def replayed(text: str | bytes, streamed: bool) -> Any:
    """
    An event of a room's history as L{scripts.RECOVER} read it, for a join's
    reply: the stored text itself (L{jsoncodec.RawJSON}: a reply copies it,
    which saves decoding it and encoding it again) where it is what the
    server's codec makes of the event, else its value.

    A published event's text is: L{split_notification}'s head and tail
    around its cursor.  A streamed message's event (C{streamed}) is spliced
    by the script from that head, the message's fields as the codec wrote
    them, numbers and the content and error as cjson wrote them; cjson
    escapes everything the codec escapes in a string, and more (C{"/"} as
    C{"\\/"}), so the text is the codec's where it has no backslash at all.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if streamed and "\\" in text:
        return jsoncodec.decode(text)
    return jsoncodec.RawJSON(text)


def parse_cursor(cursor: str) -> tuple[str, int, int] | None:
    epoch, sep, stream_id = cursor.partition(":")
    ms, dash, seq = stream_id.partition("-")
    # isascii: str.isdigit() also accepts digits int() refuses ("²")
    if not (sep and dash and epoch and stream_id.isascii() and ms.isdigit() and seq.isdigit()):
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
        gap_wait: float = 2.0,
        subscriber: SubscriberConnection,
        channel_prefix: str,
        link: RedisLink | None = None,
        count_failure: Callable[[str], None] = lambda loop: None,
        count_chunk: Callable[[str], None] = lambda outcome: None,
        room_grace: float | None = None,
        shards: Sequence[ShardConnections] = (),
    ) -> None:
        """
        @param redis: the handler for ordinary commands (one connection, so
            publishes reach Redis in the order they were made).
        @param reader: a dedicated connection for the blocking feed read.
        @param subscriber: the connection the rooms' channels are heard on.
        @param channel_prefix: L{rediskeys.room_channel_prefix} of the database.
        @param link: where Redis outages are reported (and logged).
        @param shards: further Redis instances the rooms are sharded over
            (C{redis} is the first, L{unrealon.engine.roomshards}).
        """
        self.sink = sink
        self._reactor = reactor
        self._streams = StreamClient(redis)
        self._size = history_size
        self._ttl = max(1, int(history_ttl))
        self._gap_wait_ms = max(1, int(gap_wait * 1000))
        self._count_chunk = count_chunk
        self.rooms = ShardedRooms(
            reactor, sink, [ShardConnections(redis, subscriber, channel_prefix, link), *shards],
            history_size=history_size, history_ttl=self._ttl, repair=self._repair_read,
            position_of=self._position_of, release=self._release_due,
            release_interval=RELEASE_INTERVAL, count_failure=count_failure,
            room_grace=room_grace,
        )
        #: the first Redis' room channels (with shards, also every room's presence)
        self.channels = self.rooms.first.channels
        #: (room, event, message id) -> (fields, head, meta) of recent streamed messages
        self._prefixes: dict[tuple[str, str, str], tuple[dict[str, Any], str, str]] = {}
        #: disconnect orders, for every node
        self.feed = ClusterFeed(reactor, sink, redis, reader, link=link,
                                count_failure=count_failure)
        self.reader = self.feed.reader

    @property
    def loops(self) -> tuple[ISupervised, ...]:
        """What /health watches: the feed, and each shard's channels and release loop."""
        return (self.reader, *self.rooms.loops)

    @property
    def feed_ok(self) -> bool:
        """Whether the feed is being read (for /health)."""
        return self.feed.reader.working()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Start reading the feed; fires once the feed's position is known
        (which waits for Redis: a node starts serving without it).
        """
        self.rooms.start()
        return self.feed.start()

    def stop(self) -> Deferred[None]:
        rooms = self.rooms.stop()
        return self.feed.stop().addCallback(lambda _: rooms)

    # -- IBroker -----------------------------------------------------------------

    def publish(
        self, room: str, event: str, data: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Deferred[str]:
        head, tail = split_notification(event, room, data)
        keys = [
            history_key(room),
            epoch_key(room),
            rediskeys.idempotency_key(idempotency_key) if idempotency_key else "",
        ]
        shard = self.rooms.of(room)
        args: list[str | bytes | int] = [
            head, tail, self._size, self._ttl, room_channel(shard.prefix, room), IDEMPOTENCY_TTL,
        ]
        d = scripts.PUBLISH(shard.commands, keys, args)
        return d.addCallbacks(str, unavailable)

    def append_chunk(self, room: str, event: str, chunk: MessageChunk) -> Deferred[str]:
        head, meta = self._message_prefix(room, event, chunk)
        error = "" if chunk.error is None else "e" + chunk.error
        d = self._chunk(room, chunk.message_id, [
            chunk.seq, chunk.content, "1" if chunk.done else "0", error, head, meta,
        ])
        return d.addCallback(lambda outcome: outcome[0])

    def _message_prefix(self, room: str, event: str, chunk: MessageChunk) -> tuple[str, str]:
        """
        The notification head and the message's fields as JSON (without the
        closing brace) that the script stores from a message's first chunk.
        Every chunk sends them (the node cannot know which chunk is first);
        they are encoded once per message, while its chunks repeat them.
        """
        fields = {k: v for k, v in chunk.fields.items() if k not in CHUNK_FIELDS}
        key = (room, event, chunk.message_id)
        known = self._prefixes.get(key)
        if known is not None and known[0] == fields:
            return known[1], known[2]
        head, _ = split_notification(event, room, {})
        meta = jsoncodec.text(fields)[:-1]
        if len(self._prefixes) >= PREFIX_CACHE:
            del self._prefixes[next(iter(self._prefixes))]
        self._prefixes[key] = (fields, head, meta)
        return head, meta

    def _chunk(
        self, room: str, message_id: str, args: list[str | bytes | int]
    ) -> Deferred[tuple[str, str]]:
        """Run L{messagescripts.CHUNK}; fires with (the room's cursor, the outcome)."""
        keys = [
            history_key(room), epoch_key(room), *message_keys(room, message_id),
            rediskeys.MESSAGES_HELD, streaming_key(room),
        ]
        shard = self.rooms.of(room)
        d = messagescripts.CHUNK(shard.commands, keys, [
            room, message_id, *args, self._size, self._ttl,
            room_channel(shard.prefix, room), self._gap_wait_ms,
        ])
        def counted(reply: list[Any]) -> tuple[str, str]:
            cursor, outcome = str(reply[0]), str(reply[1])
            if outcome != "none":
                self._count_chunk(outcome)
            return cursor, outcome

        return d.addCallbacks(counted, unavailable)

    async def release_due(self) -> None:
        """Deliver the held chunks of messages whose gap wait is over (section 5.1)."""
        for shard in self.rooms.shards:
            await self._release_due(shard)

    async def _release_due(self, shard: RoomShard) -> None:
        due = await messagescripts.HELD_DUE(
            shard.commands, [rediskeys.MESSAGES_HELD], [RELEASE_BATCH]
        )
        for member in due or ():
            room, _, message_id = str(member).partition("\n")
            _, outcome = await self._chunk(room, message_id, [-1, "", "0", "", "", ""])
            if outcome == "released":
                log.info("released the held chunks of message {message_id} in {room} "
                         "after the gap wait (the missing ones are reported in gaps)",
                         message_id=message_id, room=room)

    def watch(self, room: str) -> Deferred[None]:
        return self.rooms.watch(room)

    def unwatch(self, room: str) -> None:
        self.rooms.unwatch(room)

    def recover(self, room: str, since: str | None) -> Deferred[Recovery]:
        # Read the history only once the room's channel is live: what is
        # published after the read then reaches this node (section 4).
        d = self.rooms.ready(room)
        return d.addCallback(lambda _: self._recover(room, since))

    def _recover_script(self, room: str, since: str | None) -> Deferred[list[Any]]:
        parsed = parse_cursor(since) if since is not None else None
        reads = self.rooms.of(room).reads
        if since is None:
            return reads.read(room, "", "0-0")
        if parsed is None:
            return reads.read(room, "-", "0-0")  # no epoch matches "-": not recovered
        return reads.read(room, parsed[0], f"{parsed[1]}-{parsed[2]}")

    def _repair_read(self, room: str, since: str) -> Deferred[Repair]:
        """What followed C{since} in C{room}'s history, for L{RoomChannels}."""
        def done(reply: list[Any]) -> Repair:
            epoch, last, recovered, missed = reply[:4]
            events = []
            for text in missed or ():
                cursor = jsoncodec.decode(text)["params"]["cursor"]
                events.append((str(cursor), str(text).encode()))
            return Repair(cursor=f"{epoch}:{last}", recovered=bool(int(recovered)),
                          missed=tuple(events))

        return self._recover_script(room, since).addCallbacks(done, unavailable)

    def _position_of(self, room: str) -> Deferred[str]:
        d = scripts.POSITION(self.rooms.of(room).commands, [history_key(room), epoch_key(room)],
                             [self._ttl])
        return d.addCallbacks(str, unavailable)

    def _recover(self, room: str, since: str | None) -> Deferred[Recovery]:
        d = self._recover_script(room, since)

        def done(reply: list[Any]) -> Recovery:
            epoch, last, recovered, missed, streaming, streamed = reply
            streamed = frozenset(streamed or ())
            return Recovery(
                cursor=f"{epoch}:{last}",
                recovered=bool(int(recovered)),
                missed=tuple(
                    replayed(text, index in streamed)
                    for index, text in enumerate(missed or (), 1)
                ),
                streaming=tuple(replayed(text, True) for text in streaming or ()),
            )

        return d.addCallbacks(done, unavailable)

    def cursor_key(self, cursor: str) -> tuple[Any, ...] | None:
        return parse_cursor(cursor)

    def publish_ephemeral(self, event: EphemeralEvent) -> Deferred[None]:
        shard = self.rooms.of(event.room)
        d: Deferred[Any] = shard.commands.execute_command(
            "PUBLISH", room_channel(shard.prefix, event.room),
            f"p{event.exclude_user or ''}\n".encode() + event.message,
        )
        return d.addCallbacks(lambda _: None, unavailable)

    def disconnect_user(self, user_id: str, reason: str) -> Deferred[None]:
        return self.feed.disconnect_user(user_id, reason)

    def healthy(self) -> Deferred[Mapping[str, Any] | None]:
        d = self._streams.ping(1.0, self._reactor)

        def up(latency: float) -> Mapping[str, Any]:
            health: dict[str, Any] = {"ok": self.feed_ok and not self.rooms.layout_problems,
                                      "latency_ms": round(latency, 3)}
            if self.rooms.layout_problems:
                health["shard_layout"] = self.rooms.layout_problems
            return health

        return d.addCallbacks(up, lambda _: {"ok": False, "latency_ms": None})
