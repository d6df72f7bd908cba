"""
Tests for unrealon.engine.redisclient, against a private redis-server per test
(tests/helpers/redis_server.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Generator
from typing import Any

import txredisapi
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.helpers.redis_server import RedisServer, RedisServerError, start_redis
from tests.helpers.waiting import sleep, wait_until
from unrealon._compat.redis import LeanEncodingProtocol as _LeanEncodingProtocol
from unrealon.engine.redisclient import (
    REPLY_SCRIPT,
    AutoClaim,
    LuaScript,
    RedisAddress,
    StreamClient,
    StreamEntry,
    UnexpectedReply,
    connect,
    parse_redis_url,
    push_reply,
    redis_error_code,
)
from unrealon.redisurl import DEFAULT_PORT

Gen = Generator[Any, Any, None]


def blocked_in_redis(client: StreamClient) -> Deferred[Any]:
    """Fires once Redis reports a client blocked in XREADGROUP (CLIENT LIST, flag b)."""

    def blocked() -> Deferred[bool]:
        d = client.redis.execute_command("CLIENT", "LIST")
        return d.addCallback(lambda text: any(
            "cmd=xreadgroup" in line and "b" in line.split(" flags=")[1].split(" ")[0]
            for line in str(text).splitlines()))

    return wait_until(blocked, timeout=5, what="the read blocked in Redis")


def wait_until_ping(client: StreamClient) -> Deferred[Any]:
    """Fires once the handler answers a PING again."""
    return wait_until(lambda: client.ping(0.25, reactor).addCallback(lambda _: True),
                      timeout=5, what="Redis answering PING")


# --------------------------------------------------------------------- URLs


class ParseRedisURLTests(unittest.SynchronousTestCase):
    def test_defaults(self) -> None:
        a = parse_redis_url("redis://")
        self.assertEqual(a, RedisAddress(kind="tcp", host="localhost", port=DEFAULT_PORT, db=0))
        self.assertEqual(
            parse_redis_url("redis://cache.internal"),
            RedisAddress(kind="tcp", host="cache.internal", port=DEFAULT_PORT),
        )

    def test_full_tcp(self) -> None:
        a = parse_redis_url("REDIS://alice:p%40ss%3Aw0rd@Example.COM:6380/3")
        self.assertEqual(a.kind, "tcp")
        self.assertEqual(a.host, "example.com")
        self.assertEqual(a.port, 6380)
        self.assertEqual(a.db, 3)
        self.assertEqual(a.username, "alice")
        self.assertEqual(a.password, "p@ss:w0rd")
        self.assertIsNone(a.path)

    def test_password_only_and_query(self) -> None:
        a = parse_redis_url("redis://:secret@h:1/")
        self.assertEqual((a.username, a.password, a.db), (None, "secret", 0))
        a = parse_redis_url("redis://h?db=5&password=pw&username=u")
        self.assertEqual((a.username, a.password, a.db), ("u", "pw", 5))
        self.assertEqual(parse_redis_url("redis://h/2?db=2").db, 2)

    def test_ipv6(self) -> None:
        a = parse_redis_url("redis://[::1]:7000/1")
        self.assertEqual((a.host, a.port, a.db), ("::1", 7000, 1))
        self.assertEqual(a.display(), "redis://[::1]:7000/1")

    def test_unix(self) -> None:
        a = parse_redis_url("unix:///run/redis/redis.sock?db=4")
        self.assertEqual(a, RedisAddress(kind="unix", path="/run/redis/redis.sock", db=4))
        a = parse_redis_url("unix://u:pw@/tmp/r%20s.sock")
        self.assertEqual((a.path, a.db, a.username, a.password), ("/tmp/r s.sock", 0, "u", "pw"))

    def test_sentinel(self) -> None:
        a = parse_redis_url("redis+sentinel://:s3cret@10.0.0.1,10.0.0.2:26380,[::1]:5/cache/2")
        self.assertEqual(a.kind, "sentinel")
        self.assertEqual(a.sentinels, (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 5)))
        self.assertEqual((a.service, a.db, a.password, a.username), ("cache", 2, "s3cret", None))
        self.assertEqual(a.display(),
                         "redis+sentinel://:***@10.0.0.1:26379,10.0.0.2:26380,[::1]:5/cache/2")
        self.assertEqual(parse_redis_url("redis+sentinel://h/m").db, 0)
        for bad, why in (
            ("redis+sentinel://h", "service name"),
            ("redis+sentinel://h/m/1/x", "service name"),
            ("redis+sentinel://h:0/m", "Sentinel port"),
            ("redis+sentinel://h:x/m", "Sentinel port"),
            ("redis+sentinel://,h/m", "host is empty"),
            ("redis+sentinel://h/m?db=1", "no query"),
            ("redis+sentinel://bob@h/m", "needs a password"),
        ):
            with self.assertRaises(ValueError) as e:
                parse_redis_url(bad)
            self.assertIn(why, str(e.exception), bad)

    def test_password_hidden(self) -> None:
        a = parse_redis_url("redis://u:s3cret@h:1/2")
        self.assertNotIn("s3cret", repr(a))
        self.assertNotIn("s3cret", a.display())
        self.assertEqual(a.display(), "redis://u:***@h:1/2")
        u = parse_redis_url("unix://:s3cret@/x.sock")
        self.assertEqual(u.display(), "unix://:***@/x.sock?db=0")

    def test_errors(self) -> None:
        bad = [
            "http://h",
            "localhost:16379",
            "rediss://:s3cret@h",
            "redis://:s3cret@h:notaport",
            "redis://:s3cret@h:70000",
            "redis://:s3cret@h:0",
            "redis://:s3cret@h/abc",
            "redis://:s3cret@h/-1",
            "redis://:s3cret@h/1/2",
            "redis://:s3cret@h/1?db=2",
            "redis://:s3cret@h?timeout=3",
            "redis://:s3cret@h?db=1&db=1",
            "redis://:s3cret@h?password=x",
            "redis://s3cret@h",
            "redis://u:pa/s3cret@h",
            "redis://:s3cret@h#frag",
            "redis://:s3cret@[::1",
            "unix://:s3cret@",
            "unix://:s3cret@/",
            "unix://:s3cret@host/path.sock",
            "unix://:s3cret@/x.sock?db=x",
        ]
        for url in bad:
            with self.assertRaises(ValueError, msg=url) as cm:
                parse_redis_url(url)
            message = str(cm.exception)
            self.assertTrue(message.startswith("invalid Redis URL"), message)
            self.assertNotIn("s3cret", message, url)
            self.assertIsNone(cm.exception.__cause__)

    def test_error_messages_are_specific(self) -> None:
        def msg(url: str) -> str:
            with self.assertRaises(ValueError) as cm:
                parse_redis_url(url)
            return str(cm.exception)

        self.assertIn("'http'", msg("http://h"))
        self.assertIn("TLS", msg("rediss://h"))
        self.assertIn("port", msg("redis://h:x"))
        self.assertIn("database", msg("redis://h/x"))
        self.assertIn("timeout", msg("redis://h?timeout=1"))
        self.assertIn("absolute", msg("unix://relative.sock"))

    def test_address_validation(self) -> None:
        with self.assertRaises(ValueError):
            RedisAddress(kind="tcp", host="h", port=None)
        with self.assertRaises(ValueError):
            RedisAddress(kind="unix", path=None)
        with self.assertRaises(ValueError):
            RedisAddress(kind="unix", path="/x", db=-1)
        with self.assertRaises(ValueError):
            RedisAddress(kind="tcp", host="h", port=1, username="u")

    def test_connect_arguments(self) -> None:
        a = RedisAddress(kind="unix", path="/nonexistent/redis.sock")
        self.assertRaises(ValueError, connect, a, poolsize=0)
        self.assertRaises(ValueError, connect, a, blocking=True, poolsize=2)


class ValueTests(unittest.SynchronousTestCase):
    def test_entry_ms(self) -> None:
        self.assertEqual(StreamEntry("1700000000123-7", {"a": "b"}).ms(), 1700000000123)
        self.assertFalse(StreamEntry("1-0", {"a": "b"}).deleted)
        self.assertTrue(StreamEntry("1-0", None).deleted)

    def test_redis_error_code(self) -> None:
        self.assertEqual(
            redis_error_code(txredisapi.ResponseError("BUSYGROUP Consumer Group")),
            "BUSYGROUP",
        )
        self.assertEqual(redis_error_code(txredisapi.ResponseError("ERR x")), "ERR")
        self.assertIsNone(redis_error_code(txredisapi.ResponseError("lowercase")))
        self.assertIsNone(redis_error_code(txredisapi.ConnectionError("Lost")))
        self.assertIsNone(redis_error_code(ValueError("ERR")))

    def test_ping_deadline_with_clock(self) -> None:
        # a handler whose command never answers: the deadline is ping's own
        class Never:
            def execute_command(self, *args: object, **kw: object) -> Deferred[Any]:
                return Deferred()

        clock = Clock()
        d = StreamClient(Never()).ping(0.5, clock)
        self.assertNoResult(d)
        clock.advance(0.5)
        self.failureResultOf(d, defer.TimeoutError)

    def test_ping_measures_with_clock(self) -> None:
        pending: Deferred[Any] = Deferred()

        class Later:
            def execute_command(self, *args: object, **kw: object) -> Deferred[Any]:
                return pending

        clock = Clock()
        d = StreamClient(Later()).ping(1.0, clock)
        clock.advance(0.25)
        pending.callback("PONG")
        self.assertEqual(self.successResultOf(d), 250.0)

    def test_unexpected_reply(self) -> None:
        class Odd:
            def execute_command(self, *args: object, **kw: object) -> Deferred[Any]:
                return defer.succeed("not a list")

        self.failureResultOf(StreamClient(Odd()).xrange("s"), UnexpectedReply)
        self.failureResultOf(StreamClient(Odd()).xlen("s"), UnexpectedReply)

    def test_lua_sha(self) -> None:
        self.assertEqual(LuaScript("return 1").sha, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db")


# ------------------------------------------------------------- real Redis


class RedisTestCase(unittest.TestCase):
    timeout = 20
    persistent = False

    @inlineCallbacks
    def setUp(self) -> Gen:  # type: ignore[override]
        self.server: RedisServer = yield start_redis(self, persistent=self.persistent)
        self.address = parse_redis_url(self.server.url)
        self.redis = self.connect()
        self.client = StreamClient(self.redis)

    def connect(self, **kwargs: Any) -> Any:
        handler = connect(self.address, **kwargs)
        self.addCleanup(handler.disconnect)
        return handler


class StreamCommandTests(RedisTestCase):
    @inlineCallbacks
    def test_xadd_xlen_xrange_xrevrange(self) -> Gen:
        c = self.client
        id1 = yield c.xadd("s", {"payload": "007", "n": "1_000", "f": "1.5"})
        id2 = yield c.xadd("s", {"payload": "héllo", "raw": b"\xff\x00"})
        id3 = yield c.xadd("s", {"payload": ""})
        self.assertIsInstance(id1, str)
        self.assertEqual((yield c.xlen("s")), 3)
        self.assertEqual((yield c.xlen("missing")), 0)

        entries = yield c.xrange("s")
        self.assertEqual([e.id for e in entries], [id1, id2, id3])
        # convertNumbers=False: numbers-looking values stay strings
        self.assertEqual(entries[0].fields, {"payload": "007", "n": "1_000", "f": "1.5"})
        # non-UTF-8 bytes are decoded with replacement characters
        self.assertEqual(entries[1].fields, {"payload": "héllo", "raw": "\ufffd\x00"})
        self.assertEqual(entries[2].fields, {"payload": ""})
        self.assertLess(abs(entries[0].ms() / 1000 - time.time()), 5)

        self.assertEqual([e.id for e in (yield c.xrange("s", count=2))], [id1, id2])
        self.assertEqual([e.id for e in (yield c.xrange("s", id2, "+"))], [id2, id3])
        self.assertEqual([e.id for e in (yield c.xrevrange("s"))], [id3, id2, id1])
        self.assertEqual([e.id for e in (yield c.xrevrange("s", end=id2, count=5))], [id2, id1])
        self.assertEqual((yield c.xrange("missing")), [])

    @inlineCallbacks
    def test_xadd_explicit_id_and_maxlen(self) -> Gen:
        c = self.client
        self.assertEqual((yield c.xadd("s", {"a": "1"}, id="5-1")), "5-1")
        entries = yield c.xrange("s")
        self.assertEqual(entries[0].ms(), 5)
        for i in range(5):
            yield c.xadd("s", {"i": str(i)}, maxlen=2, approximate=False)
        self.assertEqual((yield c.xlen("s")), 2)
        self.assertEqual([e.fields for e in (yield c.xrange("s"))], [{"i": "3"}, {"i": "4"}])
        # approximate trimming is accepted (it only trims whole nodes)
        yield c.xadd("s", {"i": "5"}, maxlen=1)
        error = yield self.assertFailure(
            c.xadd("s", {"a": "1"}, id="1-1"), txredisapi.ResponseError
        )
        self.assertEqual(redis_error_code(error), "ERR")
        self.assertRaises(ValueError, c.xadd, "s", {})

    @inlineCallbacks
    def test_xgroup_create_busygroup(self) -> Gen:
        c = self.client
        self.assertIs((yield c.xgroup_create("s", "g")), True)
        self.assertIs((yield c.xgroup_create("s", "g")), False)
        self.assertEqual((yield c.xlen("s")), 0)  # MKSTREAM made it
        error = yield self.assertFailure(
            c.xgroup_create("nostream", "g", mkstream=False), txredisapi.ResponseError
        )
        self.assertEqual(redis_error_code(error), "ERR")

    @inlineCallbacks
    def test_xreadgroup_and_xack(self) -> Gen:
        c = self.client
        yield c.xgroup_create("s", "g")
        id1 = yield c.xadd("s", {"payload": "1"})
        id2 = yield c.xadd("s", {"payload": "2"})
        got = yield c.xreadgroup("g", "a", {"s": ">"}, count=10, block_ms=None)
        self.assertEqual(
            got,
            [("s", [StreamEntry(id1, {"payload": "1"}), StreamEntry(id2, {"payload": "2"})])],
        )
        # nothing new, no BLOCK: nil -> []
        self.assertEqual((yield c.xreadgroup("g", "a", {"s": ">"}, count=10, block_ms=None)), [])
        # this consumer's pending entries
        pending = yield c.xreadgroup("g", "a", {"s": "0"}, count=1, block_ms=None)
        self.assertEqual([e.id for e in pending[0][1]], [id1])
        self.assertEqual((yield c.xack("s", "g", id1, id2)), 2)
        self.assertEqual((yield c.xack("s", "g", id1)), 0)
        self.assertEqual(
            (yield c.xreadgroup("g", "a", {"s": "0"}, count=10, block_ms=None)),
            [("s", [])],
        )
        self.assertRaises(ValueError, c.xack, "s", "g")
        self.assertRaises(ValueError, c.xreadgroup, "g", "a", {}, count=1, block_ms=None)

    @inlineCallbacks
    def test_xreadgroup_block_timeout(self) -> Gen:
        c = StreamClient(self.connect(blocking=True))
        yield c.xgroup_create("s", "g")
        started = time.monotonic()
        got = yield c.xreadgroup("g", "a", {"s": ">"}, count=10, block_ms=150)
        elapsed = time.monotonic() - started
        self.assertEqual(got, [])
        self.assertGreaterEqual(elapsed, 0.14)
        self.assertLess(elapsed, 2)

    @inlineCallbacks
    def test_xreadgroup_nogroup(self) -> Gen:
        error = yield self.assertFailure(
            self.client.xreadgroup("g", "a", {"s": ">"}, count=1, block_ms=None),
            txredisapi.ResponseError,
        )
        self.assertEqual(redis_error_code(error), "NOGROUP")

    @inlineCallbacks
    def test_xread(self) -> Gen:
        c = self.client
        id1 = yield c.xadd("s1", {"a": "1"})
        id2 = yield c.xadd("s2", {"b": "2"})
        got = yield c.xread({"s1": "0", "s2": "0"}, count=10, block_ms=None)
        self.assertEqual(
            got,
            [("s1", [StreamEntry(id1, {"a": "1"})]), ("s2", [StreamEntry(id2, {"b": "2"})])],
        )
        self.assertEqual((yield c.xread({"s1": id1}, count=10, block_ms=None)), [])
        blocking = StreamClient(self.connect(blocking=True))
        self.assertEqual((yield blocking.xread({"s1": "$"}, count=10, block_ms=100)), [])

    @inlineCallbacks
    def test_blocking_read_does_not_delay_ping(self) -> Gen:
        blocking = StreamClient(self.connect(blocking=True))
        yield blocking.ping(5, reactor)  # connected, so the read goes out at once
        yield self.client.xgroup_create("s", "g")
        started = time.monotonic()
        read = blocking.xreadgroup("g", "a", {"s": ">"}, count=10, block_ms=3000)
        yield blocked_in_redis(self.client)
        self.assertNoResult(read)
        for _ in range(5):
            latency = yield self.client.ping(1.0, reactor)
            self.assertLess(latency, 500)
        entry_id = yield self.client.xadd("s", {"payload": "wake"})
        got = yield read
        self.assertEqual(got, [("s", [StreamEntry(entry_id, {"payload": "wake"})])])
        self.assertLess(time.monotonic() - started, 2.5)

    @inlineCallbacks
    def test_xautoclaim_after_idle(self) -> Gen:
        c = self.client
        yield c.xgroup_create("s", "g")
        id1 = yield c.xadd("s", {"n": "1"})
        id2 = yield c.xadd("s", {"n": "2"})
        yield c.xreadgroup("g", "dead", {"s": ">"}, count=10, block_ms=None)
        nothing = yield c.xautoclaim("s", "g", "live", 60_000)
        self.assertEqual(nothing, AutoClaim("0-0", [], []))
        yield sleep(0.15)
        first = yield c.xautoclaim("s", "g", "live", 100, count=1)
        self.assertEqual(first.entries, [StreamEntry(id1, {"n": "1"})])
        self.assertEqual(first.next_id, id2)
        self.assertEqual(first.deleted_ids, [])
        rest = yield c.xautoclaim("s", "g", "live", 100, start=first.next_id)
        self.assertEqual(rest.entries, [StreamEntry(id2, {"n": "2"})])
        self.assertEqual(rest.next_id, "0-0")
        pending = yield c.xpending_range("s", "g")
        self.assertEqual(
            [(p.id, p.consumer, p.deliveries) for p in pending],
            [(id1, "live", 2), (id2, "live", 2)],
        )

    @inlineCallbacks
    def test_deleted_pel_entries(self) -> Gen:
        c = self.client
        yield c.xgroup_create("s", "g")
        id1 = yield c.xadd("s", {"n": "1"})
        id2 = yield c.xadd("s", {"n": "2"})
        yield c.xreadgroup("g", "a", {"s": ">"}, count=10, block_ms=None)
        self.assertEqual((yield c.xdel("s", id1)), 1)
        got = yield c.xreadgroup("g", "a", {"s": "0"}, count=10, block_ms=None)
        self.assertEqual(got, [("s", [StreamEntry(id1, None), StreamEntry(id2, {"n": "2"})])])
        self.assertTrue(got[0][1][0].deleted)
        self.assertEqual((yield c.xpending_summary("s", "g")).count, 2)
        yield sleep(0.03)
        claim = yield c.xautoclaim("s", "g", "b", 10)
        self.assertEqual(claim.entries, [StreamEntry(id2, {"n": "2"})])
        self.assertEqual(claim.deleted_ids, [id1])
        # Redis 7 drops deleted entries from the PEL while auto-claiming
        summary = yield c.xpending_summary("s", "g")
        self.assertEqual((summary.count, summary.consumers), (1, {"b": 1}))
        self.assertRaises(ValueError, c.xdel, "s")

    @inlineCallbacks
    def test_xpending(self) -> Gen:
        c = self.client
        yield c.xgroup_create("s", "g")
        empty = yield c.xpending_summary("s", "g")
        self.assertEqual(
            (empty.count, empty.min_id, empty.max_id, empty.consumers), (0, None, None, {})
        )
        self.assertEqual((yield c.xpending_range("s", "g")), [])
        ids = []
        for i in range(3):
            ids.append((yield c.xadd("s", {"n": str(i)})))
        yield c.xreadgroup("g", "a", {"s": ">"}, count=2, block_ms=None)
        yield c.xreadgroup("g", "b", {"s": ">"}, count=2, block_ms=None)
        summary = yield c.xpending_summary("s", "g")
        self.assertEqual(summary.count, 3)
        self.assertEqual((summary.min_id, summary.max_id), (ids[0], ids[2]))
        self.assertEqual(dict(summary.consumers), {"a": 2, "b": 1})

        everything = yield c.xpending_range("s", "g")
        self.assertEqual(
            [(p.id, p.consumer, p.deliveries) for p in everything],
            [(ids[0], "a", 1), (ids[1], "a", 1), (ids[2], "b", 1)],
        )
        for p in everything:
            self.assertIsInstance(p.idle_ms, int)
            self.assertGreaterEqual(p.idle_ms, 0)
        only_b = yield c.xpending_range("s", "g", consumer="b")
        self.assertEqual([p.id for p in only_b], [ids[2]])
        self.assertEqual(len((yield c.xpending_range("s", "g", count=1))), 1)
        self.assertEqual(
            [p.id for p in (yield c.xpending_range("s", "g", start=ids[1], end="+"))],
            ids[1:],
        )
        self.assertEqual((yield c.xpending_range("s", "g", idle_ms=60_000)), [])
        yield sleep(0.06)
        idle = yield c.xpending_range("s", "g", idle_ms=50, consumer="a")
        self.assertEqual([p.id for p in idle], ids[:2])
        self.assertTrue(all(p.idle_ms >= 50 for p in idle))

    @inlineCallbacks
    def test_xinfo_groups(self) -> Gen:
        c = self.client
        for i in range(3):
            yield c.xadd("s", {"n": str(i)})
        yield c.xgroup_create("s", "g1")
        yield c.xgroup_create("s", "g2", start_id="$")
        yield c.xreadgroup("g1", "a", {"s": ">"}, count=2, block_ms=None)
        infos = {g.name: g for g in (yield c.xinfo_groups("s"))}
        self.assertEqual(set(infos), {"g1", "g2"})
        g1, g2 = infos["g1"], infos["g2"]
        self.assertEqual((g1.consumers, g1.pending), (1, 2))
        self.assertEqual((g2.consumers, g2.pending), (0, 0))
        last = (yield c.xrevrange("s", count=1))[0].id
        self.assertEqual(g2.last_delivered_id, last)
        self.assertEqual(g1.lag, 1)
        self.assertEqual(g1.entries_read, 2)
        self.assertEqual(g2.lag, 0)
        error = yield self.assertFailure(c.xinfo_groups("missing"), txredisapi.ResponseError)
        self.assertEqual(redis_error_code(error), "ERR")

    @inlineCallbacks
    def test_ping(self) -> Gen:
        latency = yield self.client.ping(2.0, reactor)
        self.assertIsInstance(latency, float)
        self.assertGreaterEqual(latency, 0)
        self.assertLess(latency, 1000)

    @inlineCallbacks
    def test_client_id_ends_a_blocking_read(self) -> Gen:
        """The reader's CLIENT ID is what CLIENT UNBLOCK ends its BLOCK with."""
        reader = StreamClient(self.connect(blocking=True))
        client_id = yield reader.client_id()
        self.assertIsInstance(client_id, int)
        started = time.monotonic()
        reading = reader.xread({"s:unblock": "$"}, count=1, block_ms=10_000)
        yield sleep(0.1)
        yield self.client.redis.execute_command("CLIENT", "UNBLOCK", client_id)
        self.assertEqual((yield reading), [])
        self.assertLess(time.monotonic() - started, 5)

    @inlineCallbacks
    def test_pool(self) -> Gen:
        c = StreamClient(self.connect(poolsize=3))
        results = yield defer.gatherResults([c.xadd("s", {"n": str(i)}) for i in range(20)])
        self.assertEqual(len(set(results)), 20)
        self.assertEqual((yield c.xlen("s")), 20)

    @inlineCallbacks
    def test_db_is_selected(self) -> Gen:
        other = RedisAddress(kind="unix", path=self.address.path, db=3)
        c3 = StreamClient(self.connect_to(other))
        yield c3.xadd("s", {"a": "1"})
        self.assertEqual((yield c3.xlen("s")), 1)
        self.assertEqual((yield self.client.xlen("s")), 0)

    def connect_to(self, address: RedisAddress) -> Any:
        handler = connect(address)
        self.addCleanup(handler.disconnect)
        return handler


