"""
The cluster's presence sweep: removes the entries of nodes that died.

Liveness is per node (L{unrealon.engine.rediskeys.PRESENCE_ALIVE}, refreshed
by each node's heartbeat), so the sweep never reads a live node's rooms: it
claims the nodes whose record expired and removes what their indexes list,
at most L{ENTRIES_PER_CALL} entries a script call (one call holds Redis for
a few milliseconds at most), calling again at once while dead entries are
left.  A pass with no dead node is a handful of commands, however many
entries and rooms the cluster has.  The script (L{scripts.PRESENCE_SWEEP})
says why it is shaped as it is: the lock, the stall grace and the
announcements.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from unrealon.engine import scripts
from unrealon.engine.redisclient import RedisHandler
from unrealon.engine.rediskeys import (
    PRESENCE,
    PRESENCE_ALIVE,
    PRESENCE_DEAD,
    PRESENCE_SWEEP_LOCK,
    PRESENCE_SWEPT,
)

log = Logger(namespace="unrealon.engine.presencesweep")

#: dead nodes' entries removed per script call: each costs a few
#: microseconds of Redis with its announcements, so a call stays in
#: milliseconds and other clients are served between calls
ENTRIES_PER_CALL = 500


class SweepCall(NamedTuple):
    """What one call of the sweep script did."""

    #: entries removed (-1: another node holds the lock, nothing was done)
    removed: int
    #: expired liveness records given one more lifetime (the stall grace)
    extended: int
    #: 1 when dead nodes' entries are left for another call
    more: int


class PresenceSweeper:
    """One node's share of the sweep: it sweeps while it holds the lock."""

    def __init__(
        self,
        redis: RedisHandler,
        *,
        token: str,
        lifetime_ms: int,
        interval: float,
        channels: str,
        events_stream: str,
        events_maxlen: int,
        connection_events: str,
        entries_per_call: int = ENTRIES_PER_CALL,
    ) -> None:
        """
        @param lifetime_ms: a liveness record's lifetime, for the stall grace
        @param interval: seconds between sweeps (the loop's)
        @param connection_events: C{"1"} or C{"0"}, as the scripts take it
        """
        self._redis = redis
        interval_ms = int(interval * 1000)
        self._keys = [PRESENCE_SWEEP_LOCK, PRESENCE_SWEPT, events_stream, PRESENCE_ALIVE,
                      PRESENCE_DEAD]
        # The holder renews the lock every interval; 2 intervals of validity
        # leave one for a late timer, and a dead holder's lock is gone within
        # 2, so a sweep still runs within 3 intervals and "no sweep for 4
        # intervals" means Redis (or everyone) was away.
        self._args: list[str | bytes | int] = [
            PRESENCE, lifetime_ms, token, 2 * interval_ms, channels, entries_per_call,
            4 * interval_ms, events_maxlen, connection_events,
        ]

    def sweep(self) -> Deferred[None]:
        """
        Claim the nodes whose liveness expired and remove their entries,
        one bounded script call after another until none is left, if this
        node holds the lock.
        """
        return Deferred.fromCoroutine(self._sweep())

    def sweep_once(self) -> Deferred[SweepCall]:
        """One script call of the sweep: at most C{entries_per_call} entries removed."""
        d: Deferred[Any] = scripts.PRESENCE_SWEEP(self._redis, self._keys, self._args)
        return d.addCallback(lambda reply: SweepCall(*(int(n) for n in reply)))

    async def _sweep(self) -> None:
        removed = extended = 0
        while True:
            call = await self.sweep_once()
            if call.removed < 0:
                return  # another node holds the lock
            removed += call.removed
            extended += call.extended
            if not call.more:
                break
        if removed:
            log.info("presence sweep removed {count} entries of dead nodes", count=removed)
        if extended:
            log.warn(
                "presence sweep found no sweep for a while (Redis away?): gave {count} "
                "expired nodes one more lifetime instead of removing their entries",
                count=extended,
            )
