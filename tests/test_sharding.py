"""
Rooms sharded over several Redis instances (UNREALON_REDIS_SHARDS).

The map itself: pinned values (every node, every version must agree, so a
change of the hash is a re-shard and must be seen), an even spread, and
growth that moves only the rooms that go to the new shard.

From outside: three node processes on three private Redis instances, real
WebSocket clients, events through the ingress stream on the first: each
room's history is on its own shard and nowhere else; every client gets
every event once, in each room's one order; presence of a room on another
shard is whole across nodes; a node's subscriber connection to one shard
killed mid-stream is repaired with no client-visible gap.  And a node given
the shards in another order than its peers says so in /health.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers.cluster import (
    EVENT,
    FakeSink,
    barrier,
    kill_client,
    redis_broker,
    start_cluster,
)
from tests.helpers.process import NodeProcess
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until
from tests.test_cluster import HISTORY_SIZE, PRESENCE_TTL, ClusterTestCase
from unrealon.engine.redisclient import RedisHandler, connect
from unrealon.engine.rediskeys import SHARD_PLACE, history_key
from unrealon.engine.roomshards import RoomShards, check_layout, jump_hash, place, room_hash
from unrealon.redisurl import parse_redis_url

SHARDS = 3


def rooms_on_each_shard(per_shard: int, prefix: str = "workspace:") -> list[str]:
    """C{per_shard} rooms for each of the L{SHARDS} shards, in shard order."""
    shards = RoomShards(SHARDS)
    found: dict[int, list[str]] = {index: [] for index in range(SHARDS)}
    number = 0
    while any(len(rooms) < per_shard for rooms in found.values()):
        room = f"{prefix}{number}"
        number += 1
        if len(found[shards.index(room)]) < per_shard:
            found[shards.index(room)].append(room)
    return [room for index in range(SHARDS) for room in found[index]]


class RoomShardsTests(SynchronousTestCase):
    def test_pinned(self) -> None:
        """
        The map is part of the layout on Redis: these values must never
        change (a change moves rooms, like a re-shard).
        """
        self.assertEqual(room_hash("workspace:1"), 0x6FB8523AAABA5843)
        self.assertEqual(
            [RoomShards(3).index(f"workspace:{n}") for n in range(12)],
            PINNED_3,
        )
        self.assertEqual(
            [RoomShards(5).index(f"session:{n}") for n in range(12)],
            PINNED_5,
        )
        self.assertEqual(jump_hash(0, 1), 0)
        self.assertEqual([jump_hash(k, 10) for k in (1, 2**32, 2**63 + 7)], PINNED_JUMP)

    def test_one_shard(self) -> None:
        """Without shards every room is on the first Redis."""
        self.assertEqual({RoomShards(1).index(f"r{n}") for n in range(100)}, {0})

    def test_even_spread(self) -> None:
        """3,000 rooms over 3 shards: each holds a third, within 10%."""
        counts = [0, 0, 0]
        for n in range(3000):
            counts[RoomShards(3).index(f"user:{n}")] += 1
        for count in counts:
            self.assertTrue(900 <= count <= 1100, counts)

    def test_growth_moves_rooms_only_to_the_new_shard(self) -> None:
        """From 3 to 4 shards: a room stays, or moves to shard 3; about a quarter move."""
        moved = 0
        for n in range(4000):
            room = f"session:{n}"
            before, after = RoomShards(3).index(room), RoomShards(4).index(room)
            if before != after:
                self.assertEqual(after, 3, room)
                moved += 1
        self.assertTrue(800 <= moved <= 1200, moved)

    def test_needs_a_shard(self) -> None:
        with self.assertRaises(ValueError):
            RoomShards(0)
        with self.assertRaises(ValueError):
            jump_hash(1, 0)


#: the shards of workspace:0..11 over 3 shards, session:0..11 over 5 (never change)
PINNED_3 = [2, 0, 1, 1, 2, 2, 1, 1, 1, 1, 0, 2]
PINNED_5 = [4, 1, 0, 0, 0, 4, 0, 1, 4, 2, 4, 1]
#: Lamping and Veach's reference implementation gives the same
PINNED_JUMP = [6, 2, 4]


class ShardedClusterTestCase(ClusterTestCase):
    """Three private Redis instances; nodes shard rooms over them."""

    timeout = 120

    @inlineCallbacks
    def sharded_cluster(self, count: int) -> Any:
        self.servers = []
        for _ in range(SHARDS):
            self.servers.append((yield start_redis(self)))
        self.server = self.servers[0]
        urls = [server.url for server in self.servers]
        self.nodes = yield start_cluster(
            self, urls[0], count, UNREALON_PRESENCE_TTL=str(PRESENCE_TTL),
            UNREALON_HISTORY_SIZE=str(HISTORY_SIZE), UNREALON_REDIS_SHARDS=" ".join(urls[1:]),
        )
        self.shard_redis: list[RedisHandler] = []
        for url in urls:
            handler = connect(parse_redis_url(url))
            self.addCleanup(handler.disconnect)
            self.shard_redis.append(handler)
        self.redis = self.shard_redis[0]
        # the nodes record each shard's place in the background: wait for it,
        # so a test that kills a shard does not catch that write half done
        for index, redis in enumerate(self.shard_redis):
            yield wait_until(lambda r=redis, i=index: r.execute_command("GET", SHARD_PLACE)
                             .addCallback(lambda v, i=i: v == place(i, SHARDS)),
                             what=f"shard {index}'s place recorded")
        self.publisher = redis_broker(
            FakeSink(), self.redis, self.redis, urls[0], history_size=HISTORY_SIZE,
            history_ttl=86400, shards=list(zip(self.shard_redis[1:], urls[1:], strict=True)),
        )
        return self.nodes

    def kill_subscriber(self, node: NodeProcess, shard: int) -> Deferred[Any]:
        """CLIENT KILL C{node}'s subscriber connection to shard C{shard}."""
        return kill_client(self.shard_redis[shard], f"unrealon-rooms-{node.node_id}-shard{shard}")


