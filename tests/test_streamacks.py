"""
StreamAcks on a private redis-server: the acknowledgements of one reactor
turn are one XACK, every waiter learns the outcome, a failure reaches them all.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.redis_server import start_redis
from unrealon.engine.redisclient import StreamClient, connect, parse_redis_url
from unrealon.engine.streamacks import StreamAcks


class StreamAcksTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        server = yield start_redis(self)
        self.redis = connect(parse_redis_url(server.url))
        self.addCleanup(self.redis.disconnect)
        self.streams = StreamClient(self.redis)
        yield self.redis.execute_command("XGROUP", "CREATE", "s", "g", "0", "MKSTREAM")

    @inlineCallbacks
    def pending(self) -> Any:
        summary = yield self.redis.execute_command("XPENDING", "s", "g")
        return int(summary[0])

    @inlineCallbacks
    def xack_calls(self) -> Any:
        info = yield self.redis.execute_command("INFO", "commandstats")
        for line in str(info).splitlines():
            if line.startswith("cmdstat_xack:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0

    @inlineCallbacks
    def test_one_xack_per_turn(self) -> Any:
        for _ in range(5):
            yield self.redis.execute_command("XADD", "s", "*", "k", "v")
        entries = yield self.redis.execute_command(
            "XREADGROUP", "GROUP", "g", "c", "COUNT", "10", "STREAMS", "s", ">"
        )
        ids = [entry[0] for entry in entries[0][1]]
        self.assertEqual((yield self.pending()), 5)
        acks = StreamAcks(reactor, self.streams, "s", "g")
        yield gatherResults([acks.ack(i) for i in ids[:4]])
        self.assertEqual((yield self.pending()), 1)
        self.assertEqual((yield self.xack_calls()), 1)
        yield acks.ack(ids[4])
        self.assertEqual((yield self.pending()), 0)
        self.assertEqual((yield self.xack_calls()), 2)

    @inlineCallbacks
    def test_failure_reaches_every_waiter(self) -> Any:
        yield self.redis.execute_command("SET", "plain", "x")
        acks = StreamAcks(reactor, self.streams, "plain", "g")
        waits = [acks.ack("1-1"), acks.ack("1-2")]
        for wait in waits:
            with self.assertRaises(Exception) as caught:
                yield wait
            self.assertIn("WRONGTYPE", str(caught.exception))
