"""
Redis faults against real nodes (PROTOCOL.md section 1, revision 2): Redis
killed mid-stream, Redis absent at start, a reader hit by a bug.

Each scenario is bounded, loopback only, and asserts counts: every event
delivered, once, in order; /health saying what is true at each step.  The
recovery times are printed (the closing note quotes them), never asserted.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.helpers.cluster import EVENT, Tap
from tests.helpers.node import mint_token, start_node
from tests.helpers.process import NodeProcess
from tests.helpers.redis_server import RedisServer, redis_server_binary, start_redis
from tests.helpers.waiting import sleep, wait_until
from unrealon.engine.redisclient import StreamClient, connect, parse_redis_url

ROOM = "workspace:faults"


def entry(seq: int, room: str = ROOM) -> dict[str, str]:
    payload = {"method": "publish", "params": {"room": room, "event": EVENT, "data": {"seq": seq}}}
    return {"payload": json.dumps(payload)}


class Producer:
    """
    XADDs numbered entries every few milliseconds, with explicit ids, so an
    XADD whose reply was lost to a Redis crash can be retried without ever
    adding the same entry twice (Redis refuses an id that is not larger).
    """

    def __init__(self, streams: StreamClient, total: int) -> None:
        self._streams = streams
        self.total = total
        self.sent = 0
        self._base_ms = int(time.time() * 1000)
        self._busy = False
        self._loop = LoopingCall(self._tick)

    def start(self) -> None:
        self._loop.start(0.005)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        if self._busy or self.sent >= self.total:
            return
        self._busy = True
        seq = self.sent
        d = self._streams.xadd("stream:requests", entry(seq), id=f"{self._base_ms + seq}-0")
        d.addTimeout(1.0, reactor)

        def added(_: Any) -> None:
            self.sent = seq + 1

        def failed(failure: Any) -> None:
            if "equal or smaller" in failure.getErrorMessage():
                self.sent = seq + 1  # it was added; only its reply was lost

        d.addCallbacks(added, failed)
        d.addBoth(lambda _: setattr(self, "_busy", False))


class RedisRestartTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_redis_killed_and_restarted_mid_stream(self) -> Any:
        """
        Redis (appendonly, fsync always) is SIGKILLed while a producer keeps
        appending: the node rides it out, and once Redis is back the client
        gets every event exactly once, in order; the entries the node had
        read but not finished are handled again at once (not after the claim
        idle of 30 s), and /health is back to 200 within 3 s.
        """
        server = yield start_redis(self, persistent=True)
        running = yield start_node(self, redis_url=server.url, claim_idle=30)
        producer_redis = connect(parse_redis_url(server.url))
        self.addCleanup(producer_redis.disconnect)
        tap = Tap((yield running.connect(mint_token("reader", rooms=["*"]))))
        self.addCleanup(tap.client.drop)
        yield tap.join(ROOM)
        producer = Producer(StreamClient(producer_redis), total=400)
        self.addCleanup(producer.stop)
        producer.start()
        yield wait_until(lambda: len(tap.events) >= 100, timeout=20, what="100 events")
        yield server.kill()
        killed = time.monotonic()
        yield wait_until(lambda: not running.node.broker.feed_ok, timeout=10,
                         what="the node noticing")
        code, _ = yield running.http_get("/health")
        self.assertEqual(code, 503)
        yield sleep(1.0)  # an outage of a second or so
        yield server.start()
        back = time.monotonic()
        before = len(tap.events)

        health_at = yield healthy_again(running)
        yield wait_until(lambda: len(tap.events) > before, timeout=10, what="an event after")
        first_event_at = time.monotonic()
        yield wait_until(lambda: len(tap.events) >= producer.total, timeout=40,
                         what="every event")
        self.assertEqual(tap.seqs(), list(range(producer.total)))
        self.assertLess(health_at - back, 3.0)
        print(f"\n  Redis down {back - killed:.2f} s; /health 200 {health_at - back:.2f} s and "
              f"first event {first_event_at - back:.2f} s after Redis was back", end=" ")


class RedisAbsentAtStartTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_node_serves_without_redis_then_with_it(self) -> Any:
        """
        A node whose Redis is not there: it listens, /live is 200, /health
        503 "degraded"; a client connects and authenticates, rooms.join gets
        -32011 within 5 s; the warning names Redis's address, never its
        password, and is not repeated every second.  Redis starts: within 3 s
        /health is 200 and an entry appended to the ingress stream reaches the
        client.
        """
        if redis_server_binary() is None:
            self.skipTest("redis-server is not installed")
        password = "s3cret-redis-passw0rd"
        server = RedisServer(reactor, self.mktemp(), extra_args=["--requirepass", password])
        self.addCleanup(server.close)
        url = f"unix://:{password}@{server.socket_path}?db=0"
        node = NodeProcess(self, url, "absent", env={"UNREALON_LOG_LEVEL": "info"})
        yield node.start(until="/live")
        code, body = yield node.http_get("/health")
        self.assertEqual((code, json.loads(body)["status"]), (503, "degraded"))
        client = yield node.connect(mint_token("early", rooms=["*"]))
        self.addCleanup(client.drop)
        pong = yield client.call("system.ping")
        self.assertIs(pong["pong"], True)
        asked = time.monotonic()
        reply = yield client.request("rooms.join", {"room": ROOM}, timeout=8)
        self.assertEqual(reply["error"]["code"], -32011)
        self.assertIs(reply["error"]["data"]["retryable"], True)
        self.assertLess(time.monotonic() - asked, 6.0)
        warnings = [line for line in node.output().splitlines() if "unreachable" in line]
        self.assertTrue(warnings, node.output()[-2000:])
        self.assertTrue(any(server.socket_path in line for line in warnings))
        self.assertNotIn(password, node.output())
        self.assertLessEqual(len(warnings), 2)  # one, and no line per retry
        yield server.start()
        back = time.monotonic()

        health_at = yield healthy_again(node)
        self.assertLess(health_at - back, 3.0)
        tap = Tap(client)
        yield tap.join(ROOM)
        redis = connect(parse_redis_url(url))
        self.addCleanup(redis.disconnect)
        yield StreamClient(redis).xadd("stream:requests", entry(7))
        yield wait_until(lambda: tap.seqs() == [7], timeout=10, what="the event")
        self.assertTrue(any("reachable again" in line for line in node.output().splitlines()))
        self.assertNotIn(password, node.output())
        print(f"\n  Redis started: /health 200 after {health_at - back:.2f} s", end=" ")


class ReaderFailureTests(TestCase):
    """A bug in a reader's loop: logged with its traceback, counted, /health degraded, restarted."""

    timeout = 60

    @inlineCallbacks
    def check_reader(self, reader_name: str, break_it: Any, repair: Any) -> Any:
        server = yield start_redis(self)
        running = yield start_node(self, redis_url=server.url)
        redis = connect(parse_redis_url(server.url))
        self.addCleanup(redis.disconnect)
        failures: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_failure") is not None and event.get("loop") == reader_name:
                failures.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        tap = Tap((yield running.connect(mint_token("reader", rooms=["*"]))))
        self.addCleanup(tap.client.drop)
        yield tap.join(ROOM)
        break_it(running.service)

        @inlineCallbacks
        def degraded() -> Any:
            status, body = yield running.http_get("/health")
            return status == 503 and json.loads(body)["status"] == "degraded"

        yield wait_until(degraded, timeout=10, what="/health degraded")
        self.assertTrue(failures)
        self.assertIn("injected", failures[0]["log_failure"].getTraceback())
        _, metrics = yield running.http_get("/metrics")
        self.assertIn(f'unrealon_loop_failures_total{{loop="{reader_name}"}}'.encode(), metrics)
        repair(running.service)

        yield healthy_again(running)
        yield StreamClient(redis).xadd("stream:requests", entry(1))
        yield wait_until(lambda: tap.seqs() == [1], timeout=10, what="the event")
        # logged with their traceback, as trial sees too
        self.assertTrue(self.flushLoggedErrors(RuntimeError))

    def test_ingress_reader(self) -> Any:
        def break_it(service: Any) -> None:
            reader = service.ingress._reader
            reader.original, reader.xreadgroup = reader.xreadgroup, _injected

        def repair(service: Any) -> None:
            reader = service.ingress._reader
            reader.xreadgroup = reader.original

        return self.check_reader("ingress reader", break_it, repair)

    def test_feed_reader(self) -> Any:
        def break_it(service: Any) -> None:
            reader = service.node.broker.feed._reader
            reader.original, reader.xread = reader.xread, _injected

        def repair(service: Any) -> None:
            reader = service.node.broker.feed._reader
            reader.xread = reader.original

        return self.check_reader("cluster feed reader", break_it, repair)


def healthy_again(node: Any) -> Deferred[float]:
    """The time (monotonic) at which C{node}'s /health first answered 200 (within 10 s)."""
    d = wait_until(lambda: node.http_get("/health").addCallback(lambda r: r[0] == 200),
                   timeout=10, what="/health 200")
    return d.addCallback(lambda _: time.monotonic())


def _injected(*args: Any, **kwargs: Any) -> Deferred[Any]:
    raise RuntimeError("injected bug in the read")
