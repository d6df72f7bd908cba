"""
Presence liveness by node (unrealon.engine.redispresence, presencesweep):
the heartbeat's work does not grow with a node's entries, the sweep removes
exactly a dead node's entries and reads no live node's room, a node swept
while alive puts its entries back, and presence.list / count / online leave
out a dead node's entries before the sweep removes them.

Real redis-server, engines driven by hand (their loops are not started, so
nothing runs behind the test's back).  Work is counted with Redis' own
C{INFO commandstats} (commands run inside scripts count there too), never
timed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until
from unrealon.engine.interfaces import PresenceCount, PresenceUser
from unrealon.engine.presencesweep import PresenceSweeper
from unrealon.engine.redisclient import RedisHandler, connect, parse_redis_url
from unrealon.engine.rediskeys import PRESENCE_ALIVE, room_channel_prefix
from unrealon.engine.redispresence import RedisPresence

STREAM = "stream:events"
#: what the test's own client sends around the measured work (and script
#: loading, which depends on what ran before on the connection)
_OWN = ("config", "info", "script")


def _token(name: str) -> str:
    """A node token as RedisPresence makes them (16 hex digits), readable in failures."""
    return name.encode().hex().ljust(16, "0")[:16]


class PresenceLivenessTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.redis = self.handler()

    def handler(self) -> RedisHandler:
        redis = connect(parse_redis_url(self.server.url))
        self.addCleanup(redis.disconnect)
        return redis

    def node(self, name: str, ttl: float = 30.0) -> RedisPresence:
        """A node's presence engine (own connection, loops not started), node id C{name}."""
        return RedisPresence(reactor, self.handler(), ttl=ttl, node_id=name,
                             connection_events=True, token=_token(name))

    @inlineCallbacks
    def commands_of(self, work: Callable[[], Deferred[Any]]) -> Any:
        """Calls per command Redis ran for C{work} (scripts' inner commands included)."""
        yield self.redis.execute_command("CONFIG", "RESETSTAT")
        yield work()
        info = yield self.redis.execute_command("INFO", "commandstats")
        calls = {}
        for line in str(info).splitlines():
            if line.startswith("cmdstat_"):
                name, _, stats = line[len("cmdstat_"):].partition(":")
                fields = dict(f.split("=") for f in stats.split(","))
                if name.split("|")[0] not in _OWN:
                    calls[name] = int(fields["calls"])
        return calls

    @inlineCallbacks
    def events(self) -> Any:
        """(type, user or room, node id, reason) of every lifecycle event, in order."""
        entries = yield self.redis.execute_command("XRANGE", STREAM, "-", "+")
        out = []
        for _, fields in entries or []:
            event = json.loads(fields[1])
            out.append((event["type"], event.get("room") or event["user_id"],
                        event["node_id"], event.get("reason")))
        return out

    def expire(self, node: str) -> Deferred[Any]:
        """What 3T/4 without a heartbeat does to C{node}: its liveness record expired."""
        return self.redis.execute_command("ZADD", PRESENCE_ALIVE, 1, _token(node))

    def count_accesses(self) -> Deferred[Any]:
        """
        From now on Redis counts every access to a key (its LFU counter with
        log factor 0, which saturates at 255 and here never decays): OBJECT
        FREQ, which does not count itself, tells whether anything read or
        wrote a key.
        """
        return gatherResults([
            self.redis.execute_command("CONFIG", "SET", name, value)
            for name, value in (("maxmemory-policy", "allkeys-lfu"), ("lfu-log-factor", "0"),
                                ("lfu-decay-time", "0"))
        ])

    @inlineCallbacks
    def zero_accesses(self, keys: list[str]) -> Any:
        """Set the access counters of C{keys} to 0 (DUMP, then RESTORE with FREQ 0)."""
        for key in keys:
            payload = yield self.redis.execute_command("DUMP", key)
            yield self.redis.execute_command("RESTORE", key, 0, payload, "REPLACE", "FREQ", 0)

    @inlineCallbacks
    def accessed(self, keys: list[str]) -> Any:
        """The keys among C{keys} accessed since L{zero_accesses}."""
        out = []
        for key in keys:
            freq = yield self.redis.execute_command("OBJECT", "FREQ", key)
            if int(freq):
                out.append(key)
        return out

    @inlineCallbacks
    def room_state(self, room: str) -> Any:
        """A room's members, counts and infos, as Redis holds them."""
        members = yield self.redis.execute_command("ZRANGE", f"unrealon:p:{room}:m", 0, -1)
        counts = yield self.redis.execute_command("HGETALL", f"unrealon:p:{room}:u")
        infos = yield self.redis.execute_command("HGETALL", f"unrealon:p:{room}:i")
        return sorted(members or []), sorted(counts or []), sorted(infos or [])

    @inlineCallbacks
    def fill(self, node: RedisPresence, rooms: int, per_room: int) -> Any:
        """C{per_room} users in each of C{rooms} rooms, each user connected once."""
        joins = []
        for r in range(rooms):
            for u in range(per_room):
                user, conn = f"u{r}-{u}", f"c{r}-{u}"
                joins.append(node.connect(user, conn))
                joins.append(node.join(f"room:{r}", user, conn, {"n": u}))
        yield gatherResults(joins, consumeErrors=True)

    # -- the heartbeat -------------------------------------------------------

    @inlineCallbacks
    def test_heartbeat_work_does_not_grow_with_entries(self) -> Any:
        """
        A node's heartbeat runs the same commands whether the node has 2
        entries or 2,000: one script call that writes its liveness record
        and its node id, nothing per entry.
        """
        small, big = self.node("small"), self.node("big")
        yield self.fill(small, rooms=1, per_room=1)
        yield self.fill(big, rooms=100, per_room=10)
        yield small.heartbeat()
        yield big.heartbeat()
        few = yield self.commands_of(small.heartbeat)
        many = yield self.commands_of(big.heartbeat)
        self.assertEqual(many, few)
        self.assertEqual(few.pop("evalsha"), 1)
        # TIME, and the record read and written, and the node id: a handful
        self.assertLessEqual(sum(few.values()), 5, few)
        self.assertEqual(set(few) - {"time", "zscore", "zadd", "set"}, set(), few)

    # -- the sweep ---------------------------------------------------------------

    @inlineCallbacks
    def test_sweep_removes_only_the_dead_nodes_entries(self) -> Any:
        """
        The sweep removes exactly what a dead node's index lists, announces
        it once (node_lost, the dead node's id), and touches none of the live
        node's 300 rooms nor its index (their access counters do not move):
        its command count follows the dead entries, not the cluster's.  A
        pass with no dead node is a fixed handful.
        """
        live, dead, sweeper = self.node("live"), self.node("dead"), self.node("sweeper")
        yield self.count_accesses()
        yield self.fill(live, rooms=300, per_room=2)
        yield dead.connect("alice", "c1")
        yield dead.join("room:0", "alice", "c1", {})  # shared with the live node
        yield dead.join("room:dead", "alice", "c1", {})
        before = yield gatherResults([self.room_state(f"room:{r}") for r in range(1, 300)])
        shared = yield self.room_state("room:0")
        yield sweeper.sweep()  # nothing dead yet (and the script is loaded)
        yield self.expire("dead")
        untouched = [f"unrealon:p:room:{r}:{k}" for r in range(1, 300) for k in "mui"]
        untouched.append(f"unrealon:p:idx:{_token('live')}")
        shared_key = "unrealon:p:room:0:m"
        yield self.zero_accesses([*untouched, shared_key])
        calls = yield self.commands_of(sweeper.sweep)
        # only the shared room, where the dead node had an entry, was touched
        self.assertEqual((yield self.accessed([*untouched, shared_key])), [shared_key])
        self.assertEqual(calls.pop("evalsha"), 1)
        # the record claimed, then __online__, room:0, room:dead
        self.assertEqual(calls.get("zrem"), 4, calls)
        # per dead entry about ten commands (counts, index, events, the left
        # notification), plus a fixed dozen: far fewer than the live rooms
        self.assertLessEqual(sum(calls.values()), 60, calls)
        after = yield gatherResults([self.room_state(f"room:{r}") for r in range(1, 300)])
        self.assertEqual(after, before)
        members, counts, _ = yield self.room_state("room:0")
        self.assertEqual(members, [m for m in shared[0] if not m.startswith("alice|")])
        self.assertEqual(len(members), 2)
        self.assertEqual(len(counts), 4)
        self.assertEqual((yield self.room_state("room:dead")), ([], [], []))
        events = yield self.events()
        self.assertEqual(
            sorted(e for e in events if e[3] == "node_lost"),
            [("connection.closed", "alice", "dead", "node_lost"),
             ("room.vacated", "room:dead", "dead", "node_lost"),
             ("user.offline", "alice", "dead", "node_lost")],
        )
        self.assertEqual(list((yield live.list("room:1"))),
                         [PresenceUser("u1-0", {"n": 0}, 1), PresenceUser("u1-1", {"n": 1}, 1)])
        # nothing dead: the pass reads the records and the (empty) dead set
        calls = yield self.commands_of(sweeper.sweep)
        self.assertEqual(calls.pop("evalsha"), 1)
        self.assertLessEqual(sum(calls.values()), 10, calls)
        self.assertNotIn("zrem", calls)

    @inlineCallbacks
    def test_sweep_in_batches_stops_when_the_node_comes_back(self) -> Any:
        """
        A dead node's entries go a bounded batch per call; a node that
        heartbeats mid-sweep is not swept further, and puts back what the
        batches removed: every entry is there again, each transition once.
        """
        node = self.node("paused")
        sweeper = PresenceSweeper(
            self.handler(), token=_token("sweeper"), lifetime_ms=22_500, interval=3.0,
            channels=room_channel_prefix(0), events_stream=STREAM, events_maxlen=1000,
            connection_events="1", entries_per_call=2,
        )
        yield node.connect("alice", "c1")
        rooms = [f"room:{i}" for i in range(5)]
        yield gatherResults([node.join(room, "alice", "c1", {}) for room in rooms])
        yield self.expire("paused")
        first = yield sweeper.sweep_once()
        self.assertEqual((first.removed, first.more), (2, 1))
        yield node.heartbeat()  # back: its record was claimed, so it restores
        second = yield sweeper.sweep_once()
        self.assertEqual((second.removed, second.more), (0, 0))
        for room in rooms:
            self.assertEqual(list((yield node.list(room))), [PresenceUser("alice", {}, 1)])
        self.assertEqual(list((yield node.online(["alice"]))), ["alice"])
        events = yield self.events()
        # each room's (and the user's) events alternate, up first, up last;
        # the two swept entries (random ones) went down and up once
        cycles = 0
        for kind, key in [*(("room.", room) for room in rooms), ("user.", "alice")]:
            kinds = [e[0].split(".")[1] for e in events if e[1] == key and e[0].startswith(kind)]
            self.assertIn(kinds, (["occupied"], ["occupied", "vacated", "occupied"],
                                  ["online"], ["online", "offline", "online"]), key)
            cycles += len(kinds) == 3
        self.assertEqual(cycles, 2)

    @inlineCallbacks
    def test_one_sweep_removes_a_big_dead_node_in_bounded_calls(self) -> Any:
        """
        A dead node with more entries than one call removes: one sweep
        (one tick of the loop) makes as many bounded calls as it takes, so
        the node's users still leave within the TTL.
        """
        dead, sweeper = self.node("dead"), self.node("sweeper")
        yield self.fill(dead, rooms=60, per_room=10)  # 600 connections: 1,200 entries
        yield sweeper.sweep()
        yield self.expire("dead")
        calls = yield self.commands_of(sweeper.sweep)
        self.assertEqual(calls["evalsha"], 3)  # 500 + 500 + 200 entries
        self.assertEqual(calls["zrem"], 1 + 1200)  # the record claimed, then every entry
        keys = yield self.redis.execute_command("KEYS", "unrealon:p:*")
        # nothing left of it but its node id (kept long, for late lookups)
        self.assertEqual(sorted(keys), ["unrealon:p:node:" + _token("dead"),
                                        "unrealon:p:sweeper", "unrealon:p:swept"])
        offline = [e for e in (yield self.events()) if e[0] == "user.offline"]
        self.assertEqual(len(offline), 600)

    @inlineCallbacks
    def test_stall_grace_removes_nothing(self) -> Any:
        """
        No sweep for longer than 4T/10 (Redis was away): expired records get
        one more lifetime, nothing is removed or announced.
        """
        node, sweeper = self.node("n1"), self.node("sweeper")
        yield node.join("room:g", "alice", "c1", {})
        yield self.expire("n1")
        now_s, _ = yield self.redis.execute_command("TIME")
        yield self.redis.execute_command("SET", "unrealon:p:swept", (int(now_s) - 3600) * 1000)
        call = yield sweeper.sweeper.sweep_once()
        self.assertEqual(tuple(call), (0, 1, 0))
        expires = yield self.redis.execute_command("ZSCORE", PRESENCE_ALIVE, _token("n1"))
        self.assertGreater(float(expires), int(now_s) * 1000)
        self.assertEqual([u.user_id for u in (yield node.list("room:g"))], ["alice"])
        yield sweeper.sweep()  # the next, in time: the node is live again
        self.assertEqual([u.user_id for u in (yield node.list("room:g"))], ["alice"])
        self.assertEqual([e[0] for e in (yield self.events())], ["room.occupied"])

    # -- restore -------------------------------------------------------------

    @inlineCallbacks
    def test_swept_node_restores_at_its_next_heartbeat(self) -> Any:
        """
        A live node swept while it could not heartbeat: its next heartbeat
        learns it, and the node puts every entry back with its lifecycle
        events (offline, then online again: each once).
        """
        node, sweeper = self.node("n1"), self.node("sweeper")
        yield node.connect("alice", "c1")
        yield node.join("room:r", "alice", "c1", {"name": "A"})
        yield self.expire("n1")
        yield sweeper.sweep()
        self.assertEqual((yield self.room_state("room:r")), ([], [], []))
        self.assertEqual(list((yield node.online(["alice"]))), [])
        yield node.heartbeat()
        self.assertEqual(list((yield node.list("room:r"))), [PresenceUser("alice", {"name": "A"}, 1)])
        self.assertEqual(list((yield node.online(["alice"]))), ["alice"])
        events = [e[:2] for e in (yield self.events())]
        up = [("user.online", "alice"), ("connection.opened", "alice"), ("room.occupied", "room:r")]
        self.assertEqual(events[:3], up)
        # the sweep removes a node's entries in no particular order
        self.assertEqual(sorted(events[3:6]), [("connection.closed", "alice"),
                                               ("room.vacated", "room:r"),
                                               ("user.offline", "alice")])
        self.assertEqual(events[6:], up)
        # and it is swept right again once it really dies: the index holds the restored entries
        yield self.expire("n1")
        yield sweeper.sweep()
        self.assertEqual((yield self.room_state("room:r")), ([], [], []))

    @inlineCallbacks
    def test_a_join_whose_write_failed_is_written_at_the_next_heartbeat(self) -> Any:
        """
        rooms.join does not wait for its presence write; a write Redis
        refuses (here: out of memory, so every writing script is refused)
        is put back by the node's next heartbeat once Redis takes writes
        again, announced once.
        """
        node = self.node("n1")
        yield node.connect("alice", "c1")
        yield node.heartbeat()  # (and the restore pass a node's first write starts)
        yield self.redis.execute_command("CONFIG", "SET", "maxmemory", "1")
        try:
            yield self.assertFailure(node.join("room:r", "alice", "c1", {"name": "A"}),
                                     Exception)
        finally:
            yield self.redis.execute_command("CONFIG", "SET", "maxmemory", "0")
        self.assertEqual(list((yield node.list("room:r"))), [])
        yield node.heartbeat()
        self.assertEqual(list((yield node.list("room:r"))),
                         [PresenceUser("alice", {"name": "A"}, 1)])
        occupied = [e[:2] for e in (yield self.events()) if e[0] == "room.occupied"]
        self.assertEqual(occupied, [("room.occupied", "room:r")])

    @inlineCallbacks
    def test_presence_data_of_an_earlier_version_is_reported(self) -> Any:
        """
        A node that starts on a Redis holding the presence layout of a
        version before liveness by node says so at critical level (the
        upgrade is a full stop); on a clean Redis it says nothing.
        """
        from twisted.logger import LogLevel, globalLogPublisher

        critical: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.critical:
                critical.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        clean = self.node("n0")
        yield clean.start()
        self.addCleanup(clean.stop)
        yield clean.heartbeat()  # after the check's answer (one connection, in order)
        self.assertEqual(critical, [])
        yield self.redis.execute_command("SADD", "unrealon:p:rooms", "room:old")
        node = self.node("n1")
        yield node.start()
        self.addCleanup(node.stop)
        yield node.heartbeat()
        self.assertEqual([e["key"] for e in critical], ["unrealon:p:rooms"])

    @inlineCallbacks
    def test_redis_back_empty_every_live_node_restores(self) -> Any:
        """
        Redis restarts without its data: each running node's next heartbeat
        finds no record and puts its entries back, announced once each.
        """
        ttl = 1.5
        n1, n2 = self.node("n1", ttl), self.node("n2", ttl)
        yield n1.connect("alice", "c1")
        yield n1.join("room:x", "alice", "c1", {})
        yield n2.connect("bob", "c1")
        yield n2.join("room:x", "bob", "c1", {})
        for node in (n1, n2):
            yield node.start()
            self.addCleanup(node.stop)
        yield self.server.kill()
        yield self.server.start()

        def both_back() -> Deferred[bool]:
            return self.redis.execute_command("ZCARD", "unrealon:p:room:x:m").addCallback(
                lambda n: int(n) == 2)

        yield wait_until(both_back, timeout=10, what="both nodes' entries back")
        yield wait_until(lambda: self.redis.execute_command("ZCARD", "unrealon:p:__online__:m")
                         .addCallback(lambda n: int(n) == 2), timeout=10, what="online back")
        self.assertEqual([u.user_id for u in (yield n1.list("room:x"))], ["alice", "bob"])
        self.assertEqual(list((yield n2.online(["alice", "bob"]))), ["alice", "bob"])
        events = yield self.events()  # the new Redis' stream: the restores' events only
        self.assertEqual(sorted(e[:3] for e in events if e[0] == "user.online"),
                         [("user.online", "alice", "n1"), ("user.online", "bob", "n2")])
        self.assertEqual([e[:2] for e in events if e[0] == "room.occupied"],
                         [("room.occupied", "room:x")])
        self.assertEqual([e for e in events if e[3] is not None], [])  # nothing went offline
        self.flushLoggedErrors()

    # -- queries -------------------------------------------------------------------

    @inlineCallbacks
    def test_list_count_online_hide_a_dead_nodes_unswept_entries(self) -> Any:
        """
        A node whose liveness expired but that no sweep has removed yet:
        its users are not listed, counted or online; its entries are still
        in Redis.  Its heartbeat before the sweep makes them visible again,
        with nothing to restore.
        """
        live, dead = self.node("live"), self.node("dead")
        yield live.connect("alice", "c1")
        yield live.join("room:q", "alice", "c1", {})
        yield dead.connect("bob", "c1")
        yield dead.join("room:q", "bob", "c1", {})
        yield dead.connect("alice", "c2")
        yield dead.join("room:q", "alice", "c2", {})
        yield self.expire("dead")
        self.assertEqual(list((yield live.list("room:q"))), [PresenceUser("alice", {}, 1)])
        self.assertEqual((yield live.count("room:q")), PresenceCount(users=1, connections=1))
        self.assertEqual(list((yield live.online(["alice", "bob"]))), ["alice"])
        self.assertEqual(len((yield self.room_state("room:q"))[0]), 3)  # not swept
        yield dead.heartbeat()
        self.assertEqual((yield live.count("room:q")), PresenceCount(users=2, connections=3))
        self.assertEqual(list((yield live.online(["alice", "bob"]))), ["alice", "bob"])
        self.assertEqual([e[0] for e in (yield self.events()) if e[3]], [])
