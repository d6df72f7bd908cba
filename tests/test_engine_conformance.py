"""
One contract, two engines: the same tests run against the in-memory engine
and the Redis engine (a private redis-server per test).

The test body lives in L{EngineConformance}; L{MemoryEngineTests} and
L{RedisEngineTests} only say how to build a broker and a presence, how to let
time pass (a L{Clock} for memory, real seconds for Redis' own expiry) and how
to wait for what the engine hands its sink (synchronous for memory, through
the cluster feed for Redis).  Engine-specific behaviour (the feed's loss
detection, the presence sweep and heartbeat) is tested in the Redis subclass
only.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.helpers.cluster import FakeSink, redis_broker
from tests.helpers.redis_server import start_redis
from tests.helpers.replays import as_values
from tests.helpers.waiting import sleep, wait_until
from unrealon import jsoncodec
from unrealon.engine.interfaces import (
    EphemeralEvent,
    IBroker,
    IPresence,
    PresenceCount,
    PresenceUser,
    Recovery,
)
from unrealon.engine.memory import MemoryBroker, MemoryPresence

ROOM = "workspace:42"
#: rooms whose events the engine tests expect in their sink
HEARD = (ROOM, "workspace:x", "workspace:a", "workspace:b", "room:a", "room:b", "r",
         "session:7")


class EngineConformance:
    """
    The engine contract (interfaces.py, PROTOCOL.md sections 4 and 5).
    Mixed into a TestCase that provides L{make}, L{advance} and L{settle}.
    """

    sink: FakeSink
    broker: Any
    presence: Any

    # -- provided by the engine's subclass --------------------------------------

    def make(self, history_size: int = 5, history_ttl: float = 600,
             gap_wait: float = 2.0) -> Deferred[None]:
        """Build C{self.sink}, C{self.broker} and C{self.presence}, started."""
        raise NotImplementedError

    def advance(self, seconds: float) -> Deferred[None]:
        """Let C{seconds} pass for the engine's expiry."""
        raise NotImplementedError

    def beyond(self, cursor: str) -> str:
        """A cursor of the same epoch as C{cursor}, after any event published yet."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------

    def recover(self, room: str, since: str | None) -> Deferred[Recovery]:
        """C{self.broker.recover}, its events as values (L{as_values} checks stored texts)."""
        d: Deferred[Recovery] = self.broker.recover(room, since)
        return d.addCallback(as_values)

    @inlineCallbacks
    def publish_n(self, n: int, room: str = ROOM, start: int = 0) -> Any:
        cursors = []
        for i in range(start, start + n):
            cursor = yield self.broker.publish(room, "test.event", {"seq": i, "text": f"é{i}"})
            cursors.append(cursor)
        return cursors

    def delivered(self, n: int, room: str = ROOM) -> Deferred[None]:
        """Wait until the sink received C{n} events of C{room}."""
        return wait_until(
            lambda: len(self.sink.notifications(room)) >= n, what=f"{n} events of {room}"
        )

    def assertNotRecovered(self, recovery: Any) -> None:
        self.assertFalse(recovery.recovered)
        self.assertEqual(recovery.missed, ())

    # -- tests ---------------------------------------------------------------

    @inlineCallbacks
    def test_interfaces(self) -> Any:
        yield self.make()
        self.assertTrue(verifyObject(IBroker, self.broker))
        self.assertTrue(verifyObject(IPresence, self.presence))

    @inlineCallbacks
    def test_publish_returns_increasing_cursors(self) -> Any:
        """Each publish fires with a new cursor; cursor_key orders them."""
        yield self.make(history_size=100)
        cursors = yield self.publish_n(30)
        self.assertEqual(len(set(cursors)), 30)
        keys = [self.broker.cursor_key(c) for c in cursors]
        self.assertEqual(keys, sorted(keys))
        for before, after in itertools.pairwise(keys):
            self.assertLess(before, after)
        yield self.delivered(30)
        self.assertEqual([e.cursor for e in self.sink.events], cursors)

    @inlineCallbacks
    def test_cursor_key_unreadable(self) -> Any:
        yield self.make()
        for garbage in ("", "garbage", "-", ":", "x:1", "x:a-b", "abc-def", "x:1-²", "x-²", "x-",
                        "x:1-"):
            self.assertIsNone(self.broker.cursor_key(garbage), garbage)

    @inlineCallbacks
    def test_live_delivery_is_the_notification(self) -> Any:
        """The sink receives the JSON-RPC notification, cursor included."""
        yield self.make()
        data = {"path": "src/ä.py", "n": 1, "nested": {"list": [1, None, True]}}
        cursor = yield self.broker.publish(ROOM, "workspace.file_changed", data)
        yield self.delivered(1)
        [event] = self.sink.events
        self.assertEqual((event.room, event.cursor), (ROOM, cursor))
        self.assertEqual(
            json.loads(event.message),
            {
                "jsonrpc": "2.0",
                "method": "workspace.file_changed",
                "params": {"room": ROOM, "cursor": cursor, "data": data},
            },
        )

    @inlineCallbacks
    def test_recover_without_since(self) -> Any:
        """recover(None): the current cursor, recovered false, nothing missed."""
        yield self.make()
        cursors = yield self.publish_n(3)
        recovery = yield self.recover(ROOM, None)
        self.assertEqual(recovery.cursor, cursors[-1])
        self.assertNotRecovered(recovery)

    @inlineCallbacks
    def test_recover_since_replays_in_order(self) -> Any:
        """The events after since, in order, identical to live delivery."""
        yield self.make(history_size=10)
        cursors = yield self.publish_n(6)
        yield self.delivered(6)
        live = self.sink.notifications()
        for i, since in enumerate(cursors):
            recovery = yield self.recover(ROOM, since)
            self.assertTrue(recovery.recovered)
            self.assertEqual(list(recovery.missed), live[i + 1 :])
            self.assertEqual(recovery.cursor, cursors[-1])

    @inlineCallbacks
    def test_recover_since_current(self) -> Any:
        """since == the current cursor: recovered, nothing missed."""
        yield self.make()
        cursors = yield self.publish_n(2)
        recovery = yield self.recover(ROOM, cursors[-1])
        self.assertTrue(recovery.recovered)
        self.assertEqual(recovery.missed, ())
        self.assertEqual(recovery.cursor, cursors[-1])

    @inlineCallbacks
    def test_start_cursor_of_empty_room(self) -> Any:
        """An empty room's cursor ("the start") is a valid since later."""
        yield self.make()
        start = yield self.recover(ROOM, None)
        self.assertNotRecovered(start)
        again = yield self.recover(ROOM, start.cursor)
        self.assertTrue(again.recovered)
        self.assertEqual((again.cursor, again.missed), (start.cursor, ()))
        cursors = yield self.publish_n(3)
        yield self.delivered(3)
        recovery = yield self.recover(ROOM, start.cursor)
        self.assertTrue(recovery.recovered)
        self.assertEqual(list(recovery.missed), self.sink.notifications())
        self.assertEqual(recovery.cursor, cursors[-1])
        self.assertLess(self.broker.cursor_key(start.cursor), self.broker.cursor_key(cursors[0]))

    @inlineCallbacks
    def test_start_cursor_then_too_many(self) -> Any:
        yield self.make(history_size=5)
        start = yield self.recover(ROOM, None)
        yield self.publish_n(6)
        self.assertNotRecovered((yield self.recover(ROOM, start.cursor)))

    @inlineCallbacks
    def test_unknown_cursors(self) -> Any:
        """Garbage, unknown epochs, other rooms' and future cursors: recovered false."""
        yield self.make()
        other = yield self.broker.publish("workspace:other", "test.event", {})
        cursors = yield self.publish_n(3)
        epochless = "zz" + cursors[0][2:]
        for since in ("", "garbage", "0", "-", "abc:1-1", "deadbeef-3", other, epochless,
                      cursors[-1] + "x", "é" * 50, self.beyond(cursors[-1]), "x:²-1", "x-²",
                      "x:1-²", cursors[-1][:-1] + "²"):
            recovery = yield self.recover(ROOM, since)
            self.assertNotRecovered(recovery)
            self.assertEqual(recovery.cursor, cursors[-1], since)
        # other rooms' cursors mean nothing here, even for a room with no events
        self.assertNotRecovered((yield self.recover("workspace:fresh", cursors[0])))

    @inlineCallbacks
    def test_history_size_bound(self) -> Any:
        """Exactly history_size events after since replay; one more does not."""
        yield self.make(history_size=5)
        first = yield self.publish_n(1)
        yield self.publish_n(5, start=1)
        recovery = yield self.recover(ROOM, first[0])
        self.assertTrue(recovery.recovered)
        self.assertEqual([m["params"]["data"]["seq"] for m in recovery.missed], [1, 2, 3, 4, 5])
        cursors = yield self.publish_n(1, start=6)
        recovery = yield self.recover(ROOM, first[0])
        self.assertNotRecovered(recovery)
        self.assertEqual(recovery.cursor, cursors[-1])

    @inlineCallbacks
    def test_trimmed_history(self) -> Any:
        """A cursor far behind the retained history: recovered false, never partial."""
        yield self.make(history_size=5)
        old = yield self.publish_n(1)
        yield self.publish_n(250, start=1)
        for _ in range(3):
            recovery = yield self.recover(ROOM, old[0])
            self.assertNotRecovered(recovery)
        recent = yield self.publish_n(1, start=251)
        yield self.publish_n(4, start=252)
        recovery = yield self.recover(ROOM, recent[0])
        self.assertEqual([m["params"]["data"]["seq"] for m in recovery.missed],
                         [252, 253, 254, 255])

    @inlineCallbacks
    def test_expired_history(self) -> Any:
        """History older than its TTL is gone: new epoch, old cursors not recovered."""
        yield self.make(history_ttl=1)
        old = yield self.publish_n(2)
        yield self.advance(2.5)
        self.assertNotRecovered((yield self.recover(ROOM, old[0])))
        new = yield self.publish_n(2, start=2)
        self.assertNotEqual(self.broker.cursor_key(new[0])[0], self.broker.cursor_key(old[0])[0])
        self.assertNotRecovered((yield self.recover(ROOM, old[1])))
        recovery = yield self.recover(ROOM, new[0])
        self.assertTrue(recovery.recovered)
        self.assertEqual([m["params"]["data"]["seq"] for m in recovery.missed], [3])

    @inlineCallbacks
    def test_history_kept_while_active(self) -> Any:
        """Publishing keeps a room's history alive past one TTL."""
        yield self.make(history_ttl=2)
        first = yield self.publish_n(1)
        for i in range(3):
            yield self.advance(1.0)
            yield self.publish_n(1, start=i + 1)
        recovery = yield self.recover(ROOM, first[0])
        self.assertTrue(recovery.recovered)
        self.assertEqual(len(recovery.missed), 3)

    @inlineCallbacks
    def test_idempotent_publish(self) -> Any:
        """A second publish with the same key does nothing and gives the first cursor."""
        yield self.make()
        first = yield self.broker.publish(ROOM, "test.event", {"n": 1}, "entry-1")
        again = yield self.broker.publish(ROOM, "test.event", {"n": 2}, "entry-1")
        other = yield self.broker.publish(ROOM, "test.event", {"n": 3}, "entry-2")
        self.assertEqual(first, again)
        self.assertNotEqual(first, other)
        yield self.delivered(2)
        yield self.broker.publish(ROOM, "test.event", {"n": 4})
        yield self.delivered(3)
        self.assertEqual([m["params"]["data"]["n"] for m in self.sink.notifications()], [1, 3, 4])
        start = yield self.recover("workspace:x", None)
        yield self.broker.publish("workspace:x", "test.event", {}, "entry-3")
        recovery = yield self.recover("workspace:x", start.cursor)
        self.assertEqual(len(recovery.missed), 1)

    @inlineCallbacks
    def test_rooms_are_separate(self) -> Any:
        yield self.make()
        a = yield self.recover("workspace:a", None)
        yield self.publish_n(2, room="workspace:b")
        recovery = yield self.recover("workspace:a", a.cursor)
        self.assertTrue(recovery.recovered)
        self.assertEqual(recovery.missed, ())

    @inlineCallbacks
    def test_ephemeral_and_disconnect(self) -> Any:
        yield self.make()
        message = b'{"jsonrpc":"2.0","method":"x.y","params":{"room":"r","user_id":"u"}}'
        yield self.broker.publish_ephemeral(EphemeralEvent("r", message, exclude_user="u"))
        yield self.broker.disconnect_user("bob", "bye")
        yield wait_until(lambda: bool(self.sink.ephemeral and self.sink.disconnects))
        self.assertEqual(self.sink.ephemeral, [EphemeralEvent("r", message, exclude_user="u")])
        self.assertEqual(self.sink.disconnects, [("bob", "bye")])

    @inlineCallbacks
    def test_presence_first_in_last_out(self) -> Any:
        """joined for a user's first connection, left for its last, per user."""
        yield self.make()
        presence = self.presence
        alice, bob = "alice", "auth0|bob"
        yield presence.join(ROOM, alice, "c1", {"name": "Alice"})
        yield presence.join(ROOM, alice, "c2", {"name": "Alice"})
        yield presence.join(ROOM, alice, "c2", {"name": "Alice"})  # same connection again
        yield presence.join(ROOM, bob, "c3", {})
        yield wait_until(lambda: len(self.sink.ephemeral) >= 2, what="two joined")
        self.assertEqual(
            self.sink.presence(),
            [("presence.joined", ROOM, alice, alice), ("presence.joined", ROOM, bob, bob)],
        )
        joined = json.loads(self.sink.ephemeral[0].message)
        self.assertEqual(joined["params"]["info"], {"name": "Alice"})
        users = yield presence.list(ROOM)
        self.assertEqual(
            list(users),
            [PresenceUser(alice, {"name": "Alice"}, 2), PresenceUser(bob, {}, 1)],
        )
        self.assertEqual((yield presence.count(ROOM)), PresenceCount(users=2, connections=3))
        yield presence.leave(ROOM, alice, "c1")
        yield presence.leave(ROOM, alice, "c1")  # twice: nothing
        yield presence.leave(ROOM, bob, "c3")
        yield wait_until(lambda: len(self.sink.ephemeral) >= 3, what="bob left")
        yield presence.leave(ROOM, alice, "c2")
        yield wait_until(lambda: len(self.sink.ephemeral) >= 4, what="alice left")
        self.assertEqual(
            self.sink.presence()[2:],
            [("presence.left", ROOM, bob, bob), ("presence.left", ROOM, alice, alice)],
        )
        self.assertEqual(list((yield presence.list(ROOM))), [])
        self.assertEqual((yield presence.count(ROOM)), PresenceCount(users=0, connections=0))
        # a user who comes back is announced again
        yield presence.join(ROOM, alice, "c4", {})
        yield wait_until(lambda: len(self.sink.ephemeral) >= 5, what="alice back")
        self.assertEqual(self.sink.presence()[4], ("presence.joined", ROOM, alice, alice))

    @inlineCallbacks
    def test_leave_before_join_cancels_it(self) -> Any:
        """
        A connection that closed while its join waited on the store: its leave
        comes first, and the late join must not leave it present for ever.
        """
        yield self.make()
        yield self.presence.leave(ROOM, "ghost", "c1")
        yield self.presence.join(ROOM, "ghost", "c1", {})
        self.assertEqual(list((yield self.presence.list(ROOM))), [])
        # the same connection may join (and so be present) afterwards
        yield self.presence.join(ROOM, "ghost", "c1", {})
        self.assertEqual([u.user_id for u in (yield self.presence.list(ROOM))], ["ghost"])
        yield self.presence.leave(ROOM, "ghost", "c1")
        yield self.presence.join(ROOM, "ghost", "c1", {})
        self.assertEqual([u.user_id for u in (yield self.presence.list(ROOM))], ["ghost"])

    @inlineCallbacks
    def test_presence_rooms_are_separate(self) -> Any:
        yield self.make()
        yield self.presence.join("room:a", "alice", "c1", {})
        yield self.presence.join("room:b", "alice", "c1", {})
        yield wait_until(lambda: len(self.sink.ephemeral) >= 2)
        self.assertEqual([p[1] for p in self.sink.presence()], ["room:a", "room:b"])
        yield self.presence.leave("room:a", "alice", "c1")
        self.assertEqual(len((yield self.presence.list("room:b"))), 1)
        self.assertEqual(len((yield self.presence.list("room:a"))), 0)

    @inlineCallbacks
    def test_online(self) -> Any:
        """online(): users with a connection anywhere; connect/disconnect never announce."""
        yield self.make()
        presence = self.presence
        self.assertEqual(list((yield presence.online([]))), [])
        yield presence.connect("alice", "c1")
        yield presence.connect("alice", "c2")
        yield presence.connect("auth0|carol", "c3")
        online = yield presence.online(["alice", "bob", "auth0|carol"])
        self.assertEqual(list(online), ["alice", "auth0|carol"])
        yield presence.disconnect("alice", "c1")
        self.assertEqual(list((yield presence.online(["alice"]))), ["alice"])
        yield presence.disconnect("alice", "c2")
        yield presence.disconnect("alice", "c2")
        self.assertEqual(list((yield presence.online(["alice", "auth0|carol"]))), ["auth0|carol"])
        # let anything in flight through the feed, then: nothing announced
        yield self.broker.publish(ROOM, "test.event", {})
        yield self.delivered(1)
        self.assertEqual(self.sink.ephemeral, [])


