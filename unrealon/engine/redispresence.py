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
TIME), so nodes' clocks need not agree.

The same structures under the reserved room C{__online__} answer
C{presence.online} (is a user connected anywhere) without announcements.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from unrealon.engine import scripts
from unrealon.engine.interfaces import IPresence, PresenceCount, PresenceUser
from unrealon.engine.redisbroker import FEED, FEED_MAXLEN, PREFIX, _unavailable
from unrealon.engine.redisclient import RedisHandler
from unrealon.jsonrpc import encode, notification

log = Logger(namespace="unrealon.engine.redispresence")

P = PREFIX + "p:"
ONLINE = "__online__"
SWEEP_LOCK = P + "sweeper"
HEARTBEAT_BATCH = 500


def _keys(room: str) -> tuple[str, str, str]:
    return f"{P}{room}:m", f"{P}{room}:u", f"{P}{room}:i"


@implementer(IPresence)
class RedisPresence:
    """Presence shared by every node on one Redis."""

    def __init__(self, reactor: IReactorTime, redis: RedisHandler, *, ttl: float) -> None:
        self._reactor = reactor
        self._redis = redis
        self._ttl = ttl
        self._lifetime_ms = int(ttl * 750)
        #: this node's live entries, refreshed by the heartbeat: room -> members
        self._local: dict[str, set[str]] = {}
        self._token = secrets.token_hex(8)
        self._heartbeat = LoopingCall(self.heartbeat)
        self._heartbeat.clock = reactor
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = reactor

    def start(self) -> Deferred[None]:
        self._heartbeat.start(self._ttl / 3, now=False).addErrback(
            lambda f: log.failure("presence heartbeat stopped", f)
        )
        self._sweeper.start(max(0.1, self._ttl / 10), now=True).addErrback(
            lambda f: log.failure("presence sweeper stopped", f)
        )
        return succeed(None)

    def stop(self) -> Deferred[None]:
        for loop in (self._heartbeat, self._sweeper):
            if loop.running:
                loop.stop()
        return succeed(None)

    # -- periodic work -------------------------------------------------------

    def heartbeat(self) -> Deferred[None]:
        """Push back the expiry of every local entry (errors are logged, not raised)."""
        pairs = [(room, member) for room, members in self._local.items() for member in members]
        d = Deferred.fromCoroutine(self._heartbeat_batches(pairs))
        d.addErrback(self._log_quietly, "heartbeat")
        return d

    async def _heartbeat_batches(self, pairs: list[tuple[str, str]]) -> None:
        for start in range(0, len(pairs), HEARTBEAT_BATCH):
            args: list[Any] = [P, self._lifetime_ms]
            for room, member in pairs[start : start + HEARTBEAT_BATCH]:
                args += [room, member]
            await scripts.PRESENCE_HEARTBEAT(self._redis, [], args)

    def sweep(self) -> Deferred[None]:
        """Remove expired entries cluster-wide, if this node holds the sweep lock."""
        lock_ms = int(max(0.1, self._ttl / 10) * 3000)
        d = scripts.PRESENCE_SWEEP(
            self._redis,
            [SWEEP_LOCK],
            [P, 0, self._token, lock_ms, FEED, FEED_MAXLEN],
        )
        d.addCallback(lambda _: None)
        d.addErrback(self._log_quietly, "sweep")
        return d

    def _log_quietly(self, failure: Any, what: str) -> None:
        # Redis being away is reported by /health; don't stop the loop.
        log.warn("presence {what} failed: {error}", what=what, error=failure.getErrorMessage())

    # -- membership ------------------------------------------------------------

    def _join(self, room: str, user_id: str, conn_id: str, info: Mapping[str, Any], message: bytes | str) -> Deferred[None]:
        member = f"{user_id}|{conn_id}"
        self._local.setdefault(room, set()).add(member)
        members, counts, infos = _keys(room)
        d = scripts.PRESENCE_JOIN(
            self._redis,
            [members, counts, infos, P + "rooms", FEED],
            [room, user_id, member, self._lifetime_ms,
             json.dumps(dict(info), separators=(",", ":")), message, FEED_MAXLEN],
        )
        return d.addCallbacks(lambda _: None, _unavailable)

    def _leave(self, room: str, user_id: str, conn_id: str, message: bytes | str) -> Deferred[None]:
        member = f"{user_id}|{conn_id}"
        local = self._local.get(room)
        if local is not None:
            local.discard(member)
            if not local:
                del self._local[room]
        members, counts, infos = _keys(room)
        d = scripts.PRESENCE_LEAVE(
            self._redis,
            [members, counts, infos, FEED],
            [room, user_id, member, message, FEED_MAXLEN],
        )
        return d.addCallbacks(lambda _: None, _unavailable)

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

        return d.addCallbacks(pairs, _unavailable)

    def list(self, room: str) -> Deferred[Sequence[PresenceUser]]:
        def group(pairs: list[tuple[str, str]]) -> Sequence[PresenceUser]:
            counts: dict[str, int] = {}
            infos: dict[str, Any] = {}
            for member, info in pairs:
                user = member.split("|", 1)[0]
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
            users = {member.split("|", 1)[0] for member, _ in pairs}
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

        return d.addCallbacks(pick, _unavailable)
