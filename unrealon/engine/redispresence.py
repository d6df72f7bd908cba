"""
Presence across the cluster, in Redis.

Per room: a sorted set of connections (C{user|conn}) scored by expiry time,
a hash of per-user connection counts (so "first in" and "last out" are known
atomically, wherever the connections live) and a hash of user info.  Every
node refreshes the expiry of its own connections by a heartbeat every third
of C{UNREALON_PRESENCE_TTL}; connections of a node that died stop being
refreshed, and the cluster's single sweeper (whoever holds a short lock)
removes them and announces C{presence.left}.

Entries are written to expire 3/4 of the TTL after each heartbeat and the
sweep runs every tenth of it, so a crashed node's users leave within the TTL
while a live node's entries always keep a margin of about 40% of the TTL
against a late heartbeat.  Expiry times use Redis' clock (scripts call
TIME), so nodes' clocks need not agree.  The arithmetic, with T the TTL: a
node dies at most T/3 after its last heartbeat, so its entries expire at
most 3T/4 after the crash; the sweep lock lives 2T/10 (a dead sweeper's lock
is gone before then) and sweeps come every T/10, so the users are removed
and announced within 3T/4 + T/10 = 0.85 T, plus the room channel's delivery.

Entries are members C{<user>|<conn>@<node token>}: connection ids repeat
across nodes, the token makes them cluster-unique.  Two failure modes are
handled on purpose: a connection that leaves before its join reached the
engine (the join is dropped, see L{IPresence.leave}), and a node whose
entries were swept while it could not heartbeat -- a Redis outage, a long
pause -- which puts them back at its next heartbeat (announcing the user
again) rather than staying invisible.  And when no sweep at all ran for 4T/10
(Redis hung or restarted, or every node was away), expired entries get one
more lifetime instead of a presence.left storm followed by a joined storm.

The same structures under the reserved room C{__online__} answer
C{presence.online} (is a user connected anywhere) without announcements.

Lifecycle events for the backend (PROTOCOL.md section 9.1: C{user.online} /
C{user.offline} from C{__online__}, C{room.occupied} / C{room.vacated} from
the other rooms, optionally C{connection.opened} / C{connection.closed}) are
appended to the events stream by the very script that makes the transition
(join, leave, heartbeat restore, sweep), so each comes exactly once wherever
the connections live, with no extra round trip.  The sweep reports a dead
node's id from the key that node wrote under its token (L{node_key}).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, DeferredList, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from unrealon.engine import scripts
from unrealon.engine.interfaces import BackendUnavailable, IPresence, PresenceCount, PresenceUser
from unrealon.engine.redisclient import RedisHandler, unavailable
from unrealon.engine.rediskeys import PRESENCE, room_channel_prefix
from unrealon.engine.supervision import RedisLink, SupervisedLoop
from unrealon.jsonrpc import encode, notification

log = Logger(namespace="unrealon.engine.redispresence")

P = PRESENCE
ONLINE = "__online__"
SWEEP_LOCK = P + "sweeper"
SWEPT = P + "swept"
#: the connection events flag as the scripts take it
_FLAG = {True: "1", False: "0"}


def node_key(token: str) -> str:
    """
    The node id a presence engine records under its token (written by its
    joins of C{__online__} and its heartbeats), for the sweep to name a dead
    node in its lifecycle events.
    """
    return f"{P}node:{token}"
HEARTBEAT_BATCH = 500


#: cancelled joins remembered at most (oldest forgotten first): only a join
#: still waiting on something when its connection left makes one
MAX_CANCELLED = 10_000


def _cancel(cancelled: dict[Any, bool], key: Any) -> None:
    cancelled[key] = True
    while len(cancelled) > MAX_CANCELLED:
        del cancelled[next(iter(cancelled))]


def _first_error(failure: Failure) -> Failure:
    """The failure inside a gatherResults' FirstError (for the supervisor to judge)."""
    error = failure.value
    if isinstance(error, FirstError):
        inner: Failure = error.subFailure
        return inner
    return failure


