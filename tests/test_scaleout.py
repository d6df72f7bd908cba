"""
Scale-out from outside: three node processes on one private Redis, real
WebSocket clients, events through the ingress stream as the backend sends
them.

A node hears only the rooms where it has members (its room-channel counter
in /metrics does not move for the others); and a node whose subscriber
connection is killed mid-stream (CLIENT KILL, found by its client name)
repairs the gap from the room's history: its clients see every event once,
in the room's one order, and are never sent to recover.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from tests.helpers.cluster import EVENT, Tap, kill_client
from tests.helpers.process import NodeProcess
from tests.test_cluster import ClusterTestCase


def room_channel_messages(node: NodeProcess) -> Deferred[float]:
    """Messages C{node} received on room channels (C{unrealon_room_channel_messages})."""

    def value(response: tuple[int, bytes]) -> float:
        for line in response[1].decode().splitlines():
            if line.startswith("unrealon_room_channel_messages "):
                return float(line.split()[1])
        raise AssertionError("no unrealon_room_channel_messages in /metrics")

    return node.http_get("/metrics").addCallback(value)


class InterestRoutingTests(ClusterTestCase):
    @inlineCallbacks
    def test_a_node_hears_only_its_rooms(self) -> Any:
        """
        Members of room A on n1 only, of room B on n2 only, n3 with a client
        in neither: 200 events to each room.  n1 receives A's, n2 B's, n3
        none, whichever node's ingress consumer handled them.
        """
        nodes = yield self.cluster(3)
        a = yield self.client(nodes[0], "alice")
        yield a.join("workspace:a")
        b = yield self.client(nodes[1], "bob")
        yield b.join("workspace:b")
        idle = yield self.client(nodes[2], "carol")  # only in its implicit rooms
        before = []
        for node in nodes:
            before.append((yield room_channel_messages(node)))
        count = 200
        for seq in range(count):
            for room in ("workspace:a", "workspace:b"):
                yield self.xadd("publish", {"room": room, "event": EVENT, "data": {"seq": seq}})
        yield self.wait(lambda: len(a.events) >= count and len(b.events) >= count,
                        what="every event")
        yield self.settled("workspace:a", [a])
        yield self.settled("workspace:b", [b])
        after = []
        for node in nodes:
            after.append((yield room_channel_messages(node)))
        heard = [round(x - y) for x, y in zip(after, before, strict=True)]
        # the events, and the settling barriers (one per room)
        self.assertEqual(heard, [count + 1, count + 1, 0])
        # (the ingress group's nodes handle entries side by side: any order)
        self.assertEqual(sorted(a.seqs()), list(range(count)))
        self.assertEqual(sorted(b.seqs()), list(range(count)))
        self.assertEqual(idle.events, [])


class ChannelRepairTests(ClusterTestCase):
    timeout = 120

    @inlineCallbacks
    def test_a_new_connection_hears_its_user_room_from_the_start(self) -> Any:
        """
        A user's first connection on a node opens (token in the handshake)
        or authenticates (auth.authenticate) while the node's subscriber
        connection is down: the open and the reply wait until the user's
        room is heard, so an event published right after reaches it.
        """
        from tests.helpers.node import connect, mint_token

        nodes = yield self.cluster(1)
        node = nodes[0]
        for user, how in (("ada", "handshake"), ("bea", "message")):
            yield self.kill_subscriber(node)
            if how == "handshake":
                client = yield node.connect(mint_token(user, rooms=["*"]))
            else:
                url = f"ws://127.0.0.1:{node.ws_port}/ws"
                client = yield connect(url, port=node.ws_port)
                yield client.call("auth.authenticate",
                                  {"token": mint_token(user, rooms=["*"])})
            self.addCleanup(client.drop)
            tap = Tap(client)
            yield self.publisher.publish(f"user:{user}", EVENT, {"seq": 1})
            yield self.wait(lambda tap=tap: tap.seqs() == [1], timeout=10,
                            what=f"the event of user:{user} ({how})")

    def kill_subscriber(self, node: NodeProcess) -> Deferred[Any]:
        """CLIENT KILL the node's room-channel connection, by its client name."""
        return kill_client(self.redis, f"unrealon-rooms-{node.node_id}")

    @inlineCallbacks
    def test_subscriber_killed_mid_stream_clients_see_no_gap(self) -> Any:
        """
        Clients of one room on three nodes; n2's subscriber connection is
        killed three times while events stream in: every client gets every
        event once, all in one order, and none is closed or sent to recover.
        """
        nodes = yield self.cluster(3)
        yield self.stream_through_kills(nodes, "session:repair", 900,
                                        lambda: self.kill_subscriber(nodes[1]))
        repaired = yield nodes[1].http_get("/metrics")
        self.assertIn("unrealon_room_gaps_repaired ", repaired[1].decode())
        self.assertNotIn("unrealon_room_gaps_repaired 0.0", repaired[1].decode())
