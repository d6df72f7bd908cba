"""
The cluster as clients see it: 2-3 real node processes on one private
redis-server (PROTOCOL.md sections 4, 5 and 6; ARCHITECTURE.md).

Events are published the two ways a backend does: XADD to the ingress
stream (handled by whichever node's consumer gets the entry), or by a
publisher in the test process using the engine's own publish script (what a
node does when it handles an entry; one publisher keeps the order of the
seq numbers, so "no gap, no duplicate" becomes "exactly 0..N-1 in order").

Set C{CLUSTER_DEBUG=1} to print the nodes' warnings and errors after each test.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.cluster import EVENT, FakeSink, Tap, barrier, redis_broker, start_cluster
from tests.helpers.ingress_support import sync_redis
from tests.helpers.node import WSClient, mint_token, start_node
from tests.helpers.process import NodeProcess
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import sleep, wait_until
from unrealon.engine.redisbroker import parse_cursor
from unrealon.engine.redisclient import StreamClient, connect, parse_redis_url

PRESENCE_TTL = 3.0
HISTORY_SIZE = 200


class ClusterTestCase(TestCase):
    """A private Redis, nodes on it, clients that are closed in cleanup."""

    timeout = 90

    @inlineCallbacks
    def cluster(self, count: int, persistent: bool = False, **env: str) -> Any:
        self.server = yield start_redis(self, persistent=persistent)
        settings = {
            "UNREALON_PRESENCE_TTL": str(PRESENCE_TTL),
            "UNREALON_HISTORY_SIZE": str(HISTORY_SIZE),
        }
        settings.update(env)
        self.nodes = yield start_cluster(self, self.server.url, count, **settings)
        if os.environ.get("CLUSTER_DEBUG"):
            self.addCleanup(self._dump_logs)
        self.redis = connect(parse_redis_url(self.server.url))
        self.addCleanup(self.redis.disconnect)
        self.publisher = redis_broker(
            FakeSink(), self.redis, self.redis, self.server.url,
            history_size=int(settings["UNREALON_HISTORY_SIZE"]), history_ttl=86400,
        )
        return self.nodes

    def _dump_logs(self) -> None:
        for node in self.nodes:
            for event in node.log_lines():
                level = event.get("log_level", {}).get("name")
                if level in ("warn", "error", "critical") or "log_text" in event:
                    text = event.get("log_text") or event.get("log_format")
                    failure = event.get("log_failure", "")
                    print(node.node_id, event.get("log_time"), level, text, str(failure)[:2000])

    @inlineCallbacks
    def client(self, node: NodeProcess, user: str) -> Any:
        client = yield node.connect(mint_token(user, rooms=["*"]))
        self.addCleanup(client.drop)
        return Tap(client)

    def xadd(self, method: str, params: dict[str, Any], **extra: Any) -> Deferred[str]:
        payload = {"method": method, "params": params, **extra}
        return StreamClient(self.redis).xadd("stream:requests", {"payload": json.dumps(payload)})

    @inlineCallbacks
    def backend_call(self, method: str, params: dict[str, Any]) -> Any:
        """An ingress request with reply_to; fires with the reply."""
        reply_to = f"list:response:{uuid.uuid4()}"
        yield self.xadd(method, params, reply_to=reply_to, correlation_id="c1")
        reply = yield wait_until(lambda: self.redis.execute_command("RPOP", reply_to),
                                 what=f"the reply to {method}")
        return json.loads(reply)

    @inlineCallbacks
    def publish(self, room: str, seqs: range, key_prefix: str | None = None) -> Any:
        """Publish seq numbers in order (as one node does), retrying while Redis is away."""
        cursors = []
        for seq in seqs:
            key = None if key_prefix is None else f"{key_prefix}{seq}"
            while True:
                try:
                    cursor = yield self.publisher.publish(room, EVENT, {"seq": seq}, key)
                    break
                except Exception:
                    if key is None:
                        raise
                    yield sleep(0.05)
            cursors.append(cursor)
        return cursors

    def publish_paced(self, room: str, count: int, interval: float) -> Deferred[Any]:
        """Publish seq 0..count-1 to C{room}, C{interval} s apart (a steady stream)."""

        async def go() -> None:
            for seq in range(count):
                await self.publisher.publish(room, EVENT, {"seq": seq})
                await sleep(interval)

        return Deferred.fromCoroutine(go())

    def wait(self, predicate: Callable[[], bool], timeout: float = 15, what: str = "") -> Any:
        return wait_until(predicate, timeout=timeout, what=what)

    @inlineCallbacks
    def stream_through_kills(self, nodes: Sequence[NodeProcess], room: str, count: int,
                             kill: Callable[[], Deferred[Any]]) -> Any:
        """
        A client of C{room} on each node; C{kill} three times (each after
        the second node's client got a few more events) while C{count}
        events stream in: every client gets every event once, all in one
        order, and none is closed or sent to recover.
        """
        taps = []
        for i, node in enumerate(nodes):
            tap = yield self.client(node, f"user{i}")
            yield tap.join(room)
            taps.append(tap)
        publishing = self.publish_paced(room, count, interval=0.002)
        for _ in range(3):
            seen = len(taps[1].events)
            yield self.wait(lambda seen=seen: len(taps[1].events) >= seen + count // 9,
                            what="more events on the second node")
            yield kill()
        yield publishing
        yield self.wait(lambda: all(len(t.events) >= count for t in taps), what="every event")
        yield barrier(self.publisher.publish, room, taps)
        reference = [e["cursor"] for e in taps[0].events]
        for tap in taps:
            self.assertEqual(tap.seqs(), list(range(count)))
            self.assertEqual([e["cursor"] for e in tap.events], reference)
            self.assertFalse(tap.client.closed.called)  # never sent to recover

    @inlineCallbacks
    def settled(self, room: str, taps: list[Tap]) -> Any:
        """
        Every ingress entry acknowledged (none can be handled, so published,
        again), then a barrier through the room: what the taps hold now is
        everything they will ever get.
        """

        @inlineCallbacks
        def acknowledged() -> Any:
            groups = yield self.redis.execute_command("XINFO", "GROUPS", "stream:requests")
            info = dict(zip(groups[0][::2], groups[0][1::2], strict=True))
            return int(info["pending"]) == 0 and int(info["lag"]) == 0

        yield wait_until(acknowledged, what="every ingress entry acknowledged")
        yield barrier(self.publisher.publish, room, taps)


class DeliveryTests(ClusterTestCase):
    @inlineCallbacks
    def test_every_event_once_in_one_order_on_every_node(self) -> Any:
        """
        Clients on three nodes in one room: each gets every event exactly once,
        all in the same (cursor) order, whichever node handled the entry.
        """
        nodes = yield self.cluster(3)
        room = "workspace:1"
        taps = []
        for i, node in enumerate(nodes):
            for user in (f"u{i}a", f"u{i}b"):
                tap = yield self.client(node, user)
                yield tap.join(room)
                taps.append(tap)
        count = 300
        for seq in range(count):
            yield self.xadd(
                "publish", {"room": room, "event": EVENT, "data": {"seq": seq}}
            )
        yield self.wait(lambda: all(len(t.events) >= count for t in taps), what="all events")
        yield self.settled(room, taps)  # a duplicate would have arrived by now
        reference = [e["cursor"] for e in taps[0].events]
        for tap in taps:
            self.assertEqual(sorted(tap.seqs()), list(range(count)))
            self.assertEqual([e["cursor"] for e in tap.events], reference)
        keys = [parse_cursor(c) for c in reference]
        self.assertEqual(keys, sorted(keys))
        # every node's ingress consumer took part
        handled = yield self.redis.execute_command("XINFO", "CONSUMERS", "stream:requests", "rpc_group")
        self.assertGreaterEqual(len(handled), 2)

    @inlineCallbacks
    def test_drop_and_rejoin_elsewhere_no_gap_no_duplicate(self) -> Any:
        """
        A client loses its socket under a steady stream and rejoins, on the
        same or another node, with its last cursor: the complete sequence.
        """
        nodes = yield self.cluster(2)
        room = "session:s1"
        tap = yield self.client(nodes[0], "alice")
        first = yield tap.join(room)
        self.assertFalse(first["recovered"])
        watcher = yield self.client(nodes[1], "bob")
        yield watcher.join(room)
        count = 600
        publishing = self.publish_paced(room, count, interval=0.003)
        rejoins = []
        for target in (nodes[1], nodes[0], nodes[0], nodes[1]):
            events, seen = tap.events, len(tap.events)
            yield self.wait(
                lambda events=events, seen=seen: len(events) >= seen + 60, what="more events"
            )
            since = tap.cursor(room)
            yield tap.client.drop()
            away = len(watcher.events)  # events keep coming while the client is away
            yield self.wait(lambda away=away: len(watcher.events) >= away + 10, what="more events")
            fresh = yield self.client(target, "alice")
            fresh.events = tap.events  # one history across connections
            tap = fresh
            result = yield tap.join(room, since)
            rejoins.append(result)
        yield publishing
        yield self.wait(lambda: len(tap.events) >= count and len(watcher.events) >= count)
        yield barrier(self.publisher.publish, room, [tap, watcher])  # nothing more to come
        self.assertEqual(tap.seqs(), list(range(count)))
        self.assertEqual(watcher.seqs(), list(range(count)))
        for result in rejoins:
            self.assertTrue(result["recovered"])
        self.assertTrue(any(r["missed"] for r in rejoins))

    @inlineCallbacks
    def test_cursor_older_than_history(self) -> Any:
        """More than UNREALON_HISTORY_SIZE events since the cursor: recovered false, missed []."""
        nodes = yield self.cluster(2)
        room = "workspace:old"
        tap = yield self.client(nodes[0], "alice")
        start = yield tap.join(room)
        cursors = yield self.publish(room, range(HISTORY_SIZE + 50))
        other = yield self.client(nodes[1], "alice")
        old = yield other.join(room, start["cursor"])
        self.assertEqual((old["recovered"], old["missed"]), (False, []))
        self.assertEqual(old["cursor"], cursors[-1])
        recent = yield other.join(room, cursors[-HISTORY_SIZE - 1])
        self.assertTrue(recent["recovered"])
        self.assertEqual(
            [m["params"]["data"]["seq"] for m in recent["missed"]],
            list(range(50, HISTORY_SIZE + 50)),
        )
        # the node of the first client agrees
        again = yield tap.join(room, start["cursor"])
        self.assertEqual((again["recovered"], again["missed"]), (False, []))


class PresenceTests(ClusterTestCase):
    def sentinel(self, room: str, *taps: Tap) -> Deferred[None]:
        """What came before has arrived at every tap (L{barrier})."""
        return barrier(self.publisher.publish, room, taps)

    @inlineCallbacks
    def test_presence_agrees_across_nodes(self) -> Any:
        """joined/left per user wherever its connections live; list the same everywhere."""
        nodes = yield self.cluster(3)
        room = "workspace:p"
        bob = yield self.client(nodes[1], "bob")
        yield bob.join(room)
        alice = yield self.client(nodes[0], "alice")
        yield alice.join(room)
        yield self.wait(lambda: len(bob.presence) >= 1, what="presence.joined")
        self.assertEqual(
            bob.presence, [{"method": "presence.joined", "room": room, "user_id": "alice", "info": {}}]
        )
        for tap in (alice, bob):
            listed = yield tap.client.call("presence.list", {"room": room})
            self.assertEqual(
                listed["users"],
                [
                    {"user_id": "alice", "info": {}, "connections": 1},
                    {"user_id": "bob", "info": {}, "connections": 1},
                ],
            )
        # alice's second connection, on a third node: no new announcement
        alice2 = yield self.client(nodes[2], "alice")
        yield alice2.join(room)
        yield self.sentinel(room, bob, alice, alice2)
        self.assertEqual(len(bob.presence), 1)
        counted = yield bob.client.call("presence.count", {"room": room})
        self.assertEqual((counted["users"], counted["connections"]), (2, 3))
        # alice's own connections never hear about alice
        self.assertEqual(alice.presence, [])
        self.assertEqual(alice2.presence, [])
        # first of her connections leaves: nothing; the last one: presence.left
        yield alice.client.close()
        yield self.sentinel(room, bob, alice2)
        self.assertEqual(len(bob.presence), 1)
        yield alice2.client.call("rooms.leave", {"room": room})
        yield self.wait(lambda: len(bob.presence) >= 2, what="presence.left")
        self.assertEqual(bob.presence[1], {"method": "presence.left", "room": room, "user_id": "alice"})
        for node_tap in (bob,):
            listed = yield node_tap.client.call("presence.list", {"room": room})
            self.assertEqual([u["user_id"] for u in listed["users"]], ["bob"])
        reply = yield self.backend_call("presence.list", {"room": room})
        self.assertTrue(reply["success"], reply)
        self.assertEqual([u["user_id"] for u in reply["result"]["users"]], ["bob"])

    @inlineCallbacks
    def test_crashed_node_users_leave_within_ttl(self) -> Any:
        """SIGKILL a node: its users leave (presence.left elsewhere) within the TTL."""
        nodes = yield self.cluster(2)
        room = "workspace:crash"
        bob = yield self.client(nodes[1], "bob")
        yield bob.join(room)
        alice = yield self.client(nodes[0], "alice")
        yield alice.join(room)
        carol = yield self.client(nodes[0], "carol.x@example")
        yield carol.join(room)
        yield self.wait(lambda: len(bob.presence) >= 2, what="joined")
        online = yield self.backend_call("presence.online", {"user_ids": ["alice", "bob"]})
        self.assertEqual(sorted(online["result"]["online"]), ["alice", "bob"])
        yield nodes[0].kill()
        killed = time.monotonic()
        yield self.wait(lambda: len(bob.presence) >= 4, timeout=PRESENCE_TTL + 3, what="left")
        elapsed = time.monotonic() - killed
        self.assertLessEqual(elapsed, PRESENCE_TTL + 0.5)
        self.assertEqual(
            sorted((p["method"], p["user_id"]) for p in bob.presence[2:]),
            [("presence.left", "alice"), ("presence.left", "carol.x@example")],
        )
        listed = yield bob.client.call("presence.list", {"room": room})
        self.assertEqual([u["user_id"] for u in listed["users"]], ["bob"])
        online = yield self.backend_call("presence.online", {"user_ids": ["alice", "bob"]})
        self.assertEqual(online["result"]["online"], ["bob"])
        self.flushLoggedErrors()
        print(f"\n  presence.left {elapsed:.2f} s after SIGKILL (TTL {PRESENCE_TTL} s)", end=" ")


class JoinRaceTests(TestCase):
    """A node in this process, so the test can hold Redis still mid-join."""

    @inlineCallbacks
    def test_close_during_join_leaves_no_ghost(self) -> Any:
        """
        A connection that closes (or leaves) while its join waits on Redis:
        its presence.leave reaches Redis before the join's presence.join.
        The user must not stay present for ever.
        """
        server = yield start_redis(self)
        running = yield start_node(self, redis_url=server.url, presence_ttl=3)
        watcher = Tap((yield running.connect(mint_token("watcher", rooms=["*"]))))
        self.addCleanup(watcher.client.drop)
        yield watcher.join("workspace:race")
        for user, how in (("closer", "drop"), ("leaver", "leave")):
            tap = Tap((yield running.connect(mint_token(user, rooms=["*"]))))
            self.addCleanup(tap.client.drop)
            server.pause()
            tap.client.send(
                {"jsonrpc": "2.0", "id": 1, "method": "rooms.join",
                 "params": {"room": "workspace:race"}}
            )
            if how == "leave":
                tap.client.send(
                    {"jsonrpc": "2.0", "id": 2, "method": "rooms.leave",
                     "params": {"room": "workspace:race"}}
                )
            yield sleep(0.1)
            if how == "drop":
                yield tap.client.drop()
            yield sleep(0.1)
            server.resume()
            if how == "drop":
                yield wait_until(lambda u=user: running.node.hub.user_connections(u) == 0,
                                 what=f"{user} gone")
            else:  # both replies: the join and the leave are done
                yield wait_until(lambda t=tap: {m.get("id") for m in t.client.messages
                                                if isinstance(m, dict)} >= {1, 2},
                                 what=f"{user}'s join and leave answered")
        # two heartbeats (TTL/3 apart) after the last resume: every join and leave
        # has landed long since, and a ghost entry would have been renewed
        members = sync_redis(server.url)
        self.addCleanup(members.close)
        for _ in range(2):
            yield self.heartbeat(members, "workspace:race", "watcher|")
            listed = yield watcher.client.call("presence.list", {"room": "workspace:race"})
            self.assertEqual([u["user_id"] for u in listed["users"]], ["watcher"])

    def heartbeat(self, redis: Any, room: str, member: str) -> Deferred[Any]:
        """
        Fires once C{member}'s presence entry in C{room} has been renewed by a
        heartbeat: liveness is per node, so once the liveness record of the
        node holding the entry has been pushed back.
        """
        token = next(name.rpartition("@")[2] for name in redis.zrange(f"unrealon:p:{room}:m", 0, -1)
                     if name.startswith(member))

        def expiry() -> float:
            return float(redis.zscore("unrealon:p:alive", token))

        first = expiry()
        return wait_until(lambda: expiry() > first, what="a presence heartbeat")


class OverlappingJoinTests(TestCase):
    @inlineCallbacks
    def test_second_join_while_first_waits(self) -> Any:
        """
        rooms.join twice on one room, the second while the first still waits:
        no event of the room reaches the connection before both replies, and
        the events held for the first are not thrown away by the second.
        """
        server = yield start_redis(self)
        running = yield start_node(self, redis_url=server.url)
        broker = running.node.broker
        room = "workspace:twice"
        start = yield broker.recover(room, None)
        original = broker.recover
        calls = []

        def slow_first(room_: str, since: str | None) -> Deferred[Any]:
            d = original(room_, since)
            calls.append(since)
            if len(calls) == 1:  # the store answered; the reply is slow to come back
                d.addCallback(lambda r: sleep(0.4).addCallback(lambda _: r))
            return d

        broker.recover = slow_first
        client = yield running.connect(mint_token("alice", rooms=["*"]))
        self.addCleanup(client.drop)
        order: list[Any] = []
        original_received = client._received

        def received(payload: bytes, is_binary: bool) -> None:
            message = json.loads(payload)
            order.append(message.get("id") or message["params"]["data"]["seq"])
            original_received(payload, is_binary)

        client._received = received  # type: ignore[method-assign]
        client.send({"jsonrpc": "2.0", "id": "first", "method": "rooms.join",
                     "params": {"room": room, "since": start.cursor}})
        yield sleep(0.05)
        yield broker.publish(room, EVENT, {"seq": 1})
        yield broker.publish(room, EVENT, {"seq": 2})
        yield sleep(0.05)
        client.send({"jsonrpc": "2.0", "id": "second", "method": "rooms.join",
                     "params": {"room": room, "since": start.cursor}})
        yield sleep(0.1)
        yield broker.publish(room, EVENT, {"seq": 3})
        yield wait_until(lambda: "first" in order and 3 in order, what="first reply and 3")
        yield broker.publish(room, EVENT, {"seq": 4})  # behind anything else that could come
        yield wait_until(lambda: 4 in order, what="the last event")
        self.assertEqual(order, ["second", "first", 3, 4])


class BackendTests(ClusterTestCase):
    @inlineCallbacks
    def test_disconnect_closes_the_user_everywhere(self) -> Any:
        """connections.disconnect: 4003 for the user's connections on every node, nobody else."""
        nodes = yield self.cluster(3)
        victims = []
        for node in (*nodes, nodes[0]):
            tap = yield self.client(node, "mallory")
            victims.append(tap.client)
        bystanders = []
        for node in nodes:
            tap = yield self.client(node, "alice")
            bystanders.append(tap.client)
        reply = yield self.backend_call(
            "connections.disconnect", {"user_id": "mallory", "reason": "banned"}
        )
        self.assertTrue(reply["success"], reply)
        self.assertEqual(reply["result"], {"user_id": "mallory"})
        codes = yield Deferred.fromCoroutine(_closed_codes(victims))
        self.assertEqual(codes, [4003] * len(victims))
        for client in bystanders:
            result = yield client.call("system.ping")
            self.assertIs(result["pong"], True)


async def _closed_codes(clients: list[WSClient]) -> list[int | None]:
    codes = []
    for client in clients:
        client.closed.addTimeout(10, reactor)  # type: ignore[arg-type]
        code, _ = await client.closed
        codes.append(code)
    return codes


class RedisOutageTests(ClusterTestCase):
    """
    Nodes that lose Redis for a moment: clients end with the complete
    sequence, or were told to recover (recovered: false) -- never a silent gap.
    """

    timeout = 40

    @inlineCallbacks
    def follow(self, nodes: list[NodeProcess], user: str, room: str, start: int) -> Any:
        """A client that rejoins with its cursor, on the next node, whenever it is closed."""
        state: dict[str, Any] = {"events": [], "closes": [], "reloads": 0, "tap": None}
        token = mint_token(user, rooms=["*"])

        async def run() -> None:
            index, since = start, None
            while not state.get("done"):
                node = nodes[index % len(nodes)]
                index += 1
                try:
                    client = await node.connect(token)
                except Exception:
                    await sleep(0.2)
                    continue
                tap = Tap(client)
                tap.events = state["events"]
                state["tap"] = tap
                try:
                    result = await tap.join(room, since)
                except Exception:
                    client.drop()
                    await client.closed
                    await sleep(0.2)
                    continue
                if since is not None and not result["recovered"]:
                    state["reloads"] += 1
                    state["events"].append({"reload": True, "cursor": result["cursor"]})
                if state.get("done"):
                    client.drop()
                code, _ = await client.closed
                state["closes"].append(code)
                since = _last_cursor(state["events"]) or result["cursor"]

        state["run"] = Deferred.fromCoroutine(run())

        def stop() -> Deferred[None]:
            state["done"] = True
            tap = state["tap"]
            if tap is not None:
                tap.client.drop()
            d: Deferred[None] = state["run"]
            d.addTimeout(10, reactor)  # type: ignore[arg-type]
            return d

        self.addCleanup(stop)
        yield self.wait(lambda: state["tap"] is not None and bool(state["tap"].joins))
        return state

    @inlineCallbacks
    def run_outage(self, persistent: bool, outage: Callable[[], Deferred[None]]) -> Any:
        nodes = yield self.cluster(2, persistent=persistent)
        room = "workspace:outage"
        followers = []
        for i, user in enumerate(("alice", "bob")):
            state = yield self.follow(nodes, user, room, start=i)
            followers.append(state)
        count = 400
        state = {"next": 0}

        async def publish() -> None:
            while state["next"] < count:
                seq = state["next"]
                await self.publish(room, range(seq, seq + 1), key_prefix="outage-")
                state["next"] += 1
                await sleep(0.004)

        publishing = Deferred.fromCoroutine(publish())
        yield self.wait(lambda: state["next"] > 100)
        yield outage()
        yield publishing
        yield self.wait(
            lambda: all(_seqs(f["events"])[-1:] == [count - 1] for f in followers),
            timeout=30, what="the last event",
        )
        yield barrier(self.publisher.publish, room, [f["tap"] for f in followers])
        for follower in followers:
            events = follower["events"]
            seqs = _seqs(events)
            self.assertEqual(len(seqs), len(set(seqs)), "a duplicate")
            # between reloads the sequence is complete; a gap only ever
            # follows an explicit recovered: false
            segments: list[list[int]] = [[]]
            for event in events:
                if event.get("reload"):
                    segments.append([])
                else:
                    segments[-1].append(event["data"]["seq"])
            for segment in segments:
                if segment:
                    self.assertEqual(segment, list(range(segment[0], segment[0] + len(segment))))
            self.assertEqual(segments[0][0], 0)
        return nodes, followers

    @inlineCallbacks
    def test_redis_restart_with_data(self) -> Any:
        """A persistent Redis restarts: nodes resume their feed; nothing lost, nobody reloads."""

        @inlineCallbacks
        def outage() -> Any:
            yield self.server.stop()
            yield sleep(0.5)
            yield self.server.start()

        nodes, followers = yield self.run_outage(True, outage)
        for follower in followers:
            self.assertEqual(follower["reloads"], 0)
            self.assertEqual(_seqs(follower["events"]), list(range(400)))
        for node in nodes:
            health = yield node.health()
            self.assertEqual(health["status"], "ok")

    @inlineCallbacks
    def test_redis_paused(self) -> Any:
        """Redis hangs (SIGSTOP) for a second, then answers again: nothing lost."""

        @inlineCallbacks
        def outage() -> Any:
            self.server.pause()
            yield sleep(1.0)
            self.server.resume()

        _, followers = yield self.run_outage(False, outage)
        for follower in followers:
            self.assertEqual(follower["reloads"], 0)
            self.assertEqual(_seqs(follower["events"]), list(range(400)))

    @inlineCallbacks
    def test_redis_lost_its_data(self) -> Any:
        """
        Redis restarts empty: the nodes cannot prove continuity, so their
        clients are closed (1001) and rejoin; the lost history says
        recovered: false (an explicit reload), never a silent gap.
        """

        @inlineCallbacks
        def outage() -> Any:
            yield self.server.kill()
            yield sleep(0.3)
            yield self.server.start()

        _, followers = yield self.run_outage(False, outage)
        for follower in followers:
            self.assertIn(1001, follower["closes"])
            self.assertGreaterEqual(follower["reloads"], 1)


def _seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["seq"] for e in events if not e.get("reload")]


def _last_cursor(events: list[dict[str, Any]]) -> str | None:
    return str(events[-1]["cursor"]) if events else None
