"""
Presence across the cluster, in Redis.

Per room: a sorted set of connections (C{user|conn@token}, all scored 0), a
hash of per-user connection counts (so "first in" and "last out" are known
atomically, wherever the connections live) and a hash of user info.

Liveness is per node, not per entry: every node has one record in
C{unrealon:p:alive} (its token, scored by when it expires, Redis' clock) and
an index of its entries (C{unrealon:p:idx:<token>}), both kept by the script
that makes its joins and leaves.  Its heartbeat, every third of
C{UNREALON_PRESENCE_TTL}, pushes back that one record: the heartbeat costs
the same with ten entries or a hundred thousand.  A node that died stops
refreshing it; the cluster's single sweeper (whoever holds a short lock,
L{unrealon.engine.presencesweep}) claims the node and removes exactly what
its index lists, announcing C{presence.left}, in bounded batches.  Until then
C{presence.list}, C{count} and C{online} already leave out the entries of a
node whose record expired.

Records are written to expire 3/4 of the TTL after each heartbeat and the
sweep runs every tenth of it, so a crashed node's users leave within the TTL
while a live node always keeps a margin of about 40% of the TTL against a
late heartbeat.  The arithmetic, with T the TTL: a node dies at most T/3
after its last heartbeat, so its record expires at most 3T/4 after the
crash; the sweep lock lives 2T/10 (a dead sweeper's lock is gone before
then) and sweeps come every T/10, so the users are removed and announced
within 3T/4 + T/10 = 0.85 T, plus the batches (500 entries a call, a few ms
each) and the room channel's delivery.

Entries are members C{<user>|<conn>@<node token>}: connection ids repeat
across nodes, the token makes them cluster-unique.  Failure modes handled on
purpose: a connection that leaves before its join reached the engine (the
join is dropped, see L{IPresence.leave}); a live node whose entries were
swept while it could not heartbeat -- a Redis outage, a long pause -- or
that Redis lost (a restart without persistence): its next heartbeat (or
presence write) finds its record missing, and the node puts back every
entry it has (L{RedisPresence.restore}), announcing the users again, rather
than staying invisible; and when no sweep at all ran for 4T/10 (Redis hung
or restarted, or every node was away), expired records get one more
lifetime instead of a presence.left storm followed by a joined storm.

The same structures under the reserved room C{__online__} answer
C{presence.online} (is a user connected on a live node) without
announcements.

Lifecycle events for the backend (PROTOCOL.md section 9.1: C{user.online} /
C{user.offline} from C{__online__}, C{room.occupied} / C{room.vacated} from
the other rooms, optionally C{connection.opened} / C{connection.closed}) are
appended to the events stream by the very script that makes the transition
(join, leave, restore, sweep), so each comes exactly once wherever the
connections live, with no extra round trip.  The sweep reports a dead node's
id from the key that node wrote under its token
(L{unrealon.engine.rediskeys.presence_node_key}).
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
from unrealon.engine.presencesweep import PresenceSweeper
from unrealon.engine.redisclient import RedisHandler, unavailable
from unrealon.engine.rediskeys import (
    PRESENCE,
    PRESENCE_ALIVE,
    PRESENCE_ROOMS_BEFORE_LIVENESS,
    presence_index_key,
    presence_node_key,
    room_channel_prefix,
)
from unrealon.engine.supervision import RedisLink, SupervisedLoop
from unrealon.jsonrpc import encode, notification

log = Logger(namespace="unrealon.engine.redispresence")

P = PRESENCE
ONLINE = "__online__"
#: the connection events flag as the scripts take it
_FLAG = {True: "1", False: "0"}
#: entries per restore call (a call blocks Redis while it runs)
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
        self._node_key = presence_node_key(self._token)
        self._index = presence_index_key(self._token)
        # outlives this node's last heartbeat by far more than its entries,
        # so the sweep that removes them still finds it
        self._node_key_ttl = max(86_400, int(ttl * 100))
        #: this node's live entries, restored from here if they were swept:
        #: room -> member -> info json
        self._local: dict[str, dict[str, str]] = {}
        #: Redis said this node's liveness record was missing (swept, or
        #: Redis lost its data) and no restore has succeeded since: the next
        #: heartbeat restores (a restore that failed is not forgotten)
        self._restore_due = False
        #: this node's share of the cluster's sweep (run by the sweep loop)
        self.sweeper = PresenceSweeper(
            redis, token=self._token, lifetime_ms=self._lifetime_ms,
            interval=self._sweep_interval, channels=channels, events_stream=events_stream,
            events_maxlen=events_maxlen, connection_events=self._connection_events,
        )
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
            SupervisedLoop("presence sweep", reactor, self._sweep_interval, self.sweeper.sweep,
                           link=link, count_failure=count_failure),
        )

    def start(self) -> Deferred[None]:
        heartbeat, sweep = self.loops
        heartbeat.start()
        sweep.start(now=True)
        check = self._redis.execute_command("EXISTS", PRESENCE_ROOMS_BEFORE_LIVENESS)
        check.addCallbacks(self._layout_checked, lambda f: log.info(
            "could not look for presence data of an earlier version: {error}",
            error=f.getErrorMessage()))
        return succeed(None)

    def _layout_checked(self, found: Any) -> None:
        """
        Nodes of a version before liveness by node and nodes of this one
        break each other's presence (their sweep removes these entries,
        which have no expiry score): the upgrade is a full stop.  Say so
        loudly when the old layout is still there.
        """
        if int(found):
            log.critical(
                "Redis holds presence data of a version before liveness by node "
                "({key}): stop every node of the earlier version, delete unrealon:p:* "
                "and start again (CHANGELOG, docs/cluster-design.md section 9)",
                key=PRESENCE_ROOMS_BEFORE_LIVENESS)

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
        Push back this node's liveness record: one key, however many entries
        it has.  When Redis answers that the record was missing (the sweep
        took the node for dead, or Redis lost its data), put back every
        local entry that is missing (L{restore}).
        """
        self._send_changes()  # joins and leaves made before it land before it
        d: Deferred[Any] = scripts.PRESENCE_HEARTBEAT(
            self._redis, [PRESENCE_ALIVE, self._node_key],
            [self._token, self._lifetime_ms, self._node_id, self._node_key_ttl],
        )
        d.addCallback(self._heartbeat_answered)
        return d

    def _heartbeat_answered(self, lost: Any) -> Deferred[None] | None:
        if int(lost):
            self._restore_due = True
        return self.restore() if self._restore_due else None

    def restore(self) -> Deferred[None]:
        """
        Put back every local entry that is missing in Redis, announcing its
        user again (presence.joined and the lifecycle events); entries still
        there are left alone.

        Every batch is sent now, in one go, after this turn's joins and
        leaves: a leave made after this call reaches Redis after the batch
        that holds its entry, so a restore never brings back a connection
        that has left.
        """
        self._restore_due = True
        self._send_changes()
        triples = [
            (room, member, info)
            for room, members in self._local.items()
            for member, info in members.items()
        ]
        batches = []
        for start in range(0, len(triples), HEARTBEAT_BATCH):
            args: list[Any] = [P, self._channels, self._events_maxlen, self._node_id,
                               self._connection_events]
            for triple in triples[start : start + HEARTBEAT_BATCH]:
                args += triple
            batches.append(scripts.PRESENCE_RESTORE(self._redis, [self._events, self._index], args))
        d: Deferred[Any] = gatherResults(batches, consumeErrors=True)
        d.addCallbacks(self._restored, _first_error)
        return d

    def _restored(self, counts: list[Any]) -> None:
        self._restore_due = False
        restored = sum(int(n) for n in counts)
        if restored:
            log.warn("presence restored {count} entries of this node that Redis had lost "
                     "(swept, or Redis lost its data)", count=restored)

    def _restore_after_write(self, reply: Any) -> None:
        """
        A presence write found this node's record missing: restore now, not
        at the heartbeat.  (A node's first write finds none too; its restore
        then finds everything in place: one pass over what it had by then.)
        """
        if int(reply[1]):
            self.restore().addErrback(self._restore_failed)

    def _restore_failed(self, failure: Failure) -> None:
        # _restore_due stays set: the next heartbeat tries again
        log.failure("presence restore after a write failed; the next heartbeat retries",
                    failure)

    def sweep(self) -> Deferred[None]:
        """Remove dead nodes' entries cluster-wide, if this node holds the sweep lock."""
        return self.sweeper.sweep()

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
        return self._change("j", room, user_id, member, info_json, message)

    def _leave(self, room: str, user_id: str, conn_id: str, message: bytes | str) -> Deferred[None]:
        member = self._member(user_id, conn_id)
        local = self._local.get(room)
        if local is None or member not in local:
            _cancel(self._cancelled, (room, member))
        else:
            del local[member]
            if not local:
                del self._local[room]
        return self._change("l", room, user_id, member, "", message)

    def _change(self, kind: str, room: str, user_id: str, member: str, info_json: str,
                message: bytes | str) -> Deferred[None]:
        """Queue one join or leave for this turn's L{scripts.PRESENCE_CHANGES} call."""
        if not self._changed:
            self._reactor.callLater(0, self._send_changes)
        self._changes += (kind, room, user_id, member, info_json, message)
        done: Deferred[None] = Deferred()
        self._changed.append(done)
        return self._track(done)

    def _send_changes(self) -> None:
        """This turn's joins and leaves, in the order they were made, in one call per batch."""
        changes, waiting = self._changes, self._changed
        if not waiting:
            return
        self._changes, self._changed = [], []
        step = CHANGES_PER_CALL * 6
        head: list[str | bytes | int] = [
            P, self._lifetime_ms, self._channels, self._events_maxlen, self._node_id,
            self._connection_events, self._node_key_ttl, self._token,
        ]
        keys = [self._events, self._node_key, PRESENCE_ALIVE, self._index]
        for start in range(0, len(changes), step):
            batch = waiting[start // 6 : (start + step) // 6]
            d = scripts.PRESENCE_CHANGES(self._redis, keys, head + changes[start : start + step])
            d.addCallbacks(self._restore_after_write, self._changes_failed)
            d.addCallbacks(_fire, _fail, callbackArgs=(batch,), errbackArgs=(batch,))

    def _changes_failed(self, failure: Failure) -> Failure:
        """
        Joins and leaves that did not reach Redis: joins are not awaited by
        rooms.join, so the next heartbeat puts back every local entry that
        is missing (L{restore}).
        """
        self._restore_due = True
        return failure

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
        self._send_changes()  # this node's joins and leaves so far come first
        members, _, infos = _keys(room)
        d = scripts.PRESENCE_LIST(self._redis, [members, infos, PRESENCE_ALIVE], [])

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
        # Per user, not a scan of every connection: O(the users' connections).
        # A crashed node's users stop counting when its liveness expires.
        if not user_ids:
            return succeed([])
        self._send_changes()
        members, counts, _ = _keys(ONLINE)
        d = scripts.PRESENCE_ONLINE(self._redis, [counts, members, PRESENCE_ALIVE], list(user_ids))

        def pick(reply: list[Any] | None) -> Sequence[str]:
            return [str(u) for u in reply or []]

        return d.addCallbacks(pick, unavailable)
