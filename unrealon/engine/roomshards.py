"""
Which Redis holds a room, when rooms are sharded over several instances.

With C{UNREALON_REDIS_SHARDS} (PROTOCOL.md section 7) a room's history, its
streamed messages, its publications' idempotency keys and its channel live
on one of S Redis instances: shard 0 is C{REDIS_URL}, the others follow in
the order given.  Every node must be given the same list in the same order;
L{check_layout} writes each instance's place in it there and refuses to
trust an instance that another node knows under another place.

The room picks its shard by jump consistent hash (Lamping and Veach, 2014)
of a 64-bit BLAKE2b digest of its name: no table to agree on, an even
spread, and growing from S to S+1 shards moves only the rooms that go to
the new one (about 1/(S+1) of them).  A moved room starts a new history
there (a new epoch: its clients recover, PROTOCOL.md section 4).  The hash
is part of the on-Redis layout: changing it moves rooms like a re-shard
does, so C{tests/test_sharding.py} pins its values.

What is cluster-wide stays on shard 0: the ingress stream, the cluster feed,
the backend streams, the HTTP API's idempotency records, and presence with
its lifecycle events.  Presence stays whole on purpose: a transition
(first in, last out) and its lifecycle event are one atomic step, and the
events stream's order is the order of the transitions (section 9.1), which
one instance gives and several independent ones cannot.  Presence
notifications of a room therefore come on shard 0's channel for the room,
and a node with members in a room on shard k listens there too
(docs/cluster-design.md, section 1).

L{ShardedRooms} holds what a node keeps per shard (the rooms' channels, the
batched history reads, the release loop of held chunks) and routes a room to
its shard; without shards it is the same with one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from unrealon.engine.interfaces import IDeliverySink
from unrealon.engine.pubsub import SubscriberConnection
from unrealon.engine.recoveries import RecoveryReads
from unrealon.engine.redisclient import RedisHandler
from unrealon.engine.rediskeys import SHARD_PLACE
from unrealon.engine.roomchannels import Repair, RoomChannels
from unrealon.engine.supervision import ISupervised, RedisLink, SupervisedLoop

log = Logger(namespace="unrealon.engine.roomshards")

_MASK64 = (1 << 64) - 1
#: seconds between attempts at the layout check while a shard is away
LAYOUT_RETRY = 5.0


def room_hash(room: str) -> int:
    """A room name's 64-bit key: the same on every node, every Python, every start."""
    return int.from_bytes(hashlib.blake2b(room.encode("utf-8"), digest_size=8).digest(), "big")


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash: C{key}'s bucket in [0, buckets)."""
    if buckets < 1:
        raise ValueError("needs at least one bucket")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


@attrs.frozen
class RoomShards:
    """The room-to-shard map of C{count} shards."""

    count: int = attrs.field(validator=attrs.validators.ge(1))

    def index(self, room: str) -> int:
        """The shard that holds C{room}."""
        if self.count == 1:
            return 0
        return jump_hash(room_hash(room), self.count)


def place(index: int, count: int) -> str:
    """What shard C{index} of C{count} records about itself (L{check_layout})."""
    return f"{index} of {count}"


async def check_layout(handlers: Sequence[RedisHandler]) -> list[str]:
    """
    Record each shard's place on it (the first node to start writes it), and
    return the disagreements: an instance that holds another place was given
    to this node in another position (or with another count) than to the
    node that wrote it, and the two would look for rooms on different
    instances.  Changing the layout on purpose means deleting the key on
    every instance (docs/operations.md, "Sharding").
    """
    problems = []
    count = len(handlers)
    for index, handler in enumerate(handlers):
        expected = place(index, count)
        # SET NX, then GET (SET's GET with NX needs Redis 7): whichever node
        # wrote first, every node then reads the same value
        await handler.execute_command("SET", SHARD_PLACE, expected, "NX")
        written: Any = await handler.execute_command("GET", SHARD_PLACE)
        if written is not None and str(written) != expected:
            problems.append(f"shard {index} of {count} holds the place {written!s}")
    return problems


@attrs.frozen
class ShardConnections:
    """One shard's Redis, as the broker needs it."""

    #: its commands (one connection, for the order of a room's publishes)
    commands: RedisHandler
    #: its rooms' channels
    subscriber: SubscriberConnection
    #: L{unrealon.engine.rediskeys.room_channel_prefix} of its database
    channel_prefix: str
    link: RedisLink | None = None


class RoomShard:
    """One Redis instance's share of the rooms, as this node works it."""

    __slots__ = ("channels", "commands", "prefix", "reads", "releaser")

    def __init__(self, commands: RedisHandler, prefix: str, reads: RecoveryReads,
                 channels: RoomChannels) -> None:
        self.commands = commands
        self.prefix = prefix
        self.reads = reads
        self.channels = channels
        #: set by L{ShardedRooms} (its step needs the shard)
        self.releaser: SupervisedLoop


