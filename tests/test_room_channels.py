"""
Interest routing on a real redis-server (unrealon.engine.roomchannels).

A node hears a room only while it has members there (the hub's watch and
unwatch); events a node hears follow the room's history without gap or
duplicate even when its subscriber connection is killed mid-stream (it
repairs the gap from the history, and clients see nothing); when the
history no longer covers a gap, the room's clients are sent to recover.

Each test runs one engine (the node under test, its sink a L{FakeSink})
and publishes through a second broker on its own connection, as another
node would.  The subscriber connection is killed with CLIENT KILL TYPE
pubsub: on this private Redis the node's is the only one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers.cluster import FakeSink, redis_broker
from tests.helpers.redis_server import start_redis
from tests.helpers.streams import Reader
from tests.helpers.waiting import sleep, wait_until
from unrealon.engine.interfaces import EphemeralEvent, MessageChunk
from unrealon.engine.redisclient import connect, parse_redis_url

ROOM = "workspace:7"
OTHER = "workspace:8"
EVENT = "test.event"


class EngineCase(TestCase):
    """One engine under test on a private Redis, and a publisher beside it."""

    timeout = 60

    @inlineCallbacks
    def make(self, history_size: int = 1000, grace: float = 5.0) -> Any:
        from unrealon.engine.redis import RedisConnections

        self.server = yield start_redis(self)
        self.connections = RedisConnections.open(self.server.url, reactor, "under-test")
        self.addCleanup(self.connections.stop)
        yield self.connections.start()
        self.sink = FakeSink()
        self.broker = redis_broker(
            self.sink, self.connections.commands, self.connections.feed_reader, self.server.url,
            history_size=history_size, history_ttl=600, room_grace=grace,
        )
        yield self.broker.start()
        self.addCleanup(self.broker.stop)
        self.channels = self.broker.channels
        # another node, publishing
        self.redis = connect(parse_redis_url(self.server.url))
        self.addCleanup(self.redis.disconnect)
        self.publisher = redis_broker(FakeSink(), self.redis, self.redis, self.server.url,
                                      history_size=history_size, history_ttl=600)

    def seqs(self, room: str = ROOM) -> list[int]:
        return [n["params"]["data"]["seq"] for n in self.sink.notifications(room)]

    @inlineCallbacks
    def publish(self, seqs: range, room: str = ROOM, pace: float = 0.0) -> Any:
        cursors = []
        for seq in seqs:
            cursor = yield self.publisher.publish(room, EVENT, {"seq": seq})
            cursors.append(cursor)
            if pace:
                yield sleep(pace)
        return cursors

    def subscribers(self, room: str) -> Deferred[int]:
        from unrealon.engine.rediskeys import room_channel, room_channel_prefix

        d = self.redis.execute_command("PUBSUB", "NUMSUB",
                                       room_channel(room_channel_prefix(0), room))
        return d.addCallback(lambda reply: int(reply[1]))

    def kill_subscriber(self) -> Deferred[Any]:
        return self.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


class RoomChannelTests(EngineCase):
    # -- interest --------------------------------------------------------------------

    @inlineCallbacks
    def test_only_watched_rooms_reach_the_node(self) -> Any:
        """Events and presence of a room without local members never arrive at all."""
        yield self.make()
        yield self.broker.watch(ROOM)
        for seq in range(50):
            yield self.publisher.publish(OTHER, EVENT, {"seq": seq})
            yield self.publisher.publish(ROOM, EVENT, {"seq": seq})
        message = b'{"jsonrpc":"2.0","method":"presence.joined","params":{}}'
        yield self.publisher.publish_ephemeral(EphemeralEvent(OTHER, message))
        yield self.publisher.publish_ephemeral(EphemeralEvent(ROOM, message))
        yield wait_until(lambda: len(self.sink.ephemeral) == 1, what="the presence event")
        self.assertEqual(self.seqs(), list(range(50)))
        self.assertEqual(self.sink.notifications(OTHER), [])
        self.assertEqual([e.room for e in self.sink.ephemeral], [ROOM])
        # not received and skipped: never received (one message per event of ROOM)
        self.assertEqual(self.channels.received, 51)
        self.assertEqual((yield self.subscribers(OTHER)), 0)

    @inlineCallbacks
    def test_last_member_gone_unsubscribes_after_grace(self) -> Any:
        yield self.make(grace=0.3)
        yield self.broker.watch(ROOM)
        self.broker.unwatch(ROOM)
        # still heard during the grace period (a browser reconnecting at once)
        yield self.publish(range(3))
        yield wait_until(lambda: self.seqs() == [0, 1, 2], what="events during the grace")
        yield wait_until(lambda: self.channels.room_count == 0, what="the room dropped")
        yield wait_until(lambda: self.subscribers(ROOM).addCallback(lambda n: n == 0),
                         what="the unsubscribe")
        yield self.publish(range(3, 6))
        yield self.broker.watch(OTHER)
        yield self.publish(range(1), room=OTHER)
        yield wait_until(lambda: self.seqs(OTHER) == [0], what="an event of the other room")
        self.assertEqual(self.seqs(), [0, 1, 2])

    @inlineCallbacks
    def test_member_back_within_grace_keeps_the_subscription(self) -> Any:
        yield self.make(grace=0.3)
        yield self.broker.watch(ROOM)
        self.broker.unwatch(ROOM)
        yield self.broker.watch(ROOM)
        yield sleep(0.6)
        self.assertEqual((yield self.subscribers(ROOM)), 1)
        yield self.publish(range(2))
        yield wait_until(lambda: self.seqs() == [0, 1], what="events after the grace")

    @inlineCallbacks
    def test_recovery_reads_only_once_the_channel_is_live(self) -> Any:
        """
        A join's read of the history waits for the subscription: every event
        after the cursor it returns arrives live, under a steady stream.
        """
        yield self.make()
        rooms = [f"join:{i}" for i in range(20)]
        publishing = Deferred.fromCoroutine(self._stream(rooms, 40))
        recoveries = []
        for room in rooms:
            self.broker.watch(room)
            recoveries.append((yield self.broker.recover(room, None)))
            yield sleep(0.003)
        cursors = yield publishing
        for room, recovery, published in zip(rooms, recoveries, cursors, strict=True):
            after = [c for c in published if _key(c) > _key(recovery.cursor)]
            yield wait_until(
                lambda room=room, after=after: set(after) <= {
                    e.cursor for e in self.sink.events if e.room == room},
                what=f"every event of {room} after the join's cursor")

    async def _stream(self, rooms: list[str], count: int) -> list[list[str]]:
        published: list[list[str]] = [[] for _ in rooms]
        for seq in range(count):
            for i, room in enumerate(rooms):
                published[i].append(await self.publisher.publish(room, EVENT, {"seq": seq}))
            await sleep(0.002)
        return published

    # -- gaps --------------------------------------------------------------------------

    @inlineCallbacks
    def test_subscriber_killed_mid_stream_is_repaired(self) -> Any:
        """Killed three times under a steady stream: every event once, in order, no resync."""
        yield self.make()
        yield self.broker.watch(ROOM)
        count = 600
        publishing = self.publish(range(count), pace=0.002)
        for _ in range(3):
            seen = len(self.sink.events)
            yield wait_until(lambda seen=seen: len(self.sink.events) >= seen + 50,
                             what="more events")
            yield self.kill_subscriber()
        cursors = yield publishing
        yield wait_until(lambda: len(self.sink.events) >= count, what="every event")
        yield self.publish(range(count, count + 1))  # nothing more comes before it
        yield wait_until(lambda: len(self.sink.events) == count + 1, what="the last event")
        self.assertEqual(self.seqs(), list(range(count + 1)))
        self.assertEqual([e.cursor for e in self.sink.events][:count], cursors)
        self.assertEqual(self.sink.resyncs, [])
        self.assertGreaterEqual(self.channels.repaired, 1)

    @inlineCallbacks
    def test_gap_beyond_history_makes_the_room_recover(self) -> Any:
        yield self.make(history_size=5)
        yield self.broker.watch(ROOM)
        yield self.publish(range(3))
        yield wait_until(lambda: self.seqs() == [0, 1, 2], what="the first events")
        yield self.kill_subscriber()
        # more than the history holds, before the node is back (0.1 s at least)
        yield self.publish(range(3, 30))
        yield wait_until(lambda: self.sink.resyncs == [[ROOM]], what="the room's resync")
        self.assertEqual(self.channels.resynced, 1)
        # and it is heard again from there on
        yield self.publish(range(30, 32))
        yield wait_until(lambda: self.seqs()[-2:] == [30, 31], what="later events")
        self.assertEqual([s for s in self.seqs() if s < 30], [0, 1, 2])

    @inlineCallbacks
    def test_a_new_history_is_not_a_gap(self) -> Any:
        """A room's history expired while quiet: its next event starts anew, delivered."""
        from unrealon.engine.rediskeys import epoch_key, history_key

        yield self.make()
        yield self.broker.watch(ROOM)
        yield self.publish(range(2))
        yield wait_until(lambda: self.seqs() == [0, 1], what="the first events")
        yield self.redis.execute_command("DEL", history_key(ROOM), epoch_key(ROOM))
        yield self.publish(range(2, 4))
        yield wait_until(lambda: self.seqs() == [0, 1, 2, 3], what="the new history's events")
        self.assertEqual((self.channels.repaired, self.sink.resyncs), (0, []))

    @inlineCallbacks
    def test_quiet_room_resubscribed_finds_what_was_published_while_away(self) -> Any:
        """
        No event had come yet: the subscription's starting position (read
        when it became live) is where the repair starts.
        """
        yield self.make()
        yield self.broker.watch(ROOM)
        yield sleep(0.1)  # its starting position is read
        yield self.kill_subscriber()
        yield self.publish(range(3))
        yield wait_until(lambda: self.seqs() == [0, 1, 2], what="the events published away")
        self.assertEqual(self.sink.resyncs, [])

    @inlineCallbacks
    def test_streamed_message_repaired_in_one_event(self) -> Any:
        """
        Chunks delivered while the node was away come back compacted: the
        client rules give the exact text, and no rule of section 5.1 breaks.
        """
        yield self.make()
        yield self.broker.watch(ROOM)
        texts = [f"[{seq}]tok " for seq in range(400)]

        async def stream() -> None:
            for seq, text in enumerate(texts):
                await self.publisher.append_chunk(ROOM, "session.message", MessageChunk(
                    message_id="m1", seq=seq, content=text, done=seq == len(texts) - 1,
                    fields={"session_id": "s", "message_id": "m1", "role": "assistant"}))
                await sleep(0.002)

        streaming = Deferred.fromCoroutine(stream())
        for _ in range(2):
            seen = len(self.sink.events)
            yield wait_until(lambda seen=seen: len(self.sink.events) >= seen + 40,
                             what="more chunks")
            yield self.kill_subscriber()
        yield streaming
        reader = Reader("r")
        yield wait_until(lambda: any(n["params"]["data"]["done"]
                                     for n in self.sink.notifications()), what="done")
        for n in self.sink.notifications():
            reader.event("r#1", "live", n["params"])
        self.assertEqual(reader.violations, [])
        self.assertEqual(reader.text(ROOM, "m1"), "".join(texts))
        self.assertLess(len(self.sink.events), len(texts))  # some came compacted
        self.assertEqual(self.sink.resyncs, [])