class ShardedDeliveryTests(ShardedClusterTestCase):
    @inlineCallbacks
    def test_rooms_live_on_their_shard_and_deliver_in_order(self) -> Any:
        """
        Two rooms on each of three shards, a client in every room on each of
        three nodes, 60 events per room through the ingress stream: each
        room's history is on its shard only; every client gets every event
        once, in one order per room, the same on every node.
        """
        nodes = yield self.sharded_cluster(3)
        rooms = rooms_on_each_shard(2)
        taps = []
        for i, node in enumerate(nodes):
            tap = yield self.client(node, f"user{i}")
            for room in rooms:
                yield tap.join(room)
            taps.append(tap)
        count = 60
        for seq in range(count):
            for room in rooms:
                yield self.xadd("publish", {"room": room, "event": EVENT, "data": {"seq": seq}})
        for room in rooms:
            yield self.settled(room, taps)
        for room in rooms:
            reference = [e["cursor"] for e in taps[0].events if e["room"] == room]
            self.assertEqual(len(reference), count)
            for tap in taps:
                self.assertEqual(sorted(tap.seqs(room)), list(range(count)))
                self.assertEqual([e["cursor"] for e in tap.events if e["room"] == room],
                                 reference)
        for index, room in enumerate(rooms):
            held = []
            for redis in self.shard_redis:
                held.append(int((yield redis.execute_command("EXISTS", history_key(room)))))
            expected = [1 if shard == index // 2 else 0 for shard in range(SHARDS)]
            self.assertEqual(held, expected, room)

    @inlineCallbacks
    def test_rejoin_with_cursor_replays_from_the_shard(self) -> Any:
        """A client away while a room on shard 2 got events rejoins with its cursor and misses none."""
        nodes = yield self.sharded_cluster(2)
        room = rooms_on_each_shard(1)[2]
        tap = yield self.client(nodes[0], "ada")
        yield tap.join(room)
        yield self.publish(room, range(5))
        yield self.wait(lambda: tap.seqs(room) == list(range(5)), what="the first events")
        cursor = tap.cursor(room)
        yield tap.client.drop()
        yield self.publish(room, range(5, 25))
        again = yield self.client(nodes[1], "ada")
        result = yield again.join(room, since=cursor)
        self.assertTrue(result["recovered"])
        yield self.publish(room, range(25, 30))
        yield barrier(self.publisher.publish, room, [again])
        self.assertEqual(again.seqs(room), list(range(5, 30)))

    @inlineCallbacks
    def test_presence_of_a_room_on_another_shard(self) -> Any:
        """
        Users of a room on shard 1 on three nodes: presence.list names all
        three from any node, joins and leaves are announced to the others,
        and the backend's room.occupied comes once (presence is whole on
        the first Redis, roomshards).
        """
        nodes = yield self.sharded_cluster(3)
        room = rooms_on_each_shard(1)[1]
        taps = []
        for i, node in enumerate(nodes):
            tap = yield self.client(node, f"user{i}")
            yield tap.join(room)
            taps.append(tap)
        for tap in taps:
            reply = yield tap.client.call("presence.list", {"room": room})
            self.assertEqual(sorted(u["user_id"] for u in reply["users"]),
                             ["user0", "user1", "user2"])
        yield self.wait(lambda: sorted(p["user_id"] for p in taps[0].presence
                                       if p["method"] == "presence.joined"
                                       and p["room"] == room) == ["user1", "user2"],
                        what="user0 told of the others' joins")
        yield taps[2].client.call("rooms.leave", {"room": room})
        yield self.wait(lambda: any(p["method"] == "presence.left" and p["user_id"] == "user2"
                                    for p in taps[0].presence), what="user2's leave")
        entries = yield self.redis.execute_command("XRANGE", "stream:events", "-", "+")
        occupied = [json.loads(dict(zip(f[::2], f[1::2], strict=True))["payload"])
                    for _, f in entries]
        self.assertEqual(
            [e["user_id"] for e in occupied if e["type"] == "room.occupied" and e["room"] == room],
            ["user0"],
        )

    @inlineCallbacks
    def test_subscriber_to_a_shard_killed_mid_stream(self) -> Any:
        """
        Clients of one room on shard 2 on three nodes; n2's subscriber
        connection to shard 2 is killed three times while events stream in:
        every client gets every event once, in one order, none is closed.
        """
        nodes = yield self.sharded_cluster(3)
        room = rooms_on_each_shard(1, prefix="session:")[2]
        yield self.stream_through_kills(nodes, room, 600, lambda: self.kill_subscriber(nodes[1], 2))
        metrics = yield nodes[1].http_get("/metrics")
        self.assertNotIn("unrealon_room_gaps_repaired 0.0", metrics[1].decode())
        self.assertIn("unrealon_room_gaps_resynced 0.0", metrics[1].decode())


class ShardOutageTests(ShardedClusterTestCase):
    @inlineCallbacks
    def test_a_shard_away_stops_only_its_rooms(self) -> Any:
        """
        Shard 2's Redis is killed: a room on shard 1 goes on delivering to
        clients on both nodes, none of them is closed, and /health names
        shard 2's loops; once shard 2 is back (empty), its rooms work again
        and /health is ok.
        """
        nodes = yield self.sharded_cluster(2)
        rooms = rooms_on_each_shard(1)
        steady, lost = rooms[1], rooms[2]
        taps = []
        for i, node in enumerate(nodes):
            tap = yield self.client(node, f"user{i}")
            yield tap.join(steady)
            yield tap.join(lost)
            taps.append(tap)
        yield self.servers[2].kill()
        yield self.publish(steady, range(50))
        yield barrier(self.publisher.publish, steady, taps)
        for tap in taps:
            self.assertEqual(tap.seqs(steady), list(range(50)))
            self.assertFalse(tap.client.closed.called)
        health = yield self.wait_for_health(nodes[0], lambda body: b"room channels (shard 2)" in body)
        self.assertEqual(health[0], 503)
        self.assertNotIn("room channels (shard 1)", json.loads(health[1])["stopped"])
        yield self.servers[2].restart()
        yield self.wait_for_health(nodes[0], lambda body: json.loads(body)["status"] == "ok")
        late = yield self.client(nodes[0], "late")
        yield late.join(lost)
        yield self.publish(lost, range(3), key_prefix="after-")
        yield barrier(self.publisher.publish, lost, [late])
        self.assertEqual(late.seqs(lost), [0, 1, 2])

    def wait_for_health(self, node: NodeProcess, good: Any) -> Any:

        def check() -> Deferred[Any]:
            return node.http_get("/health").addCallback(lambda r: r if good(r[1]) else None)

        return wait_until(check, timeout=20, what="the expected /health")


class LayoutTests(ShardedClusterTestCase):
    @inlineCallbacks
    def test_shards_in_another_order_are_reported(self) -> Any:
        """
        A node given the shards in another order than the node that wrote
        their places finds the disagreement; the /health of the nodes that
        agree stays ok.
        """
        nodes = yield self.sharded_cluster(1)
        health = yield nodes[0].http_get("/health")
        self.assertEqual(health[0], 200)
        problems = yield Deferred.fromCoroutine(
            check_layout([self.shard_redis[0], self.shard_redis[2], self.shard_redis[1]]))
        self.assertEqual(problems, ["shard 1 of 3 holds the place 2 of 3",
                                    "shard 2 of 3 holds the place 1 of 3"])
        agreed = yield Deferred.fromCoroutine(check_layout(self.shard_redis))
        self.assertEqual(agreed, [])

    @inlineCallbacks
    def test_a_misconfigured_node_is_unhealthy(self) -> Any:
        """
        A node started with the shards swapped, while one of them is away,
        checks once it is back and reports them in /health (503).
        """
        yield self.sharded_cluster(1)
        urls = [server.url for server in self.servers]
        wrong = NodeProcess(self, urls[0], "wrong", {
            "UNREALON_REDIS_SHARDS": f"{urls[2]} {urls[1]}",
            "UNREALON_PRESENCE_TTL": str(PRESENCE_TTL),
        })
        yield self.servers[1].kill()
        yield wrong.start(until="/live")
        yield self.servers[1].restart()
        health = yield self.wait_health(wrong)
        self.assertEqual(health[0], 503)
        self.assertIn(b"shard_layout", health[1])

    def wait_health(self, node: NodeProcess) -> Any:

        def check() -> Deferred[Any]:
            return node.http_get("/health").addCallback(
                lambda r: r if b"shard_layout" in r[1] else None)

        return wait_until(check, timeout=20, what="the layout problem in /health")