class LuaTests(RedisTestCase):
    @inlineCallbacks
    def test_script_survives_flush(self) -> Gen:
        script = LuaScript("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
        # never loaded: the first call goes through NOSCRIPT -> SCRIPT LOAD
        self.assertEqual((yield self.redis.execute_command("SCRIPT", "EXISTS", script.sha)), [0])
        self.assertEqual((yield script(self.redis, ["k"], ["v", 41])), ["k", "v", 42])
        self.assertEqual((yield self.redis.execute_command("SCRIPT", "EXISTS", script.sha)), [1])
        yield self.redis.execute_command("SCRIPT", "FLUSH")
        self.assertEqual((yield self.redis.execute_command("SCRIPT", "EXISTS", script.sha)), [0])
        self.assertEqual((yield script(self.redis, ["k"], [b"w", "1"])), ["k", "w", 2])
        self.assertEqual((yield script.load(self.redis)), script.sha)

    @inlineCallbacks
    def test_script_errors_surface(self) -> Gen:
        failing = LuaScript("return redis.call('NOSUCHCOMMAND')")
        error = yield self.assertFailure(failing(self.redis, [], []), txredisapi.ResponseError)
        self.assertEqual(redis_error_code(error), "ERR")
        broken = LuaScript("this is not lua")
        yield self.assertFailure(broken(self.redis, [], []), txredisapi.ResponseError)
        yield self.assertFailure(broken.load(self.redis), txredisapi.ResponseError)

    @inlineCallbacks
    def test_push_reply(self) -> Gen:
        key = "list:response:abc"
        self.assertIsNone((yield push_reply(self.redis, key, b'{"n": 1}')))
        yield push_reply(self.redis, key, '{"n": 2}')
        self.assertEqual(
            (yield self.redis.execute_command("LRANGE", key, 0, -1)),
            ['{"n": 2}', '{"n": 1}'],
        )
        ttl = yield self.redis.execute_command("TTL", key)
        self.assertTrue(58 <= ttl <= 60, ttl)
        yield push_reply(self.redis, "short", "x", ttl=5)
        self.assertTrue(0 < (yield self.redis.execute_command("TTL", "short")) <= 5)
        self.assertRaises(ValueError, push_reply, self.redis, key, "x", ttl=0)
        yield self.redis.execute_command("SCRIPT", "FLUSH")
        yield push_reply(self.redis, key, "3")
        self.assertEqual((yield self.redis.execute_command("LLEN", key)), 3)
        self.assertEqual(REPLY_SCRIPT.sha, LuaScript(REPLY_SCRIPT.source).sha)


class AuthTests(unittest.TestCase):
    timeout = 20

    @inlineCallbacks
    def test_password_and_acl_user(self) -> Gen:
        server = yield start_redis(
            self,
            extra_args=[
                "--requirepass", "topsecret",
                "--user", "alice", "on", ">alicepw", "~*", "&*", "+@all",
            ],
        )  # fmt: skip
        path = server.socket_path
        for url in (
            f"unix://:topsecret@{path}",
            f"unix://alice:alicepw@{path}?db=1",
            f"unix://{path}?username=alice&password=alicepw",
        ):
            handler = connect(parse_redis_url(url))
            self.addCleanup(handler.disconnect)
            c = StreamClient(handler)
            yield c.ping(5, reactor)
            yield c.xadd("s", {"a": "1"})

    @inlineCallbacks
    def test_wrong_password(self) -> Gen:
        server = yield start_redis(self, extra_args=["--requirepass", "topsecret"])
        handler = connect(parse_redis_url(f"unix://:wrong@{server.socket_path}"))
        self.addCleanup(handler.disconnect)
        c = StreamClient(handler)
        # a command issued before the AUTH failure waits for a connection
        # that never comes: only our own deadline ends it
        yield self.assertFailure(c.ping(0.5, reactor), defer.TimeoutError)
        # afterwards txredisapi has given up (no reconnect after a failed AUTH)
        yield self.assertFailure(c.xlen("s"), txredisapi.ConnectionError)

    @inlineCallbacks
    def test_bad_db(self) -> Gen:
        server = yield start_redis(self)
        handler = connect(RedisAddress(kind="unix", path=server.socket_path, db=99))
        self.addCleanup(handler.disconnect)
        c = StreamClient(handler)
        yield self.assertFailure(c.ping(0.5, reactor), defer.TimeoutError)
        yield self.assertFailure(c.xlen("s"), txredisapi.ConnectionError)

    @inlineCallbacks
    def test_tcp(self) -> Gen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = yield start_redis(self, extra_args=["--port", str(port), "--bind", "127.0.0.1"])
        self.assertTrue(server.running)
        handler = connect(parse_redis_url(f"redis://127.0.0.1:{port}/2"))
        self.addCleanup(handler.disconnect)
        c = StreamClient(handler)
        yield c.xadd("s", {"a": "1"})
        on_db2 = connect(RedisAddress(kind="unix", path=server.socket_path, db=2))
        self.addCleanup(on_db2.disconnect)
        self.assertEqual((yield StreamClient(on_db2).xlen("s")), 1)


class OutageTests(RedisTestCase):
    @inlineCallbacks
    def test_ping_times_out_when_redis_is_gone(self) -> Gen:
        yield self.client.ping(5, reactor)
        yield self.server.kill()
        started = time.monotonic()
        yield self.assertFailure(self.client.ping(0.5, reactor), defer.TimeoutError)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 1.5)
        # a command without a deadline waits for the connection to come back
        waiting = self.client.xlen("s")
        yield self.server.start()
        yield wait_until_ping(self.client)
        self.assertEqual((yield waiting), 0)

    @inlineCallbacks
    def test_ping_times_out_when_redis_hangs(self) -> Gen:
        yield self.client.ping(5, reactor)
        self.server.pause()
        try:
            yield self.assertFailure(self.client.ping(0.3, reactor), defer.TimeoutError)
        finally:
            self.server.resume()
        # the late PONG of the cancelled ping is discarded, replies stay in step
        self.assertEqual((yield self.client.xlen("s")), 0)
        yield self.client.ping(5, reactor)


