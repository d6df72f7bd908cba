"""
The Redis engine's connections: one for commands, one per blocking reader.

Commands share one connection on purpose: txredisapi spreads commands over a
pool at random, which would let two publishes to one room overtake each
other; on one connection they reach Redis, and so the room's history, in the
order they were made (Redis pipelines them, so one connection is not a
bottleneck).  Blocking reads (the cluster feed, the ingress group) each get
a dedicated connection so nothing queues behind a BLOCK.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList

from unrealon.engine import scripts
from unrealon.engine.redisclient import LuaScript, RedisHandler, connect, parse_redis_url

ALL_SCRIPTS: tuple[LuaScript, ...] = tuple(
    value for value in vars(scripts).values() if isinstance(value, LuaScript)
)


@attrs.define
class RedisConnections:
    """The node's Redis handlers; they reconnect by themselves."""

    commands: RedisHandler
    feed_reader: RedisHandler
    ingress_reader: RedisHandler

    @classmethod
    def open(cls, url: str) -> RedisConnections:
        address = parse_redis_url(url)
        return cls(
            commands=connect(address),
            feed_reader=connect(address, blocking=True),
            ingress_reader=connect(address, blocking=True),
        )

    def start(self) -> Deferred[None]:
        """Load the scripts (and so find a broken script or Redis at start)."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for script in ALL_SCRIPTS:
            await script.load(self.commands)

    def stop(self) -> Deferred[Any]:
        return DeferredList(
            [h.disconnect() for h in (self.commands, self.feed_reader, self.ingress_reader)],
            consumeErrors=True,
        )

