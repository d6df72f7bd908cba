"""
Node faults in a cluster of real node processes on one Redis: a node killed
with entries pending, a node stopped past the claim idle.

The backend method here (L{tests.faults.slowext}) waits before it publishes,
so a node holds entries read and unfinished when the test kills or stops
it.  Each scenario asserts that every event reaches the clients exactly
once.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.cluster import EVENT, Tap, barrier
from tests.helpers.node import mint_token
from tests.helpers.process import NodeProcess
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until
from unrealon.engine.redisclient import StreamClient, connect, parse_redis_url

ROOM = "workspace:nodes"
STREAM = "stream:requests"
ENV = {
    "UNREALON_EXTENSIONS": "tests.faults.slowext:register",
    "UNREALON_CLAIM_IDLE": "1",
}


def slow_entry(seq: int, delay_ms: int) -> dict[str, str]:
    params = {"room": ROOM, "event": EVENT, "data": {"seq": seq}, "delay_ms": delay_ms}
    return {"payload": json.dumps({"method": "test.slow_publish", "params": params})}


class NodeFaultTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.redis = connect(parse_redis_url(self.server.url))
        self.addCleanup(self.redis.disconnect)
        self.streams = StreamClient(self.redis)

    def publish(self, room: str, event: str, data: dict[str, Any]) -> Any:
        """Publish through the ingress stream, as the backend does."""
        payload = {"method": "publish", "params": {"room": room, "event": event, "data": data}}
        return self.streams.xadd(STREAM, {"payload": json.dumps(payload)})

    @inlineCallbacks
    def pending_of(self, consumer: str) -> Any:
        pending = yield self.streams.xpending_range(STREAM, "rpc_group", count=1000,
                                                    consumer=consumer)
        return len(pending)

    @inlineCallbacks
    def test_node_killed_with_pending_entries(self) -> Any:
        """
        n1 reads 20 slow entries and is SIGKILLed before it finishes any:
        n2 claims them after the claim idle and publishes each once; later
        entries are handled too.  A client on n2 sees all 30, once each.
        """
        n1 = NodeProcess(self, self.server.url, "n1", ENV)
        yield n1.start()
        for seq in range(20):
            yield self.streams.xadd(STREAM, slow_entry(seq, 2000))

        @inlineCallbacks
        def all_pending() -> Any:
            n = yield self.pending_of("n1")
            return n == 20

        yield wait_until(all_pending, timeout=20, what="n1 holding 20 entries")
        yield n1.kill()
        n2 = NodeProcess(self, self.server.url, "n2", ENV)
        yield n2.start()
        tap = Tap((yield n2.connect(mint_token("watcher", rooms=["*"]))))
        self.addCleanup(tap.client.drop)
        yield tap.join(ROOM)
        for seq in range(20, 30):
            yield self.streams.xadd(STREAM, slow_entry(seq, 0))
        yield wait_until(lambda: len(tap.events) >= 30, timeout=30, what="30 events")
        self.assertEqual(sorted(tap.seqs()), list(range(30)))

        @inlineCallbacks
        def nothing_pending() -> Any:
            info = yield self.streams.xinfo_groups(STREAM)
            return info[0].pending == 0

        yield wait_until(nothing_pending, timeout=20, what="every entry acknowledged")
        yield barrier(self.publish, ROOM, [tap])  # nothing more will come
        self.assertEqual(sorted(tap.seqs()), list(range(30)))

    @inlineCallbacks
    def test_node_stopped_past_the_claim_idle(self) -> Any:
        """
        n1 holds slow entries and is SIGSTOPped past the claim idle: n2 claims
        and publishes them.  When n1 continues it finishes the same entries,
        and publishes nothing twice: clients on both nodes see each event once.
        """
        n1 = NodeProcess(self, self.server.url, "n1", ENV)
        n2 = NodeProcess(self, self.server.url, "n2", ENV)
        yield n1.start()
        yield n2.start()
        on1 = Tap((yield n1.connect(mint_token("one", rooms=["*"]))))
        on2 = Tap((yield n2.connect(mint_token("two", rooms=["*"]))))
        for tap in (on1, on2):
            self.addCleanup(tap.client.drop)
            yield tap.join(ROOM)
        for seq in range(20):
            yield self.streams.xadd(STREAM, slow_entry(seq, 1500))

        @inlineCallbacks
        def n1_holds_some() -> Any:
            n = yield self.pending_of("n1")
            return n > 0

        yield wait_until(n1_holds_some, timeout=20, what="n1 holding entries")
        n1.pause()
        held = yield self.pending_of("n1")
        # past the claim idle (1 s): n2 takes n1's entries and publishes them all
        yield wait_until(lambda: len(on2.events) >= 20, timeout=30, what="20 events on n2")
        n1.resume()
        yield wait_until(lambda: len(on1.events) >= 20, timeout=30, what="20 events on n1")

        @inlineCallbacks
        def nothing_pending() -> Any:
            info = yield self.streams.xinfo_groups(STREAM)
            return info[0].pending == 0

        yield wait_until(nothing_pending, timeout=20, what="every entry acknowledged")
        yield barrier(self.publish, ROOM, [on1, on2])  # nothing more will come
        for tap in (on1, on2):
            self.assertEqual(sorted(tap.seqs()), list(range(20)))
        self.assertEqual(on1.seqs(), on2.seqs())  # one order for the room
        print(f"\n  n1 held {held} entries when stopped; each published once", end=" ")