class PersistentOutageTests(RedisTestCase):
    persistent = True

    @inlineCallbacks
    def test_reconnect_after_restart(self) -> Gen:
        c = self.client
        blocking = StreamClient(self.connect(blocking=True))
        yield c.xgroup_create("s", "g")
        ids = [(yield c.xadd("s", {"n": "1"})), (yield c.xadd("s", {"n": "2"}))]
        yield push_reply(self.redis, "r", "x")
        yield blocking.ping(5, reactor)
        # deliver both (they stay pending), then block for more
        yield blocking.xreadgroup("g", "a", {"s": ">"}, count=10, block_ms=None)
        in_flight = blocking.xreadgroup("g", "a", {"s": ">"}, count=1, block_ms=5000)
        yield blocked_in_redis(c)
        self.assertNoResult(in_flight)

        yield self.server.restart()
        # the blocked read was in flight: it fails, it is not silently retried
        yield self.assertFailure(in_flight, txredisapi.ConnectionError)

        yield wait_until_ping(c)
        yield wait_until_ping(blocking)
        # the AOF kept everything: stream, group, pending entries
        self.assertEqual((yield c.xlen("s")), 2)
        summary = yield c.xpending_summary("s", "g")
        self.assertEqual((summary.count, summary.min_id, summary.max_id), (2, ids[0], ids[1]))
        # scripts did not survive; LuaScript re-loads them
        yield push_reply(self.redis, "r", "y")
        self.assertEqual((yield self.redis.execute_command("LLEN", "r")), 2)
        got = yield blocking.xreadgroup("g", "a", {"s": "0"}, count=10, block_ms=100)
        self.assertEqual([e.id for e in got[0][1]], ids)