class ShardedRooms:
    """Each shard's parts on this node, and which shard a room is on."""

    def __init__(
        self,
        reactor: IReactorTime,
        sink: IDeliverySink,
        shards: Sequence[ShardConnections],
        *,
        history_size: int,
        history_ttl: int,
        repair: Callable[[str, str], Deferred[Repair]],
        position_of: Callable[[str], Deferred[str]],
        release: Callable[[RoomShard], Awaitable[None]],
        release_interval: float,
        count_failure: Callable[[str], None],
        room_grace: float | None = None,
    ) -> None:
        """
        @param shards: the first is C{REDIS_URL}'s (cluster-wide keys, presence).
        @param repair: L{RoomChannels}' reader of a room's history after a cursor.
        @param position_of: L{RoomChannels}' reader of a room's latest cursor.
        @param release: releases a shard's held chunks that are due.
        """
        self._map = RoomShards(len(shards))
        self._reactor = reactor
        self._layout_retry: IDelayedCall | None = None
        self._stopped = False
        grace = {} if room_grace is None else {"grace": room_grace}
        self.shards: list[RoomShard] = []
        for index, connections in enumerate(shards):
            suffix = f" (shard {index})" if len(shards) > 1 else ""
            shard = RoomShard(
                connections.commands, connections.channel_prefix,
                RecoveryReads(reactor, connections.commands, history_size=history_size,
                              history_ttl=history_ttl),
                RoomChannels(reactor, sink, connections.subscriber, connections.channel_prefix,
                             repair=repair, position_of=position_of, link=connections.link,
                             name="room channels" + suffix, **grace),
            )
            shard.releaser = SupervisedLoop(
                "streamed message release" + suffix, reactor, release_interval,
                partial(release, shard), link=connections.link, count_failure=count_failure,
            )
            self.shards.append(shard)
        self.first = self.shards[0]
        #: shards another node knows in another place (L{check_layout})
        self.layout_problems: list[str] = []

    def of(self, room: str) -> RoomShard:
        """The shard C{room} is on."""
        return self.shards[self._map.index(room)]

    @property
    def channels(self) -> tuple[RoomChannels, ...]:
        return tuple(shard.channels for shard in self.shards)

    @property
    def loops(self) -> tuple[ISupervised, ...]:
        """What /health watches: each shard's channels and release loop."""
        return (*self.channels,
                *(shard.releaser for shard in self.shards))

    # -- interest: a room's events on its shard, its presence on the first ------------

    def watch(self, room: str) -> Deferred[None]:
        shard = self.of(room)
        events = shard.channels.watch(room)
        if shard is self.first:
            return events
        presence = self.first.channels.watch(room, events=False)
        return gatherResults([events, presence]).addCallback(lambda _: None)

    def unwatch(self, room: str) -> None:
        shard = self.of(room)
        shard.channels.unwatch(room)
        if shard is not self.first:
            self.first.channels.unwatch(room)

    def ready(self, room: str) -> Deferred[Any]:
        """Fires once everything of C{room} this node hears is live."""
        shard = self.of(room)
        if shard is self.first:
            return shard.channels.ready(room)
        return gatherResults([shard.channels.ready(room), self.first.channels.ready(room)])

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        for shard in self.shards:
            shard.channels.start()
            shard.releaser.start()
        if len(self.shards) > 1:
            Deferred.fromCoroutine(self._check_layout())

    async def _check_layout(self) -> None:
        self._layout_retry = None
        try:
            self.layout_problems = await check_layout([s.commands for s in self.shards])
        except Exception as e:
            if self._stopped:
                return
            # a shard away at start: its rooms wait for it anyway; check again
            log.warn("could not check the shards' layout ({error}); trying again in "
                     "{delay} s", error=e, delay=LAYOUT_RETRY)
            self._layout_retry = self._reactor.callLater(
                LAYOUT_RETRY, lambda: Deferred.fromCoroutine(self._check_layout()))
            return
        for problem in self.layout_problems:
            log.critical("rooms are sharded differently by another node: {problem}; "
                         "UNREALON_REDIS_SHARDS must list the same instances in the same "
                         "order on every node", problem=problem)

    def stop(self) -> Deferred[Any]:
        self._stopped = True
        if self._layout_retry is not None and self._layout_retry.active():
            self._layout_retry.cancel()
        self._layout_retry = None
        stopped = []
        for shard in self.shards:
            shard.releaser.stop()
            stopped.append(shard.channels.stop())
        return gatherResults(stopped)