def _key(cursor: str) -> tuple[int, int]:
    ms, _, seq = cursor.partition(":")[2].partition("-")
    return int(ms), int(seq)


class RoomChannelGapTests(EngineCase):
    """The gap checks of a live subscription (no reconnect involved)."""

    @inlineCallbacks
    def test_event_missing_from_the_channel_is_repaired_from_history(self) -> Any:
        """
        An event that reached the history but not the channel (as when a
        message is lost while the connection stays up): the next event does
        not follow the node's position, so the node reads the missing one
        from the history and delivers both, in order.
        """
        yield self.make(history_size=100)
        # publishes into the history, announcing on a channel nobody hears
        lossy = redis_broker(FakeSink(), self.redis, self.redis, self.server.url,
                             history_size=100, history_ttl=600, channel_prefix="lost:")
        yield self.broker.watch(ROOM)
        yield self.publisher.publish(ROOM, EVENT, {"seq": 0})
        yield lossy.publish(ROOM, EVENT, {"seq": 1})
        yield lossy.publish(ROOM, EVENT, {"seq": 2})
        yield self.publish(range(3, 5))
        yield wait_until(lambda: len(self.sink.events) == 5, what="five events")
        self.assertEqual(self.seqs(), [0, 1, 2, 3, 4])
        self.assertEqual((self.channels.repaired, self.sink.resyncs), (1, []))

    @inlineCallbacks
    def test_join_while_the_subscriber_reconnects_waits_for_it(self) -> Any:
        """
        A room's first member joins while the subscriber connection is
        down: the join's history read waits until the channel is live, so
        what is published meanwhile reaches the node.
        """
        yield self.make(history_size=100)
        yield self.broker.watch(OTHER)
        yield self.kill_subscriber()
        self.broker.watch(ROOM)
        recovering = self.broker.recover(ROOM, None)
        published = yield self.publish(range(5))
        recovery = yield recovering
        after = [c for c in published if _key(c) > _key(recovery.cursor)]
        yield self.publish(range(5, 6))
        yield wait_until(lambda: 5 in self.seqs(), what="the last event")
        self.assertEqual([e.cursor for e in self.sink.events][:-1], after)