class MemoryEngineTests(EngineConformance, TestCase):
    """The contract, in one process, on a L{Clock}."""

    def make(self, history_size: int = 5, history_ttl: float = 600,
             gap_wait: float = 2.0, count_chunk: Any = lambda outcome: None) -> Deferred[None]:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.sink = FakeSink()
        self.broker = MemoryBroker(
            self.clock, self.sink, history_size=history_size, history_ttl=history_ttl,
            gap_wait=gap_wait, count_chunk=count_chunk,
        )
        self.presence = MemoryPresence(self.broker.publish_ephemeral)
        self.broker.start()
        self.presence.start()
        self.addCleanup(self.broker.stop)
        self.addCleanup(self.presence.stop)
        return Deferred.fromCoroutine(_nothing())

    def advance(self, seconds: float) -> Deferred[None]:
        for _ in range(int(seconds * 10)):
            self.clock.advance(0.1)
        return Deferred.fromCoroutine(_nothing())

    def beyond(self, cursor: str) -> str:
        epoch, _, seq = cursor.rpartition("-")
        return f"{epoch}-{int(seq) + 100}"


async def _nothing() -> None:
    return None


class RedisEngineTests(EngineConformance, TestCase):
    """The contract on a private redis-server, plus the Redis engine's own duties."""

    presence_ttl = 30.0

    @inlineCallbacks
    def make(self, history_size: int = 5, history_ttl: float = 600,
             gap_wait: float = 2.0, count_chunk: Any = lambda outcome: None) -> Any:
        from unrealon.engine.redis import RedisConnections
        from unrealon.engine.redispresence import RedisPresence

        self.server = yield start_redis(self)
        self.connections = RedisConnections.open(self.server.url, reactor)
        self.addCleanup(self.connections.stop)
        yield self.connections.start()
        self.sink = FakeSink()
        self.broker = redis_broker(
            self.sink, self.connections.commands, self.connections.feed_reader, self.server.url,
            history_size=history_size, history_ttl=history_ttl, gap_wait=gap_wait,
            count_chunk=count_chunk,
        )
        self.presence = RedisPresence(reactor, self.connections.commands, ttl=self.presence_ttl)
        yield self.broker.start()
        self.addCleanup(self.broker.stop)
        # the rooms these tests watch the sink of: a node hears a room's
        # events only while it has a member there (interest routing)
        yield gatherResults([self.broker.watch(room) for room in HEARD])
        yield self.presence.start()
        self.addCleanup(self.presence.stop)

    def advance(self, seconds: float) -> Deferred[None]:
        return sleep(seconds)

    def beyond(self, cursor: str) -> str:
        epoch, _, stream_id = cursor.partition(":")
        return f"{epoch}:{int(stream_id.split('-')[0]) + 100_000}-0"

    # -- the Redis engine's own duties -----------------------------------------

    @inlineCallbacks
    def test_replayed_events_are_the_stored_text(self) -> Any:
        """
        A rejoin's missed events come as the text Redis stored, the very
        bytes live delivery sent: a join's reply copies them, nothing
        decodes them.
        """
        yield self.make()
        start = yield self.broker.recover(ROOM, None)
        yield self.broker.publish(ROOM, "test.event", {"seq": 0, "text": 'a "/" b\n', "n": None})
        yield self.publish_n(2, start=1)
        yield self.delivered(3)
        recovery = yield self.broker.recover(ROOM, start.cursor)
        self.assertTrue(all(isinstance(m, jsoncodec.RawJSON) for m in recovery.missed))
        self.assertEqual([m.text.encode() for m in recovery.missed],
                         [e.message for e in self.sink.events if e.room == ROOM])
        self.assertEqual(as_values(recovery).missed, tuple(self.sink.notifications(ROOM)))

    @inlineCallbacks
    def test_recoveries_of_one_turn_are_few_calls(self) -> Any:
        """
        The history reads of one turn's joins go as one script call per
        ROOMS_PER_CALL rooms, each room still its own snapshot with its own
        answer.
        """
        from unrealon.engine import scripts
        from unrealon.engine.recoveries import ROOMS_PER_CALL

        yield self.make(history_size=10)
        rooms = [f"storm:{i}" for i in range(120)]
        starts = yield gatherResults([self.recover(room, None) for room in rooms])
        for i, room in enumerate(rooms):
            yield self.publish_n(i % 12, room=room)  # 11 or more: beyond the history
        original = scripts.RECOVER
        sent: list[int] = []

        def counting(redis: Any, keys: Any, args: Any) -> Any:
            sent.append(len(keys) // 3)  # rooms in this call
            return original(redis, keys, args)

        self.patch(scripts, "RECOVER", counting)
        recoveries = yield gatherResults([
            self.recover(room, start.cursor)
            for room, start in zip(rooms, starts, strict=True)
        ])
        full, rest = divmod(len(rooms), ROOMS_PER_CALL)
        self.assertEqual(sent, [ROOMS_PER_CALL] * full + ([rest] if rest else []))
        for i, recovery in enumerate(recoveries):
            count = i % 12
            if count > 10:
                self.assertNotRecovered(recovery)
            else:
                self.assertTrue(recovery.recovered)
                self.assertEqual([m["params"]["data"]["seq"] for m in recovery.missed],
                                 list(range(count)))
                self.assertEqual(recovery.missed[-1]["params"]["room"] if count else rooms[i],
                                 rooms[i])

    @inlineCallbacks
    def test_same_reads_of_one_turn_are_read_once(self) -> Any:
        """
        Rejoins of one room with one cursor in one turn (members who dropped
        together) read the history once; each gets the whole answer.  Other
        cursors, and a later turn, read again.
        """
        from unrealon.engine import scripts

        yield self.make(history_size=10)
        start = yield self.recover(ROOM, None)
        cursors = yield self.publish_n(4)
        original = scripts.RECOVER
        sent: list[list[Any]] = []

        def counting(redis: Any, keys: Any, args: Any) -> Any:
            sent.append(args[3:])  # since epoch, since id, tag: per room read
            return original(redis, keys, args)

        self.patch(scripts, "RECOVER", counting)
        sinces = [start.cursor] * 5 + [cursors[1]] * 3 + [None, start.cursor]
        recoveries = yield gatherResults([self.recover(ROOM, since) for since in sinces])
        self.assertEqual(len(sent), 1)
        self.assertEqual(len(sent[0]), 3 * 3)  # three reads: start, cursors[1], none
        for since, recovery in zip(sinces, recoveries, strict=True):
            seqs = [m["params"]["data"]["seq"] for m in recovery.missed]
            self.assertEqual(recovery.cursor, cursors[-1])
            if since is None:
                self.assertEqual((recovery.recovered, seqs), (False, []))
            else:
                self.assertEqual((recovery.recovered, seqs),
                                 (True, [0, 1, 2, 3] if since == start.cursor else [2, 3]))
        again = yield self.recover(ROOM, start.cursor)
        self.assertEqual(len(sent), 2)
        self.assertEqual(len(again.missed), 4)

    @inlineCallbacks
    def test_presence_changes_of_one_turn_are_one_call(self) -> Any:
        """
        A reconnect storm's joins (and leaves) made in one reactor turn reach
        Redis as one script call, applied in the order they were made.
        """
        from unrealon.engine import scripts

        yield self.make()
        original = scripts.PRESENCE_CHANGES
        sent: list[int] = []

        def counting(redis: Any, keys: Any, args: Any) -> Any:
            sent.append((len(args) - 8) // 6)  # changes in this call
            return original(redis, keys, args)

        self.patch(scripts, "PRESENCE_CHANGES", counting)
        yield gatherResults([self.presence.join(ROOM, f"u{i}", f"c{i}", {"n": i})
                             for i in range(300)])
        self.assertEqual(sent, [300])
        self.assertEqual((yield self.presence.count(ROOM)).connections, 300)
        # a join and the leave of the same connection in one turn: the leave wins
        yield gatherResults([
            self.presence.join(ROOM, "late", "c-late", {}),
            self.presence.leave(ROOM, "late", "c-late"),
            *[self.presence.leave(ROOM, f"u{i}", f"c{i}") for i in range(300)],
        ])
        self.assertEqual(sent, [300, 302])
        self.assertEqual((yield self.presence.count(ROOM)).connections, 0)

    def second_presence(self, ttl: float) -> Any:
        """Another node's presence (own connection) on the same Redis."""
        from unrealon.engine.redisclient import connect, parse_redis_url
        from unrealon.engine.redispresence import RedisPresence

        redis = connect(parse_redis_url(self.server.url))
        self.addCleanup(redis.disconnect)
        presence = RedisPresence(reactor, redis, ttl=ttl)
        return presence

    @inlineCallbacks
    def test_crashed_node_users_leave(self) -> Any:
        """A node that stops heartbeating: its users leave within the TTL, announced."""
        yield self.make()
        # this test's nodes use a short TTL; the default presence must not
        # hold the sweep lock (a cluster's nodes share one TTL)
        yield self.presence.stop()
        yield self.connections.commands.execute_command("DEL", "unrealon:p:sweeper")
        ttl = 1.5
        crashed = self.second_presence(ttl)
        survivor = self.second_presence(ttl)
        yield crashed.join(ROOM, "auth0|gone", "c1", {"n": 1})
        yield survivor.join(ROOM, "stays", "c2", {})
        yield crashed.connect("auth0|gone", "c1")
        started = time.monotonic()
        survivor.start()
        self.addCleanup(survivor.stop)
        yield wait_until(
            lambda: ("presence.left", ROOM, "auth0|gone", "auth0|gone") in self.sink.presence(),
            timeout=ttl + 2, what="presence.left",
        )
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, ttl + 0.5)
        users = yield survivor.list(ROOM)
        self.assertEqual([u.user_id for u in users], ["stays"])
        self.assertEqual(list((yield survivor.online(["auth0|gone"]))), [])
        self.assertEqual(
            [p[0] for p in self.sink.presence()],
            ["presence.joined", "presence.joined", "presence.left"],
        )

    @inlineCallbacks
    def test_same_connection_id_on_two_nodes(self) -> Any:
        """
        Connection ids are per process (every node has a "c1"): one user's
        connections on two nodes are two connections, announced once, left once.
        """
        yield self.make()
        node1, node2 = self.second_presence(30), self.second_presence(30)
        yield node1.join(ROOM, "alice", "c1", {})
        yield node2.join(ROOM, "alice", "c1", {})
        self.assertEqual(list((yield node1.list(ROOM))), [PresenceUser("alice", {}, 2)])
        yield node1.leave(ROOM, "alice", "c1")
        self.assertEqual(list((yield node2.list(ROOM))), [PresenceUser("alice", {}, 1)])
        yield node2.leave(ROOM, "alice", "c1")
        yield wait_until(lambda: len(self.sink.ephemeral) >= 2, what="left")
        self.assertEqual(
            [p[0] for p in self.sink.presence()], ["presence.joined", "presence.left"]
        )
        yield node1.connect("bob", "c9")
        yield node2.connect("bob", "c9")
        yield node1.disconnect("bob", "c9")
        self.assertEqual(list((yield node1.online(["bob"]))), ["bob"])

    @inlineCallbacks
    def alice_expiry(self) -> Any:
        """
        When alice's presence entry in ROOM expires (ms), as the last
        heartbeat set it: liveness is per node, so that is when the liveness
        record of the node holding her entry expires.
        """
        redis = self.connections.commands
        members = yield redis.execute_command("ZRANGE", f"unrealon:p:{ROOM}:m", 0, -1)
        token = next(str(m).rpartition("@")[2] for m in members if str(m).startswith("alice|"))
        expires = yield redis.execute_command("ZSCORE", "unrealon:p:alive", token)
        return float(expires)

    @inlineCallbacks
    def test_redis_hang_does_not_make_everyone_leave(self) -> Any:
        """
        Redis hangs longer than an entry's lifetime: no node could heartbeat,
        so when it answers again the sweep must not announce every user left.
        """
        yield self.make()
        yield self.presence.stop()
        yield self.connections.commands.execute_command("DEL", "unrealon:p:sweeper")
        node = self.second_presence(1.5)
        yield node.join(ROOM, "alice", "c1", {})
        node.start()
        self.addCleanup(node.stop)
        yield sleep(0.4)  # a heartbeat or so before the hang
        before = yield self.alice_expiry()
        self.server.pause()
        yield sleep(1.6)  # > the entries' lifetime (1.125 s)
        self.server.resume()
        # a heartbeat after the hang renewed alice; a sweep that ran before it
        # would have announced her leaving before the marker below
        yield wait_until(lambda: self.alice_expiry().addCallback(lambda e: e > before + 1600),
                         what="alice renewed after the hang")
        yield self.broker.publish(ROOM, "test.event", {})
        yield self.delivered(1)
        self.assertEqual(self.sink.presence(), [("presence.joined", ROOM, "alice", "alice")])
        self.assertEqual([u.user_id for u in (yield node.list(ROOM))], ["alice"])

    @inlineCallbacks
    def test_heartbeat_restores_swept_entries(self) -> Any:
        """
        A live node whose entries were swept (it could not heartbeat in time:
        a Redis outage, a long pause) puts them back and announces the users
        again, instead of staying invisible while connected.
        """
        yield self.make()
        node = self.second_presence(3.0)
        yield node.join(ROOM, "alice", "c1", {"name": "A"})
        yield node.connect("alice", "c1")
        # what the sweep does to a node that missed its heartbeats (or what a
        # Redis that lost its data looks like)
        keys = yield self.connections.commands.execute_command("KEYS", "unrealon:p:*")
        yield self.connections.commands.execute_command("DEL", *keys)
        self.assertEqual(list((yield node.list(ROOM))), [])
        yield node.heartbeat()
        self.assertEqual(list((yield node.list(ROOM))), [PresenceUser("alice", {"name": "A"}, 1)])
        self.assertEqual(list((yield node.online(["alice"]))), ["alice"])
        yield wait_until(lambda: len(self.sink.ephemeral) >= 1)
        self.assertEqual(self.sink.presence()[-1], ("presence.joined", ROOM, "alice", "alice"))
        yield node.leave(ROOM, "alice", "c1")
        yield node.heartbeat()
        self.assertEqual(list((yield node.list(ROOM))), [])

    @inlineCallbacks
    def test_trimmed_history_exact_trim(self) -> Any:
        """
        History trimmed to exactly history_size (approximate trimming can
        leave that few: here every stream node holds one entry): a cursor
        whose entry was trimmed with later ones never gets a partial replay.
        """
        yield self.make(history_size=5)
        yield self.connections.commands.execute_command(
            "CONFIG", "SET", "stream-node-max-entries", "1"
        )
        old = yield self.publish_n(1)
        yield self.publish_n(6, start=1)
        self.assertNotRecovered((yield self.recover(ROOM, old[0])))
        second = yield self.recover(ROOM, None)
        yield self.publish_n(5, start=7)
        recovery = yield self.recover(ROOM, second.cursor)
        self.assertEqual([m["params"]["data"]["seq"] for m in recovery.missed], [7, 8, 9, 10, 11])

    @inlineCallbacks
    def test_feed_survives_redis_restart_with_data(self) -> Any:
        """A persistent Redis restarts: the feed resumes from its position, nothing lost."""
        from unrealon.engine.redis import RedisConnections

        self.server = yield start_redis(self, persistent=True)
        self.connections = RedisConnections.open(self.server.url, reactor)
        self.addCleanup(self.connections.stop)
        yield self.connections.start()
        self.sink = FakeSink()
        self.broker = redis_broker(
            self.sink, self.connections.commands, self.connections.feed_reader, self.server.url,
            history_size=100, history_ttl=600,
        )
        yield self.broker.start()
        self.addCleanup(self.broker.stop)
        yield self.broker.watch(ROOM)
        yield self.publish_n(5)
        yield self.delivered(5)
        yield self.server.stop()
        yield self.server.start()
        cursors = yield self.publish_n(5, start=5)
        yield self.delivered(10)
        self.assertEqual([e.cursor for e in self.sink.events][5:], cursors)
        self.assertEqual(self.sink.resyncs, [])

    @inlineCallbacks
    def test_feed_loss_makes_clients_recover(self) -> Any:
        """Redis comes back empty: the node cannot prove continuity, so it resyncs."""
        from unrealon.engine.redisclient import connect, parse_redis_url

        yield self.make()
        yield self.publish_n(3)
        yield self.delivered(3)
        yield self.server.kill()
        yield wait_until(lambda: not self.broker.feed_ok, what="the feed read failing")
        yield self.server.start()
        # another node publishes first on the new, empty Redis (this node's
        # connections are still waiting to reconnect)
        other = connect(parse_redis_url(self.server.url))
        self.addCleanup(other.disconnect)
        other_broker = redis_broker(FakeSink(), other, other, self.server.url,
                                    history_size=5, history_ttl=600)
        yield other_broker.publish(ROOM, "test.event", {"seq": 3})
        # the feed (disconnect orders) and the room (its channel's position
        # is in a history that is gone) both make their clients recover
        yield wait_until(lambda: None in self.sink.resyncs and [ROOM] in self.sink.resyncs,
                         what="resync of the feed and of the room")
        # and the node hears the room again from there on
        yield self.publish_n(1, start=4)
        yield wait_until(lambda: self.sink.notifications()[-1]["params"]["data"]["seq"] == 4)