class RedisServerTests(unittest.TestCase):
    timeout = 20

    @inlineCallbacks
    def test_lifecycle(self) -> Gen:
        server = yield start_redis(self)
        self.assertTrue(server.running)
        self.assertTrue(server.url.startswith("unix:///"))
        self.assertTrue(server.url.endswith("/redis.sock?db=0"))
        yield self.assertFailure(server.start(), RedisServerError)
        handler = connect(parse_redis_url(server.url))
        self.addCleanup(handler.disconnect)
        c = StreamClient(handler)
        yield c.xadd("s", {"a": "1"})
        # not persistent: a restart comes back empty
        yield server.restart()
        yield wait_until_ping(c)
        self.assertEqual((yield c.xlen("s")), 0)
        yield server.stop()
        self.assertFalse(server.running)
        yield server.stop()  # no-op
        yield server.kill()  # no-op
        self.assertIn("ready to accept connections", server.output)

    def test_bad_binary_output(self) -> Deferred[None]:
        server = RedisServer(
            reactor,
            self.mktemp(),
            extra_args=["--no-such-option", "1"],
        )
        self.addCleanup(server.close)
        return self.assertFailure(server.start(), RedisServerError)


class LeanEncoderTests(unittest.SynchronousTestCase):
    """Our command encoder writes exactly the bytes txredisapi's own would."""

    @settings(max_examples=300)
    @given(st.lists(st.one_of(
        st.text(), st.binary(), st.integers(), st.floats(allow_nan=False), st.booleans(),
    ), max_size=12))
    def test_same_bytes_as_txredisapi(self, args: list[Any]) -> None:
        lean = _LeanEncodingProtocol(charset="utf-8", convertNumbers=False)
        plain = txredisapi.BaseRedisProtocol(charset="utf-8", convertNumbers=False)
        try:
            expected = plain._build_command(*args)
        except txredisapi.InvalidData:
            self.assertRaises(txredisapi.InvalidData, lean._build_command, *args)
        else:
            self.assertEqual(lean._build_command(*args), expected)


class LeanEncoderInUseTests(RedisTestCase):
    @inlineCallbacks
    def test_connections_use_the_lean_encoder(self) -> Gen:
        """Every handler connect() makes speaks through it, and Redis understands it."""
        yield self.redis.execute_command("SET", "k", "héllo ☃")
        self.assertEqual((yield self.redis.execute_command("GET", "k")), "héllo ☃")
        self.assertIs(self.redis._factory.protocol, _LeanEncodingProtocol)
        connection = yield self.redis._factory.getConnection()
        self.assertIsInstance(connection, _LeanEncodingProtocol)

    @inlineCallbacks
    def test_commands_go_straight_to_the_live_connection(self) -> Gen:
        """No pool lookup per command while the connection is up (the stock path is slow)."""
        yield self.redis.execute_command("PING")
        stock: list[bool] = []
        self.patch(self.redis._factory, "getConnection",
                   lambda peek=False: stock.append(peek) or defer.fail(AssertionError("stock")))
        self.assertEqual((yield self.redis.execute_command("ECHO", "x")), "x")
        self.assertEqual(stock, [])