def _user_of(member: str) -> str:
    """C{<user>|<conn>}: user ids may contain "|" (auth0|123), connection ids never."""
    return member.rpartition("|")[0]


#: presence changes per script call (a call blocks Redis while it runs)
CHANGES_PER_CALL = 500


def _fire(_: Any, waiting: list[Deferred[None]]) -> None:
    for done in waiting:
        done.callback(None)


def _fail(failure: Failure, waiting: list[Deferred[None]]) -> None:
    if failure.check(txredisapi.ConnectionError, ConnectionError):
        failure = Failure(BackendUnavailable("Redis is unavailable"))
    for done in waiting:
        done.errback(failure)


def _keys(room: str) -> tuple[str, str, str]:
    return f"{P}{room}:m", f"{P}{room}:u", f"{P}{room}:i"


@implementer(IPresence)
class RedisPresence:
    """Presence shared by every node on one Redis."""

    def __init__(
        self,
        reactor: IReactorTime,
        redis: RedisHandler,
        *,
        ttl: float,
        link: RedisLink | None = None,
        count_failure: Callable[[str], None] = lambda loop: None,
        node_id: str | None = None,
        events_stream: str = "stream:events",
        events_maxlen: int = 100_000,
        connection_events: bool = False,
        token: str | None = None,
        channels: str = room_channel_prefix(0),
    ) -> None:
        """
        @param channels: the rooms' channel prefix
            (L{unrealon.engine.rediskeys.room_channel_prefix}): presence
            notifications go on the room's channel.
        """
        self._reactor = reactor
        self._channels = channels
        self._redis = redis
        self._ttl = ttl
        self._lifetime_ms = int(ttl * 750)
        self._sweep_interval = max(0.1, ttl / 10)
        #: this process's token: random per start (makeService shares it with the
        #: backend calls, so a connection has one id everywhere)
        self._token = secrets.token_hex(8) if token is None else token
        #: lifecycle events (PROTOCOL.md section 9.1)
        self._node_id = self._token if node_id is None else node_id
        self._events = events_stream
        self._events_maxlen = events_maxlen
        self._connection_events = _FLAG[connection_events]
        self._node_key = node_key(self._token)
        # outlives this node's last heartbeat by far more than its entries,
        # so the sweep that removes them still finds it
        self._node_key_ttl = max(86_400, int(ttl * 100))
        #: this node's live entries, refreshed (and restored if swept) by the
        #: heartbeat: room -> member -> info json
        self._local: dict[str, dict[str, str]] = {}
        #: connections that left a room before their join came: that join is
        #: dropped (see IPresence.leave)
        self._cancelled: dict[tuple[str, str], bool] = {}
        #: joins and leaves on their way to Redis: stop waits for them, so a
        #: node that closes its connections and stops leaves no ghost entry
        self._writes: set[Deferred[None]] = set()
        #: this turn's joins and leaves, in order (one script call per turn:
        #: a reconnect storm's thousands of changes in a few calls)
        self._changes: list[str | bytes | int] = []
        self._changed: list[Deferred[None]] = []
        self.loops = (
            SupervisedLoop("presence heartbeat", reactor, ttl / 3, self.heartbeat,
                           link=link, count_failure=count_failure),
            SupervisedLoop("presence sweep", reactor, self._sweep_interval, self.sweep,
                           link=link, count_failure=count_failure),
        )

    def start(self) -> Deferred[None]:
        heartbeat, sweep = self.loops
        heartbeat.start()
        sweep.start(now=True)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Stop the loops; fires once the joins and leaves on their way have landed."""
        for loop in self.loops:
            loop.stop()
        self._send_changes()
        if not self._writes:
            return succeed(None)
        landed = DeferredList(list(self._writes), consumeErrors=True)
        return landed.addCallback(lambda _: None)

    def _track(self, d: Deferred[None]) -> Deferred[None]:
        self._writes.add(d)

        def landed(result: Any) -> Any:
            self._writes.discard(d)
            return result

        return d.addBoth(landed)

    # -- periodic work -------------------------------------------------------

    def heartbeat(self) -> Deferred[None]:
        """
        Push back the expiry of every local entry, restoring any that was
        swept.

        Every batch is sent now, in one go: a leave made after this call
        reaches Redis after the batch that holds its entry, so a heartbeat
        never restores a connection that has left.
        """
        self._send_changes()  # joins and leaves made before it land before it
        triples = [
            (room, member, info)
            for room, members in self._local.items()
            for member, info in members.items()
        ]
        batches = []
        for start in range(0, len(triples), HEARTBEAT_BATCH):
            args: list[Any] = [P, self._lifetime_ms, self._channels, self._events_maxlen,
                               self._node_id, self._connection_events, self._node_key_ttl]
            for triple in triples[start : start + HEARTBEAT_BATCH]:
                args += triple
            batches.append(scripts.PRESENCE_HEARTBEAT(
                self._redis, [self._events, self._node_key], args))
        d: Deferred[Any] = gatherResults(batches, consumeErrors=True)
        d.addCallbacks(self._restored, _first_error)
        return d

    def _restored(self, counts: list[Any]) -> None:
        restored = sum(int(n) for n in counts)
        if restored:
            log.warn("presence heartbeat restored {count} swept entries", count=restored)

    def sweep(self) -> Deferred[None]:
        """Remove expired entries cluster-wide, if this node holds the sweep lock."""
        interval_ms = int(self._sweep_interval * 1000)
        d = scripts.PRESENCE_SWEEP(
            self._redis,
            [SWEEP_LOCK, SWEPT, self._events],
            # The holder renews the lock every interval; 2 intervals of
            # validity leave one for a late timer, and a dead holder's lock
            # is gone within 2, so a sweep still runs within 3 intervals and
            # "no sweep for 4 intervals" means Redis (or everyone) was away.
            [P, self._lifetime_ms, self._token, 2 * interval_ms, self._channels, "",
             4 * interval_ms, self._events_maxlen, self._connection_events],
        )
        d.addCallback(self._swept)
        return d

    def _swept(self, reply: Any) -> None:
        _removed, extended = (int(n) for n in reply)
        if extended:
            log.warn(
                "presence sweep found no sweep for a while (Redis away?): gave {count} "
                "expired entries one more lifetime instead of removing them",
                count=extended,
            )

    # -- membership ------------------------------------------------------------

    def _member(self, user_id: str, conn_id: str) -> str:
        """
        The connection's entry: C{<user>|<conn>@<node token>}.  Connection ids
        are only unique within a process (every node has a "c1"), so the
        node's random token makes them unique in the cluster; without it two
        nodes' connections of one user would be one entry, and the first to
        leave would announce presence.left for both.
        """
        return f"{user_id}|{conn_id}@{self._token}"

    def _join(self, room: str, user_id: str, conn_id: str, info: Mapping[str, Any], message: bytes | str) -> Deferred[None]:
        member = self._member(user_id, conn_id)
        if self._cancelled.pop((room, member), False):
            return succeed(None)  # it left (or closed) while its join was on its way
        info_json = json.dumps(dict(info), separators=(",", ":"))
        self._local.setdefault(room, {})[member] = info_json
        return self._change("j", room, user_id, member, info_json, message, conn_id)

    def _leave(self, room: str, user_id: str, conn_id: str, message: bytes | str) -> Deferred[None]:
        member = self._member(user_id, conn_id)
        local = self._local.get(room)
        if local is None or member not in local:
            _cancel(self._cancelled, (room, member))
        else:
            del local[member]
            if not local:
                del self._local[room]
        return self._change("l", room, user_id, member, "", message, conn_id)

    def _change(self, kind: str, room: str, user_id: str, member: str, info_json: str,
                message: bytes | str, conn_id: str) -> Deferred[None]:
        """Queue one join or leave for this turn's L{scripts.PRESENCE_CHANGES} call."""
        if not self._changed:
            self._reactor.callLater(0, self._send_changes)
        self._changes += (kind, room, user_id, member, info_json, message,
                          f"{conn_id}@{self._token}")
        done: Deferred[None] = Deferred()
        self._changed.append(done)
        return self._track(done)

    def _send_changes(self) -> None:
        """This turn's joins and leaves, in the order they were made, in one call per batch."""
        changes, waiting = self._changes, self._changed
        if not waiting:
            return
        self._changes, self._changed = [], []
        step = CHANGES_PER_CALL * 7
        head: list[str | bytes | int] = [
            P, self._lifetime_ms, self._channels, self._events_maxlen, self._node_id,
            self._connection_events, self._node_key_ttl,
        ]
        for start in range(0, len(changes), step):
            batch = waiting[start // 7 : (start + step) // 7]
            d = scripts.PRESENCE_CHANGES(
                self._redis, [self._events, self._node_key], head + changes[start : start + step]
            )
            d.addCallbacks(_fire, _fail, callbackArgs=(batch,), errbackArgs=(batch,))

    def join(self, room: str, user_id: str, conn_id: str, info: Mapping[str, Any]) -> Deferred[None]:
        message = encode(
            notification("presence.joined", {"room": room, "user_id": user_id, "info": info})
        )
        return self._join(room, user_id, conn_id, info, message)

    def leave(self, room: str, user_id: str, conn_id: str) -> Deferred[None]:
        message = encode(notification("presence.left", {"room": room, "user_id": user_id}))
        return self._leave(room, user_id, conn_id, message)

    def connect(self, user_id: str, conn_id: str) -> Deferred[None]:
        return self._join(ONLINE, user_id, conn_id, {}, "")

    def disconnect(self, user_id: str, conn_id: str) -> Deferred[None]:
        return self._leave(ONLINE, user_id, conn_id, "")

    # -- queries -------------------------------------------------------------------

    def _live(self, room: str) -> Deferred[list[tuple[str, str]]]:
        members, _, infos = _keys(room)
        d = scripts.PRESENCE_LIST(self._redis, [members, infos], [])

        def pairs(reply: list[Any]) -> list[tuple[str, str]]:
            return [(str(reply[i]), str(reply[i + 1])) for i in range(0, len(reply), 2)]

        return d.addCallbacks(pairs, unavailable)

    def list(self, room: str) -> Deferred[Sequence[PresenceUser]]:
        def group(pairs: list[tuple[str, str]]) -> Sequence[PresenceUser]:
            counts: dict[str, int] = {}
            infos: dict[str, Any] = {}
            for member, info in pairs:
                user = _user_of(member)
                counts[user] = counts.get(user, 0) + 1
                if user not in infos:
                    try:
                        infos[user] = json.loads(info) if info else {}
                    except ValueError:
                        infos[user] = {}
            return [PresenceUser(u, infos[u], counts[u]) for u in sorted(counts)]

        return self._live(room).addCallback(group)

    def count(self, room: str) -> Deferred[PresenceCount]:
        def tally(pairs: list[tuple[str, str]]) -> PresenceCount:
            users = {_user_of(member) for member, _ in pairs}
            return PresenceCount(users=len(users), connections=len(pairs))

        return self._live(room).addCallback(tally)

    def online(self, user_ids: Sequence[str]) -> Deferred[Sequence[str]]:
        # Per-user counts, not a scan of every connection: O(len(user_ids)).
        # A crashed node's users count until the sweep (within the TTL).
        if not user_ids:
            return succeed([])
        _, counts, _ = _keys(ONLINE)
        d: Deferred[Any] = self._redis.execute_command("HMGET", counts, *user_ids)

        def pick(reply: list[Any]) -> Sequence[str]:
            return [u for u, n in zip(user_ids, reply, strict=True) if n and int(n) > 0]

        return d.addCallbacks(pick, unavailable)
