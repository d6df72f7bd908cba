"""
The Redis engine's connections: one for commands, one per blocking reader.

Commands share one connection on purpose: txredisapi spreads commands over a
pool at random, which would let two publishes to one room overtake each
other; on one connection they reach Redis, and so the room's history, in the
order they were made (Redis pipelines them, so one connection is not a
bottleneck).  Blocking reads (the cluster feed, the ingress group, the backend replies) each get
a dedicated connection so nothing queues behind a BLOCK, and the rooms'
channels are heard on a Pub/Sub connection of their own.

With rooms sharded (C{UNREALON_REDIS_SHARDS}, L{unrealon.engine.roomshards})
each further instance gets a commands connection and a subscriber, and a
L{RedisLink} of its own for its outages.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from unrealon.engine import messagescripts, redisbackend, scripts
from unrealon.engine.pubsub import SubscriberConnection
from unrealon.engine.redisclient import (
    LuaScript,
    RedisAddress,
    RedisHandler,
    connect,
    parse_redis_url,
)
from unrealon.engine.rediskeys import room_channel_prefix
from unrealon.engine.roomshards import ShardConnections
from unrealon.engine.sentinel import MasterEndpoint, Sentinels
from unrealon.engine.supervision import RedisLink, redis_down

log = Logger(namespace="unrealon.engine.redis")

ALL_SCRIPTS: tuple[LuaScript, ...] = tuple(
    value for value in vars(scripts).values() if isinstance(value, LuaScript)
) + messagescripts.SCRIPTS + redisbackend.SCRIPTS


@attrs.define
class RedisConnections:
    """The node's Redis handlers (they reconnect by themselves) and its L{RedisLink}."""

    commands: RedisHandler
    feed_reader: RedisHandler
    ingress_reader: RedisHandler
    #: backend workers' replies to this node's calls (PROTOCOL.md section 9.3)
    replies_reader: RedisHandler
    #: the rooms' Pub/Sub channels (interest routing)
    subscriber: SubscriberConnection
    #: the channel names' prefix (Pub/Sub ignores database numbers)
    channel_prefix: str
    link: RedisLink
    #: with a redis+sentinel:// URL: the Sentinels every connection asks first
    sentinels: Sentinels | None = None
    #: the further instances rooms are sharded over (C{UNREALON_REDIS_SHARDS})
    room_shards: tuple[ShardConnections, ...] = ()
    #: their Sentinels, if they are monitored
    shard_sentinels: tuple[Sentinels, ...] = ()

    @classmethod
    def open(cls, url: str, clock: IReactorTime, node_id: str | None = None,
             shard_urls: tuple[str, ...] = ()) -> RedisConnections:
        address = parse_redis_url(url)
        name = None if node_id is None else f"unrealon-rooms-{node_id}"
        sentinels, endpoint = _sentinels(clock, address)
        shards, shard_sentinels = [], []
        for index, shard_url in enumerate(shard_urls, start=1):
            shard_address = parse_redis_url(shard_url)
            shard_sentinel, shard_endpoint = _sentinels(clock, shard_address)
            if shard_sentinel is not None:
                shard_sentinels.append(shard_sentinel)
            shards.append(ShardConnections(
                commands=connect(shard_address, scripts=ALL_SCRIPTS, endpoint=shard_endpoint),
                subscriber=SubscriberConnection(
                    clock, shard_address, None if name is None else f"{name}-shard{index}",
                    shard_endpoint),
                channel_prefix=room_channel_prefix(shard_address.db),
                link=RedisLink(clock, shard_address.display()),
            ))
        return cls(
            commands=connect(address, scripts=ALL_SCRIPTS, endpoint=endpoint),
            feed_reader=connect(address, blocking=True, endpoint=endpoint),
            ingress_reader=connect(address, blocking=True, endpoint=endpoint),
            replies_reader=connect(address, blocking=True, endpoint=endpoint),
            subscriber=SubscriberConnection(clock, address, name, endpoint),
            channel_prefix=room_channel_prefix(address.db),
            link=RedisLink(clock, address.display()),
            sentinels=sentinels,
            room_shards=tuple(shards),
            shard_sentinels=tuple(shard_sentinels),
        )

    def start(self) -> Deferred[None]:
        """
        Load the scripts in the background: a broken script is logged loudly
        as soon as Redis answers; a node does not wait for Redis to start
        (PROTOCOL.md section 1), and scripts load themselves on NOSCRIPT.
        """
        loading = Deferred.fromCoroutine(self._load_scripts())
        loading.addErrback(self._not_loaded)
        return succeed(None)

    async def _load_scripts(self) -> None:
        for handler in (self.commands, *(shard.commands for shard in self.room_shards)):
            for script in ALL_SCRIPTS:
                await script.load(handler)

    def _not_loaded(self, failure: Failure) -> None:
        if failure.value is not None and redis_down(failure.value):
            self.link.failed(failure.value, "loading scripts")
        else:
            log.failure("loading the Redis scripts failed", failure)

    def stop(self) -> Deferred[Any]:
        self.link.stop()
        handlers = [self.commands, self.feed_reader, self.ingress_reader, self.replies_reader]
        for shard in self.room_shards:
            if shard.link is not None:
                shard.link.stop()
            handlers.append(shard.commands)
        closing = [h.disconnect() for h in handlers]
        for sentinels in (self.sentinels, *self.shard_sentinels):
            if sentinels is not None:
                closing.append(sentinels.disconnect())
        return DeferredList(
            closing,
            consumeErrors=True,
        )



def _sentinels(
    clock: IReactorTime, address: RedisAddress
) -> tuple[Sentinels | None, MasterEndpoint | None]:
    """With a redis+sentinel:// address: its Sentinels and the endpoint that asks them."""
    if address.kind != "sentinel":
        return None, None
    sentinels = Sentinels(clock, address)
    return sentinels, MasterEndpoint(clock, sentinels)
