"""
Lifecycle events to the backend (PROTOCOL.md section 9.1): real node
processes on one private redis-server, the events stream read with XRANGE.

Exactly once is judged on the stream as a whole: per user, per room and per
connection id the events strictly alternate (online, offline, online, ...),
starting with the "up" one.  "Nothing more will come" is never waited for:
a test first waits for the presence state in Redis that can produce no
further event (every connection of the test in the presence set, then none),
and only then reads the stream.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.cluster import start_cluster
from tests.helpers.node import mint_token, start_node
from tests.helpers.process import NodeProcess
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import sleep, wait_until
from unrealon.engine.redisclient import connect, parse_redis_url

PRESENCE_TTL = 3.0
STREAM = "stream:events"
ONLINE_MEMBERS = "unrealon:p:__online__:m"

#: the exact fields of each event type (PROTOCOL.md section 9.1)
FIELDS = {
    "user.online": {"type", "user_id", "node_id", "time"},
    "user.offline": {"type", "user_id", "node_id", "time", "reason"},
    "room.occupied": {"type", "room", "user_id", "node_id", "time"},
    "room.vacated": {"type", "room", "user_id", "node_id", "time", "reason"},
    "connection.opened": {"type", "user_id", "connection_id", "node_id", "time"},
    "connection.closed": {"type", "user_id", "connection_id", "node_id", "time", "reason"},
}
#: the "up" event of each pair, and its "down" one
PAIRS = {
    "user": ("user.online", "user.offline"),
    "room": ("room.occupied", "room.vacated"),
    "connection": ("connection.opened", "connection.closed"),
}


class LifecycleTestCase(TestCase):
    """A private Redis, node processes on it, clients dropped in cleanup."""

    timeout = 90

    @inlineCallbacks
    def cluster(self, count: int, redis_args: Sequence[str] = (), **env: str) -> Any:
        self.server = yield start_redis(self, extra_args=redis_args)
        settings = {"UNREALON_PRESENCE_TTL": str(PRESENCE_TTL)}
        settings.update(env)
        self.nodes: list[NodeProcess] = yield start_cluster(self, self.server.url, count,
                                                            **settings)
        self.redis = connect(parse_redis_url(self.server.url))
        self.addCleanup(self.redis.disconnect)
        return self.nodes

    @inlineCallbacks
    def client(self, node: NodeProcess, user: str) -> Any:
        client = yield node.connect(mint_token(user, rooms=["*"]))
        self.addCleanup(client.drop)
        return client

    def clients(self, pairs: Iterable[tuple[NodeProcess, str]]) -> Any:
        """Connect them all at once (concurrently, on whichever nodes)."""
        return gatherResults([self.client(node, user) for node, user in pairs],
                             consumeErrors=True)

    @inlineCallbacks
    def raw_events(self) -> Any:
        """(entry id, payload text) of every entry of the events stream, in order."""
        entries = yield self.redis.execute_command("XRANGE", STREAM, "-", "+")
        out = []
        for entry_id, fields in entries or []:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            self.assertEqual(list(values), ["payload"], "one field, payload")
            out.append((str(entry_id), str(values["payload"])))
        return out

    @inlineCallbacks
    def events(self) -> Any:
        """Every event in the stream, checked for its exact fields and its time."""
        raw = yield self.raw_events()
        events = []
        for entry_id, payload in raw:
            event = json.loads(payload)
            self.assertEqual(set(event), FIELDS[event["type"]], payload)
            # an integer of milliseconds, written as one (no exponent, no fraction)
            self.assertIsInstance(event["time"], int, payload)
            self.assertRegex(payload, r'"time":\d{13},')
            entry_ms = int(entry_id.split("-")[0])
            self.assertLessEqual(abs(event["time"] - entry_ms), 1000, payload)
            self.assertLessEqual(abs(event["time"] - time.time() * 1000), 120_000, payload)
            if "reason" in event:
                self.assertIn(event["reason"], ("closed", "node_lost"), payload)
            events.append(event)
        return events

    @inlineCallbacks
    def online_members(self) -> Any:
        """The members of __online__ (C{<user>|<conn>@<node token>})."""
        members = yield self.redis.execute_command("ZRANGE", ONLINE_MEMBERS, 0, -1)
        return [str(m) for m in members or []]

    def wait_online(self, users: Sequence[str], count: int, timeout: float = 15) -> Any:
        """Until C{users} hold exactly C{count} connections in __online__ (cluster-wide)."""

        @inlineCallbacks
        def check() -> Any:
            members = yield self.online_members()
            return sum(1 for m in members if m.rpartition("|")[0] in users) == count

        return wait_until(check, timeout=timeout, what=f"{count} connections of {users}")

    def wait_room(self, room: str, count: int, timeout: float = 15) -> Any:
        """Until C{room} holds exactly C{count} presence entries."""

        @inlineCallbacks
        def check() -> Any:
            n = yield self.redis.execute_command("ZCARD", f"unrealon:p:{room}:m")
            return int(n) == count

        return wait_until(check, timeout=timeout, what=f"{count} entries in {room}")

    def assertAlternate(self, events: Sequence[dict[str, Any]], kind: str, key: str) -> dict[str, list[dict[str, Any]]]:
        """Per C{key} value, the C{kind} events strictly alternate, up first; returns them grouped."""
        up, down = PAIRS[kind]
        grouped: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            if event["type"] in (up, down):
                grouped.setdefault(event[key], []).append(event)
        for value, seq in grouped.items():
            types = [e["type"] for e in seq]
            expected = [up if i % 2 == 0 else down for i in range(len(types))]
            self.assertEqual(types, expected, f"{kind} events of {value}")
        return grouped


def _types(events: Iterable[dict[str, Any]], **match: Any) -> list[str]:
    return [e["type"] for e in events if all(e.get(k) == v for k, v in match.items())]


class UserEventsTests(LifecycleTestCase):
    @inlineCallbacks
    def test_online_offline_once_per_cycle_across_nodes(self) -> Any:
        """
        One user connects several times on both nodes at once, then the
        connections close interleaved: one user.online before, one
        user.offline after, per cycle; never two in a row.
        """
        n1, n2 = yield self.cluster(2)
        for _ in range(3):
            clients = yield self.clients([(n1, "alice"), (n2, "alice")] * 3 + [(n2, "bob")])
            yield self.wait_online(["alice", "bob"], 7)
            # close interleaved across the nodes, some cleanly, some dropped
            closing = [c.close() if i % 2 else c.drop() for i, c in enumerate(clients)]
            yield gatherResults(closing, consumeErrors=True)
            yield self.wait_online(["alice", "bob"], 0)
        # overlapping: new connections while the old ones close
        first = yield self.clients([(n1, "alice"), (n2, "alice")])
        yield self.wait_online(["alice"], 2)
        for _ in range(4):
            more = yield self.clients([(n2, "alice"), (n1, "alice")])
            yield gatherResults([c.drop() for c in first], consumeErrors=True)
            first = more
        yield gatherResults([c.close() for c in first], consumeErrors=True)
        yield self.wait_online(["alice"], 0)
        events = yield self.events()
        grouped = self.assertAlternate(events, "user", "user_id")
        self.assertEqual(sorted(grouped), ["alice", "bob"])
        self.assertEqual(_types(events, user_id="bob"), ["user.online", "user.offline"] * 3)
        alice = _types(events, user_id="alice")
        self.assertEqual(alice[:6], ["user.online", "user.offline"] * 3)
        self.assertEqual(alice[-1], "user.offline")
        for event in events:
            self.assertIn(event["node_id"], ("n1", "n2"))
            if event["type"] == "user.offline":
                self.assertEqual(event["reason"], "closed")
        # connection events are off by default, and no room was joined
        self.assertEqual({e["type"] for e in events}, {"user.online", "user.offline"})

    @inlineCallbacks
    def test_node_id_is_the_connections_node(self) -> Any:
        """node_id names the node of the connection that made the transition."""
        n1, n2 = yield self.cluster(2)
        carol = yield self.client(n2, "carol.x@example")
        yield self.wait_online(["carol.x@example"], 1)
        dave = yield self.client(n1, "dave")
        yield self.wait_online(["dave"], 1)
        yield carol.close()
        yield self.wait_online(["carol.x@example"], 0)
        yield dave.close()
        yield self.wait_online(["dave"], 0)
        events = yield self.events()
        self.assertEqual(
            [(e["type"], e["user_id"], e["node_id"]) for e in events],
            [("user.online", "carol.x@example", "n2"), ("user.online", "dave", "n1"),
             ("user.offline", "carol.x@example", "n2"), ("user.offline", "dave", "n1")],
        )


class RoomEventsTests(LifecycleTestCase):
    @inlineCallbacks
    def test_occupied_vacated_once_with_concurrent_joins_and_leaves(self) -> Any:
        """
        Several users on both nodes join one room at once and then leave it
        (rooms.leave or closing): one room.occupied and one room.vacated per
        cycle; the implicit rooms never appear.
        """
        n1, n2 = yield self.cluster(2)
        room = "workspace:r1"
        users = [f"u{i}" for i in range(6)]
        for cycle in range(2):
            pairs = [(n1 if i % 2 else n2, user) for i, user in enumerate(users)]
            pairs += [(n1, "u0"), (n2, "u1")]  # two users with connections on both nodes
            clients = yield self.clients(pairs)
            yield gatherResults([c.call("rooms.join", {"room": room}) for c in clients],
                                consumeErrors=True)
            yield self.wait_room(room, len(clients))
            going = []
            for i, c in enumerate(clients):
                if (i + cycle) % 2:
                    going.append(c.call("rooms.leave", {"room": room}))
                else:
                    going.append(c.close())
            yield gatherResults(going, consumeErrors=True)
            yield self.wait_room(room, 0)
            for c in clients:
                yield c.close()
            yield self.wait_online(users, 0)
        events = yield self.events()
        rooms = [e for e in events if e["type"].startswith("room.")]
        self.assertEqual([e["type"] for e in rooms], ["room.occupied", "room.vacated"] * 2)
        for event in rooms:
            self.assertEqual(event["room"], room)
            self.assertIn(event["user_id"], users)
            self.assertIn(event["node_id"], ("n1", "n2"))
        self.assertEqual([e["reason"] for e in rooms[1::2]], ["closed", "closed"])
        self.assertAlternate(events, "user", "user_id")

    @inlineCallbacks
    def test_occupant_is_the_first_user_and_per_room(self) -> Any:
        """Each room has its own pair; user_id and node_id are those of the first and last user."""
        n1, n2 = yield self.cluster(2)
        alice = yield self.client(n1, "alice")
        bob = yield self.client(n2, "bob")
        yield alice.call("rooms.join", {"room": "a:1"})
        yield bob.call("rooms.join", {"room": "a:1"})
        yield bob.call("rooms.join", {"room": "b:2"})
        yield alice.call("rooms.leave", {"room": "a:1"})
        yield bob.call("rooms.leave", {"room": "a:1"})
        yield bob.close()
        yield self.wait_room("b:2", 0)
        yield self.wait_online(["bob"], 0)
        events = yield self.events()
        self.assertEqual(
            [(e["type"], e["room"], e["user_id"], e["node_id"]) for e in events
             if e["type"].startswith("room.")],
            [("room.occupied", "a:1", "alice", "n1"), ("room.occupied", "b:2", "bob", "n2"),
             ("room.vacated", "a:1", "bob", "n2"), ("room.vacated", "b:2", "bob", "n2")],
        )


class NodeLostTests(LifecycleTestCase):
    @inlineCallbacks
    def test_killed_node_offline_and_vacated_once(self) -> Any:
        """
        SIGKILL a node: its users' user.offline, its rooms' room.vacated and
        its connections' connection.closed come once, from the sweep, with
        reason node_lost and the dead node's id; nothing for users and rooms
        that still have connections on the other node.
        """
        n1, n2 = yield self.cluster(2, UNREALON_CONNECTION_EVENTS="1")
        alice, bob1 = yield self.clients([(n1, "alice"), (n1, "bob")])
        bob2, carol = yield self.clients([(n2, "bob"), (n2, "carol")])
        yield alice.call("rooms.join", {"room": "r:gone"})
        yield bob1.call("rooms.join", {"room": "r:gone"})
        yield alice.call("rooms.join", {"room": "r:shared"})
        yield carol.call("rooms.join", {"room": "r:shared"})
        yield bob1.call("rooms.join", {"room": "r:bob"})
        yield bob2.call("rooms.join", {"room": "r:bob"})
        yield self.wait_online(["alice", "bob", "carol"], 4)
        yield n1.kill()
        killed = time.monotonic()
        # n1's entries do not all expire at once (a join after its last
        # heartbeat expires later): wait until every one of them is swept
        yield self.wait_online(["alice", "bob", "carol"], 2, timeout=PRESENCE_TTL + 5)
        for room, left in (("r:gone", 0), ("r:shared", 1), ("r:bob", 1)):
            yield self.wait_room(room, left, timeout=PRESENCE_TTL + 5)
        self.assertLess(time.monotonic() - killed, PRESENCE_TTL + 1)
        swept = yield self.events()
        lost = [e for e in swept if e.get("reason") == "node_lost"]
        self.assertEqual(
            sorted((e["type"], e.get("room") or e["user_id"]) for e in lost
                   if not e["type"].startswith("connection.")),
            [("room.vacated", "r:gone"), ("user.offline", "alice")],
        )
        for event in lost:
            self.assertEqual(event["node_id"], "n1")  # the dead node, not the sweeper
        # connections: every n1 connection opened is closed once, node_lost
        opened = {e["connection_id"] for e in swept
                  if e["type"] == "connection.opened" and e["node_id"] == "n1"}
        self.assertEqual(len(opened), 2)
        for connection_id in opened:
            self.assertRegex(connection_id, r"^n1/c\d+@[0-9a-f]{16}$")
        self.assertEqual(sorted(e["connection_id"] for e in lost if e["type"] == "connection.closed"),
                         sorted(opened))
        # then the survivors leave: closed, on n2
        yield carol.call("rooms.leave", {"room": "r:shared"})
        yield gatherResults([bob2.close(), carol.close()], consumeErrors=True)
        yield self.wait_online(["bob", "carol"], 0)
        yield self.wait_room("r:bob", 0)
        events = yield self.events()
        for kind, key in (("user", "user_id"), ("room", "room"), ("connection", "connection_id")):
            grouped = self.assertAlternate(events, kind, key)
            for value, seq in grouped.items():
                self.assertEqual(len(seq), 2, f"{value}: {seq}")
        ends = {(e["type"], e.get("room") or e["user_id"]): (e["node_id"], e["reason"])
                for e in events if e["type"] in ("user.offline", "room.vacated")}
        self.assertEqual(ends, {
            ("user.offline", "alice"): ("n1", "node_lost"),
            ("user.offline", "bob"): ("n2", "closed"),
            ("user.offline", "carol"): ("n2", "closed"),
            ("room.vacated", "r:gone"): ("n1", "node_lost"),
            ("room.vacated", "r:shared"): ("n2", "closed"),
            ("room.vacated", "r:bob"): ("n2", "closed"),
        })

    @inlineCallbacks
    def test_paused_node_goes_offline_then_online_again(self) -> Any:
        """
        A node that cannot heartbeat for longer than the TTL (SIGSTOP) is
        swept (offline, node_lost); its next heartbeat restores its entries:
        online again.  Each once, strictly alternating.
        """
        n1, _sweeper = yield self.cluster(2)
        alice = yield self.client(n1, "alice")
        yield alice.call("rooms.join", {"room": "r:p"})
        yield self.wait_online(["alice"], 1)
        n1.pause()
        try:
            # both entries swept (they may expire at different times)
            yield self.wait_online(["alice"], 0, timeout=PRESENCE_TTL + 5)
            yield self.wait_room("r:p", 0, timeout=PRESENCE_TTL + 5)
        finally:
            n1.resume()
        yield self.wait_online(["alice"], 1)  # restored by n1's heartbeat
        yield self.wait_room("r:p", 1)
        yield alice.close()
        yield self.wait_online(["alice"], 0)
        yield self.wait_room("r:p", 0)
        events = yield self.events()
        self.assertEqual([e["type"] for e in events if e["type"].startswith("user.")],
                         ["user.online", "user.offline", "user.online", "user.offline"])
        self.assertEqual([e["type"] for e in events if e["type"].startswith("room.")],
                         ["room.occupied", "room.vacated", "room.occupied", "room.vacated"])
        reasons = [e["reason"] for e in events if "reason" in e]
        self.assertEqual(sorted(reasons[:2]), ["node_lost", "node_lost"])
        self.assertEqual(reasons[2:], ["closed", "closed"])
        self.assertEqual({e["node_id"] for e in events}, {"n1"})


class ConnectionEventsTests(LifecycleTestCase):
    @inlineCallbacks
    def test_opened_closed_per_connection(self) -> Any:
        """With the setting: connection.opened / closed per connection, ids unique in the cluster."""
        n1, n2 = yield self.cluster(2, UNREALON_CONNECTION_EVENTS="true")
        clients = yield self.clients([(n1, "alice"), (n2, "alice")] * 3)
        yield self.wait_online(["alice"], 6)
        yield gatherResults([c.close() for c in clients[::2]], consumeErrors=True)
        yield self.wait_online(["alice"], 3)
        yield gatherResults([c.drop() for c in clients[1::2]], consumeErrors=True)
        yield self.wait_online(["alice"], 0)
        events = yield self.events()
        grouped = self.assertAlternate(events, "connection", "connection_id")
        self.assertEqual(len(grouped), 6)
        for connection_id, seq in grouped.items():
            self.assertEqual(len(seq), 2)
            node = seq[0]["node_id"]
            self.assertRegex(connection_id, rf"^{node}/c\d+@[0-9a-f]{{16}}$")
            self.assertEqual(seq[1]["node_id"], node)
            self.assertEqual(seq[1]["reason"], "closed")
            self.assertEqual({e["user_id"] for e in seq}, {"alice"})
        self.assertEqual(sorted(c.split("/")[0] for c in grouped), ["n1"] * 3 + ["n2"] * 3)
        types = [e["type"] for e in events]
        # user.online before the first connection.opened, user.offline after the last closed
        self.assertEqual(types[0], "user.online")
        self.assertEqual(types[-1], "user.offline")
        self.assertEqual(types.count("user.online"), 1)


class TrimTests(LifecycleTestCase):
    @inlineCallbacks
    def test_stream_is_trimmed(self) -> Any:
        """UNREALON_EVENTS_MAXLEN: the stream stays near it however many events come."""
        # small stream nodes: "MAXLEN ~" only drops whole nodes
        (n1,) = yield self.cluster(1, redis_args=["--stream-node-max-entries", "5"],
                                   UNREALON_EVENTS_MAXLEN="10", UNREALON_CONNECTION_EVENTS="1")
        users = [f"t{i}" for i in range(12)]
        for _ in range(2):
            clients = yield self.clients((n1, u) for u in users)
            yield self.wait_online(users, len(users))
            yield gatherResults([c.close() for c in clients], consumeErrors=True)
            yield self.wait_online(users, 0)
        info = yield self.redis.execute_command("XINFO", "STREAM", STREAM)
        info = dict(zip(info[::2], info[1::2], strict=True))
        self.assertEqual(int(info["entries-added"]), 2 * len(users) * 4)
        length = yield self.redis.execute_command("XLEN", STREAM)
        self.assertGreaterEqual(int(length), 10)
        self.assertLessEqual(int(length), 10 + 5)
        events = yield self.events()  # what is left is well formed
        self.assertEqual(events[-1]["type"], "user.offline")


class JoinOvertakenTests(TestCase):
    """A node in this process, so the test can hold Redis still mid-join."""

    timeout = 60

    @inlineCallbacks
    def test_join_overtaken_by_close_or_leave_leaves_no_room_event(self) -> Any:
        """
        A connection that closes (or leaves) while its rooms.join waits on
        Redis: its join is dropped, so the room is never occupied; the user
        still goes online at authentication and offline at the close.
        """
        server = yield start_redis(self)
        redis = connect(parse_redis_url(server.url))
        self.addCleanup(redis.disconnect)
        running = yield start_node(self, redis_url=server.url, presence_ttl=3)

        def stream() -> Any:
            d = redis.execute_command("XRANGE", STREAM, "-", "+")
            return d.addCallback(lambda entries: [json.loads(f[1]) for _, f in entries or []])

        for user, how in (("closer", "drop"), ("leaver", "leave")):
            client = yield running.connect(mint_token(user, rooms=["*"]))
            self.addCleanup(client.drop)
            yield wait_until(lambda u=user: stream().addCallback(
                lambda es: any(e["user_id"] == u for e in es)), what=f"{user} online")
            server.pause()
            try:
                client.send({"jsonrpc": "2.0", "id": 1, "method": "rooms.join",
                             "params": {"room": "workspace:race"}})
                if how == "leave":
                    client.send({"jsonrpc": "2.0", "id": 2, "method": "rooms.leave",
                                 "params": {"room": "workspace:race"}})
                yield sleep(0.1)
                if how == "drop":
                    yield client.drop()
                yield sleep(0.1)
            finally:
                server.resume()
            if how == "drop":
                yield wait_until(lambda u=user: running.node.hub.user_connections(u) == 0,
                                 what=f"{user} gone")
            else:  # both replies: the join (after its presence write, if any) and the leave
                yield wait_until(lambda c=client: {m.get("id") for m in c.messages
                                                   if isinstance(m, dict)} >= {1, 2},
                                 what=f"{user}'s join and leave answered")
                yield client.close()
        # a marker behind everything the node sent: another user's online
        marker = yield running.connect(mint_token("marker"))
        self.addCleanup(marker.drop)
        yield wait_until(lambda: stream().addCallback(
            lambda es: any(e["user_id"] == "marker" for e in es)), what="the marker")
        count = yield redis.execute_command("ZCARD", "unrealon:p:workspace:race:m")
        self.assertEqual(int(count), 0)
        events = yield stream()
        self.assertEqual(
            [(e["type"], e["user_id"]) for e in events],
            [("user.online", "closer"), ("user.offline", "closer"),
             ("user.online", "leaver"), ("user.offline", "leaver"),
             ("user.online", "marker")],
        )


class EventTimeTests(TestCase):
    """The JSON the scripts write, without nodes: big integers stay integers."""

    @inlineCallbacks
    def test_time_is_integer_milliseconds(self) -> Any:
        server = yield start_redis(self)
        redis = connect(parse_redis_url(server.url))
        self.addCleanup(redis.disconnect)
        from twisted.internet import reactor

        from unrealon.engine.redispresence import RedisPresence

        presence = RedisPresence(reactor, redis, ttl=30, node_id="node-a",
                                 connection_events=True, token="5eed")
        before = int(time.time() * 1000)
        yield presence.connect("alice", "c1")
        yield presence.join("room:1", "alice", "c1", {"a": 1})
        yield presence.leave("room:1", "alice", "c1")
        yield presence.disconnect("alice", "c1")
        after = int(time.time() * 1000)
        entries = yield redis.execute_command("XRANGE", STREAM, "-", "+")
        payloads = [str(fields[1]) for _, fields in entries]
        self.assertEqual(len(payloads), 6)
        for payload in payloads:
            match = re.search(r'"time":(\d+)[,}]', payload)
            self.assertIsNotNone(match, payload)
            assert match is not None
            value = json.loads(payload)["time"]
            self.assertIsInstance(value, int)
            self.assertEqual(value, int(match.group(1)))
            self.assertGreaterEqual(value, before - 1000)
            self.assertLessEqual(value, after + 1000)
        self.assertEqual(
            [json.loads(p) | {"time": 0} for p in payloads],
            [
                {"type": "user.online", "user_id": "alice", "node_id": "node-a", "time": 0},
                {"type": "connection.opened", "user_id": "alice", "connection_id": "node-a/c1@5eed",
                 "node_id": "node-a", "time": 0},
                {"type": "room.occupied", "room": "room:1", "user_id": "alice",
                 "node_id": "node-a", "time": 0},
                {"type": "room.vacated", "room": "room:1", "user_id": "alice",
                 "node_id": "node-a", "time": 0, "reason": "closed"},
                {"type": "connection.closed", "user_id": "alice", "connection_id": "node-a/c1@5eed",
                 "node_id": "node-a", "time": 0, "reason": "closed"},
                {"type": "user.offline", "user_id": "alice", "node_id": "node-a", "time": 0,
                 "reason": "closed"},
            ],
        )