class _Connection:
    """A subscriber connection that records what it was asked (no Redis)."""

    def __init__(self) -> None:
        self.listener: Any = None
        self.subscribed: list[list[bytes]] = []
        self.unsubscribed: list[list[bytes]] = []

    def start(self, listener: Any) -> None:
        self.listener = listener

    def stop(self) -> Deferred[None]:
        return succeed(None)

    # the protocol's side
    def subscribe(self, channels: list[bytes]) -> None:
        self.subscribed.append(list(channels))

    def unsubscribe(self, channels: list[bytes]) -> None:
        self.unsubscribed.append(list(channels))


class RoomChannelStateTests(SynchronousTestCase):
    """
    The subscription's state on a fake connection and a clock: what is
    queued while a repair reads, what is dropped, what is sent to Redis.
    """

    def setUp(self) -> None:
        from unrealon.engine.roomchannels import RoomChannels

        self.clock = Clock()
        self.sink = FakeSink()
        self.connection = _Connection()
        self.repairs: list[tuple[str, str, Deferred[Any]]] = []
        self.channels = RoomChannels(
            self.clock, self.sink, self.connection, "p:",  # type: ignore[arg-type]
            repair=self._repair, position_of=lambda room: Deferred(), grace=1.0,
        )
        self.channels.start()
        self.connection.listener.connected(self.connection)

    def _repair(self, room: str, since: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.repairs.append((room, since, d))
        return d

    def live(self, room: str = ROOM) -> None:
        self.channels.watch(room)
        self.clock.advance(0)
        self.channels.subscribed(f"p:{{{room}}}".encode())

    def event(self, previous: str, last: str, room: str = ROOM, epoch: str = "E") -> None:
        message = f'{{"n":"{last}"}}'
        self.channels.message(f"p:{{{room}}}".encode(),
                              f"e{previous}\n{epoch}:{last}\n{message}".encode())

    def delivered(self) -> list[str]:
        return [e.cursor.partition(":")[2] for e in self.sink.events]

    def test_one_subscribe_per_turn(self) -> None:
        for room in ("a", "b", "c"):
            self.channels.watch(room)
        self.assertEqual(self.connection.subscribed, [])
        self.clock.advance(0)
        self.assertEqual(self.connection.subscribed, [[b"p:{a}", b"p:{b}", b"p:{c}"]])

    def test_join_waits_for_the_confirmation(self) -> None:
        ready = self.channels.watch(ROOM)
        self.clock.advance(0)
        self.event("0-0", "1-0")  # published before the subscription: the replay has it
        self.assertNoResult(ready)
        self.channels.subscribed(f"p:{{{ROOM}}}".encode())
        self.successResultOf(ready)
        self.assertEqual(self.sink.events, [])

    def test_gap_repaired_then_queued_events_without_duplicates(self) -> None:
        from unrealon.engine.roomchannels import Repair

        self.live()
        self.event("0-0", "1-0")
        self.event("3-0", "4-0")  # 2-0 and 3-0 were lost
        self.event("4-0", "5-0")  # queued behind the repair
        self.assertEqual(self.delivered(), ["1-0"])
        [(room, since, reading)] = self.repairs
        self.assertEqual((room, since), (ROOM, "E:1-0"))
        # the repair read the history after 5-0 was published: 5-0 comes twice
        reading.callback(Repair(cursor="E:5-0", recovered=True, missed=(
            ("E:2-0", b"2"), ("E:3-0", b"3"), ("E:4-0", b"4"), ("E:5-0", b"5"))))
        self.event("5-0", "6-0")
        self.assertEqual(self.delivered(), ["1-0", "2-0", "3-0", "4-0", "5-0", "6-0"])
        self.assertEqual((self.channels.repaired, self.sink.resyncs), (1, []))

    def test_unrepairable_gap_resyncs_the_room(self) -> None:
        from unrealon.engine.roomchannels import Repair

        self.live()
        self.event("0-0", "1-0")
        self.event("8-0", "9-0")
        [(_, _, reading)] = self.repairs
        reading.callback(Repair(cursor="E:9-0", recovered=False))
        self.event("9-0", "10-0")
        self.assertEqual(self.sink.resyncs, [[ROOM]])
        self.assertEqual(self.delivered(), ["1-0", "10-0"])

    def test_reconnect_during_a_repair_reads_again_after_it(self) -> None:
        from unrealon.engine.roomchannels import Repair

        self.live()
        self.event("0-0", "1-0")
        self.event("2-0", "3-0")
        self.connection.listener.disconnected()
        self.connection.listener.connected(self.connection)
        self.channels.subscribed(f"p:{{{ROOM}}}".encode())
        self.assertEqual(len(self.repairs), 1)  # one read at a time
        self.repairs[0][2].callback(Repair(cursor="E:3-0", recovered=True,
                                           missed=(("E:2-0", b"2"), ("E:3-0", b"3"))))
        # the first read may predate the reconnect: read again from where it left
        self.assertEqual([(r, s) for r, s, _ in self.repairs[1:]], [(ROOM, "E:3-0")])
        self.repairs[1][2].callback(Repair(cursor="E:4-0", recovered=True,
                                           missed=(("E:4-0", b"4"),)))
        self.assertEqual(self.delivered(), ["1-0", "2-0", "3-0", "4-0"])

    def test_failed_repair_is_retried(self) -> None:
        from unrealon.engine.interfaces import BackendUnavailable
        from unrealon.engine.roomchannels import REPAIR_RETRY, Repair

        self.live()
        self.event("0-0", "1-0")
        self.event("2-0", "3-0")
        self.repairs[0][2].errback(BackendUnavailable())
        self.clock.advance(REPAIR_RETRY)
        self.assertEqual(len(self.repairs), 2)
        self.repairs[1][2].callback(Repair(cursor="E:3-0", recovered=True,
                                           missed=(("E:2-0", b"2"), ("E:3-0", b"3"))))
        self.assertEqual(self.delivered(), ["1-0", "2-0", "3-0"])

    def test_unsubscribed_after_the_grace(self) -> None:
        self.live()
        self.channels.unwatch(ROOM)
        self.clock.advance(0.9)
        self.assertEqual(self.connection.unsubscribed, [])
        self.clock.advance(0.2)
        self.assertEqual(self.connection.unsubscribed, [[f"p:{{{ROOM}}}".encode()]])
        self.event("0-0", "1-0")
        self.assertEqual(self.sink.events, [])


class _Member:
    user_id = "u"

    def __init__(self) -> None:
        self.resynced: list[str] = []

    def resync(self, room: str) -> None:
        self.resynced.append(room)


class HubHearingTests(SynchronousTestCase):
    """Which members a room's unrepairable gap sends to recover."""

    def test_only_members_from_before_the_gap_recover(self) -> None:
        from unrealon.hub import Hub

        hub = Hub(lambda payload: payload, lambda cursor: None)
        before, after, gone = _Member(), _Member(), _Member()
        hub.join(ROOM, before)
        hub.join(ROOM, gone)
        hub.unheard(ROOM)
        hub.leave(ROOM, gone)
        hub.join(ROOM, after)  # joined since: its join read the history itself
        hub.heard(ROOM, complete=False)
        self.assertEqual((before.resynced, after.resynced, gone.resynced), ([ROOM], [], []))
        # repaired: nobody recovers
        hub.unheard(ROOM)
        hub.heard(ROOM, complete=True)
        self.assertEqual((before.resynced, after.resynced), ([ROOM], []))
