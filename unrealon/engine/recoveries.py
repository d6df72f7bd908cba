"""
Reading rooms' histories for joins and repairs, one script call per reactor turn.

A reconnect storm brings thousands of C{rooms.join} with C{since} within a
second, and every one reads its room's history (L{scripts.RECOVER}: one
snapshot per room).  One script call per join costs the node a command to
build, a reply to parse and a Deferred chain each, and Redis a call each;
the reads asked for in one reactor turn go as one call instead, at most
L{ROOMS_PER_CALL} rooms a call.  Each room is still read
in one snapshot of its own; waiting for the end of the turn delays no read
by more than that turn.

The members of a room who drop together (a network blip) mostly rejoin
with the same cursor, and the reads of one turn are made in one call, at
one moment: a read asked again in the same turn (same room, same cursor)
is made once and its answer goes to each who asked (in the reconnect-storm
bench all 1,000 rejoins are of one room, nearly all with one cursor).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from unrealon.engine import rediskeys, scripts
from unrealon.engine.redisclient import RedisHandler

#: rooms read per script call.  Small, because a read may return up to
#: UNREALON_HISTORY_SIZE events and a call holds Redis while it runs, and all
#: of a call's joins wait for its whole reply.  Measured in the reconnect-storm
#: bench (1,000 rejoins with ~10 missed events each): 50 rooms a call took
#: 0.74-0.98 s, 10 took 0.58, 1 took 0.55 against 0.49-0.58 for the ceiling in
#: the same runs.  Why 50 was slower is not established: it is not the reply
#: parse (hiredis, about 1 us per event: 0.8 at 10 rooms a reply, 1.3 at 50).
ROOMS_PER_CALL = 10


class RecoveryReads:
    """L{scripts.RECOVER} for the rooms asked in one reactor turn, in few calls."""

    def __init__(
        self, reactor: IReactorTime, redis: RedisHandler, *, history_size: int, history_ttl: int
    ) -> None:
        self._reactor = reactor
        self._redis = redis
        self._size = history_size
        self._ttl = history_ttl
        #: this turn's reads: (keys, args, who waits)
        self._reads: list[tuple[list[str], list[Any], list[Deferred[list[Any]]]]] = []
        #: this turn's reads by (room, since epoch, since id): who waits
        self._waiting: dict[tuple[str, str, str], list[Deferred[list[Any]]]] = {}

    def read(self, room: str, since_epoch: str, since_id: str) -> Deferred[list[Any]]:
        """
        C{room}'s history after C{since_epoch}:C{since_id} ("" epoch: none):
        fires with {epoch, last id, recovered, missed, streaming, streamed
        indexes} (L{scripts.RECOVER}; the same list for every reader of the
        same read in a turn: not to be changed).
        """
        done: Deferred[list[Any]] = Deferred()
        waiting = self._waiting.get((room, since_epoch, since_id))
        if waiting is not None:
            waiting.append(done)
            return done
        if not self._reads:
            self._reactor.callLater(0, self._send)
        keys = [rediskeys.history_key(room), rediskeys.epoch_key(room),
                rediskeys.streaming_key(room)]
        args = [since_epoch, since_id, rediskeys.message_tag(room)]
        waiting = self._waiting[(room, since_epoch, since_id)] = [done]
        self._reads.append((keys, args, waiting))
        return done

    def _send(self) -> None:
        reads, self._reads = self._reads, []
        self._waiting = {}
        for start in range(0, len(reads), ROOMS_PER_CALL):
            batch = reads[start : start + ROOMS_PER_CALL]
            keys = [key for read in batch for key in read[0]]
            args: list[Any] = [self._size, self._ttl, rediskeys.MESSAGE]
            for read in batch:
                args += read[1]
            d = scripts.RECOVER(self._redis, keys, args)
            d.addCallbacks(_answer, _fail, callbackArgs=(batch,), errbackArgs=(batch,))


def _answer(replies: list[Any], batch: list[tuple[Any, Any, list[Deferred[list[Any]]]]]) -> None:
    for (_, _, waiting), reply in zip(batch, replies, strict=True):
        for done in waiting:
            done.callback(reply)


def _fail(failure: Failure, batch: list[tuple[Any, Any, list[Deferred[list[Any]]]]]) -> None:
    for _, _, waiting in batch:
        for done in waiting:
            done.errback(failure)
