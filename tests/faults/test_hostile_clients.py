"""
Hostile and unlucky clients against a real node on real sockets (PROTOCOL.md
sections 2, 3 and 7, revision 2).

Each scenario is bounded, loopback only, and asserts counts: what the
hostile client got (a close code, a status, a refusal), and that the
healthy client next to it lost nothing.  Timings are printed, never
asserted.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.helpers.cluster import EVENT, Tap
from tests.helpers.node import SECRET, mint_token, start_node
from tests.helpers.process import NodeProcess
from tests.helpers.rawws import RawWebSocket, open_raw
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import sleep, wait_until
from unrealon.engine.redisclient import StreamClient, connect, parse_redis_url


def ping(i: Any = 1) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "system.ping"})


class CloseFrameTests(TestCase):
    """Every close is a close handshake ending in FIN; bad close frames get 1002/1007."""

    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Any:
        self.running = yield start_node(self, handshake_timeout=1)

    def raw(self, token: str | None = None) -> Deferred[RawWebSocket]:
        d = ensureDeferred(open_raw(self.running.ws_port, token or mint_token("alice")))

        def opened(raw: RawWebSocket) -> RawWebSocket:
            self.addCleanup(raw.abort)
            return raw

        return d.addCallback(opened)

    @inlineCallbacks
    def answer_to(self, payload: bytes) -> Any:
        """Send a close frame with C{payload}; return (server close frames, how TCP ended)."""
        raw = yield self.raw()
        raw.close(payload)
        ended = yield raw.ended
        return raw.close_frames(), ended

    @inlineCallbacks
    def test_invalid_close_codes_get_1002_then_fin(self) -> Any:
        """Codes that may not be sent on the wire: the server's close says 1002, then FIN."""
        for code in (1005, 1006, 1015, 0, 999, 1004, 1016, 2000, 2999, 5000, 65535):
            frames, ended = yield self.answer_to(code.to_bytes(2, "big"))
            self.assertEqual([f.close_code for f in frames], [1002], code)
            self.assertEqual(ended, "fin", code)

    @inlineCallbacks
    def test_one_byte_close_payload_gets_1002_then_fin(self) -> Any:
        frames, ended = yield self.answer_to(b"\x03")
        self.assertEqual([f.close_code for f in frames], [1002])
        self.assertEqual(ended, "fin")

    @inlineCallbacks
    def test_invalid_utf8_reason_gets_1007_then_fin(self) -> Any:
        frames, ended = yield self.answer_to((1000).to_bytes(2, "big") + b"bye \xff\xfe")
        self.assertEqual([f.close_code for f in frames], [1007])
        self.assertEqual(ended, "fin")

    @inlineCallbacks
    def test_valid_close_codes_are_echoed_then_fin(self) -> Any:
        """The server answers a valid close with the same code, then ends with FIN."""
        for code in (1000, 1001, 1003, 1008, 1011, 1012, 1013, 1014, 3000, 4000, 4999):
            frames, ended = yield self.answer_to(code.to_bytes(2, "big") + b"done")
            self.assertEqual([f.close_code for f in frames], [code], code)
            self.assertEqual(ended, "fin", code)
        frames, ended = yield self.answer_to(b"")
        self.assertEqual([f.payload for f in frames], [b""])
        self.assertEqual(ended, "fin")

    @inlineCallbacks
    def test_server_close_answered_ends_in_fin(self) -> Any:
        """A close the server starts (4003 here) ends with FIN once the client answers."""
        raw = yield self.raw(mint_token("bob"))
        self.running.node.hub.disconnect_user("bob", "bye")
        yield raw.wait_for(lambda: raw.close_frames())
        self.assertEqual([f.close_code for f in raw.close_frames()], [4003])
        raw.close((4003).to_bytes(2, "big"))
        ended = yield raw.ended
        self.assertEqual(ended, "fin")

    @inlineCallbacks
    def test_server_close_unanswered_is_reset_after_timeout(self) -> Any:
        """A client that never answers the server's close is reset after the handshake timeout."""
        raw = yield self.raw(mint_token("carol"))
        self.running.node.hub.disconnect_user("carol", "bye")
        ended = yield raw.ended
        self.assertEqual([f.close_code for f in raw.close_frames()], [4003])
        self.assertEqual(ended, "reset")


class HandshakeRefusalTests(TestCase):
    """Refused handshakes say why in a short plain-text body, never the token."""

    timeout = 30

    @inlineCallbacks
    def test_401_bodies_say_why(self) -> Any:
        running = yield start_node(self)
        cases = {
            "token expired": mint_token("alice", ttl=-60),
            "invalid signature": mint_token("alice", secret="x" * 40),
            "invalid token": "not-a-jwt",
        }
        for why, token in cases.items():
            raw = yield ensureDeferred(open_raw(running.ws_port, token))
            yield raw.ended
            self.assertTrue(raw.head.startswith(b"HTTP/1.1 401 Unauthorized"), raw.head)
            self.assertIn(why.encode(), raw.body)
            self.assertNotIn(token.encode(), raw.head + raw.body)
            self.assertEqual(raw.header("Content-Type"), "text/plain; charset=utf-8")
            self.assertEqual(int(raw.header("Content-Length") or 0), len(raw.body))
            self.assertIsNotNone(raw.header("WWW-Authenticate"))

    @inlineCallbacks
    def test_unauthenticated_cap(self) -> Any:
        """
        Past UNREALON_MAX_UNAUTHENTICATED open unauthenticated connections a
        handshake without a token gets 503 with Retry-After; one with a token
        is still accepted, and authenticating frees a place.
        """
        running = yield start_node(self, max_unauthenticated=3)
        waiting = []
        for _ in range(3):
            raw = yield ensureDeferred(open_raw(running.ws_port, None))
            self.addCleanup(raw.abort)
            self.assertTrue(raw.upgraded, raw.head)
            waiting.append(raw)
        refused = yield ensureDeferred(open_raw(running.ws_port, None))
        self.assertTrue(refused.head.startswith(b"HTTP/1.1 503"), refused.head)
        self.assertTrue(int(refused.header("Retry-After") or 0) > 0)
        self.assertIn(b"unauthenticated", refused.body)
        with_token = yield ensureDeferred(open_raw(running.ws_port, mint_token("dan")))
        self.addCleanup(with_token.abort)
        self.assertTrue(with_token.upgraded)
        # one of the waiting ones authenticates: a place is free again
        first = waiting[0]
        first.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "auth.authenticate",
                               "params": {"token": mint_token("erin")}}))
        yield first.wait_for(lambda: first.texts())
        self.assertIn("result", json.loads(first.texts()[0]))
        again = yield ensureDeferred(open_raw(running.ws_port, None))
        self.addCleanup(again.abort)
        self.assertTrue(again.upgraded, again.head)
        # a closed one frees its place too
        waiting[1].abort()
        yield waiting[1].ended
        yield wait_until(lambda: running.service.factory.unauthenticated.count == 2)


class FloodTests(TestCase):
    """A client flooding the node is refused cheaply and closed; its neighbour is unaffected."""

    timeout = 60

    @inlineCallbacks
    def test_invalid_flood_next_to_a_healthy_client(self) -> Any:
        """
        One client sends garbage, invalid requests, auth.refresh with a bad
        token and notifications as fast as it can: it is closed with 4029 as
        soon as it passes ten times the limit within a second.  A healthy
        client pinging at the same time gets every answer.
        """
        running = yield start_node(self, rate_limit=50)
        healthy = yield running.connect(mint_token("healthy"))
        self.addCleanup(healthy.drop)
        flooder = yield ensureDeferred(open_raw(running.ws_port, mint_token("flood")))
        self.addCleanup(flooder.abort)
        kinds = [
            "not json",
            json.dumps({"jsonrpc": "1.0", "id": 1, "method": "x"}),
            json.dumps({"jsonrpc": "2.0", "id": 2, "method": "auth.refresh",
                        "params": {"token": "bad"}}),
            json.dumps({"jsonrpc": "2.0", "method": "system.ping"}),
            json.dumps([1, 2]),
        ]
        sent = 0

        def flood() -> None:
            nonlocal sent
            if flooder.ended.called:
                return
            for _ in range(50):
                flooder.send(kinds[sent % len(kinds)])
                sent += 1

        flooding = LoopingCall(flood)
        flooding.start(0.01)  # ~5,000 messages/s, 100 times the limit
        self.addCleanup(lambda: flooding.running and flooding.stop())
        rtts = []
        started = time.monotonic()
        while not flooder.close_frames() and time.monotonic() - started < 10:
            t0 = time.monotonic()
            yield healthy.call("system.ping")
            rtts.append(time.monotonic() - t0)
            yield sleep(0.04)  # within its own limit
        yield flooder.wait_for(flooder.close_frames)
        elapsed = time.monotonic() - started
        flooding.stop()
        codes = [f.close_code for f in flooder.close_frames()]
        self.assertEqual(codes, [4029])
        replies = []
        for text in flooder.texts():
            reply = json.loads(text)
            replies.extend(reply if isinstance(reply, list) else [reply])
        refused = [r for r in replies if r.get("error", {}).get("code") == -32029]
        self.assertTrue(refused, "over the limit, requests are answered -32029")
        # the burst (100 messages) at most was handled: the rest were refused
        handled = [r for r in replies if r.get("error", {}).get("code") != -32029]
        self.assertLessEqual(len(handled), 2 * 50 + 10)
        # the healthy client is still served, and was throughout
        for _ in range(20):
            yield healthy.call("system.ping")
        self.assertIsNone(healthy.close_code)
        print(f"\n  flooder closed 4029 within {elapsed:.2f} s, {sent} messages sent; "
              f"healthy ping p50 {1000 * statistics.median(rtts):.2f} ms over {len(rtts)} pings",
              end=" ")

    @inlineCallbacks
    def test_every_kind_of_message_counts(self) -> Any:
        """Garbage, invalid requests and auth.* calls all draw from the same bucket."""
        running = yield start_node(self, rate_limit=5)
        raw = yield ensureDeferred(open_raw(running.ws_port, mint_token("alice")))
        self.addCleanup(raw.abort)
        messages = ["{", json.dumps({"id": 1}), json.dumps({"jsonrpc": "2.0", "id": 2,
                    "method": "auth.refresh", "params": {"token": "bad"}})] * 4
        for message in messages:  # 12 messages, the burst is 10
            raw.send(message)
        raw.send(ping("last"))
        yield raw.wait_for(lambda: len(raw.texts()) == 13)
        replies = [json.loads(t) for t in raw.texts()]
        codes = [r["error"]["code"] for r in replies]
        self.assertEqual(codes[:10], [-32700, -32600, -32001] * 3 + [-32700])
        self.assertEqual(codes[10:], [-32029] * 3)
        self.assertEqual(replies[-1]["id"], "last")


class SendBudgetTests(TestCase):
    """UNREALON_SEND_BUFFER_LIMIT is judged on what the kernel did not take."""

    timeout = 90

    @inlineCallbacks
    def test_healthy_reader_small_budget_big_burst(self) -> Any:
        """
        A client reading at full speed, UNREALON_SEND_BUFFER_LIMIT=65536, a
        backend burst of 2,000 events of 2 KB (4 MB): it gets every event,
        in order, and is never closed (the old budget closed it with 4008
        after a few dozen events: bytes queued within one turn were counted
        as unsent).
        """
        server = yield start_redis(self)
        running = yield start_node(self, redis_url=server.url, send_buffer_limit=65536)
        redis = connect(parse_redis_url(server.url))
        self.addCleanup(redis.disconnect)
        reader = Tap((yield running.connect(mint_token("reader", rooms=["*"]))))
        self.addCleanup(reader.client.drop)
        yield reader.join("session:burst")
        streams = StreamClient(redis)
        pad = "x" * 2048
        adds = [
            streams.xadd("stream:requests", {"payload": json.dumps(
                {"method": "publish", "params": {"room": "session:burst", "event": EVENT,
                                                 "data": {"seq": seq, "pad": pad}}})})
            for seq in range(2000)
        ]
        yield gatherResults(adds)
        yield wait_until(lambda: len(reader.events) >= 2000 or reader.client.closed.called,
                         timeout=60, what="the burst")
        self.assertIsNone(reader.client.close_code)
        self.assertEqual(reader.seqs(), list(range(2000)))


class ChurnTests(TestCase):
    """Connections opened and ended every way leave nothing behind."""

    timeout = 120

    @inlineCallbacks
    def test_10k_connection_churn_fds_back_to_baseline(self) -> Any:
        """
        10,000 connections against a node process (clean closes, resets,
        binary messages, unauthenticated ones timing out), 200 at a time:
        afterwards the node holds no connection, and its open file
        descriptors are back to what they were before.
        """
        node = NodeProcess(self, "", "churn", env={"UNREALON_AUTH_TIMEOUT": "0.5"})
        yield node.start()
        fds = f"/proc/{node.pid}/fd"
        baseline = len(os.listdir(fds))
        started = time.monotonic()
        out, err, status = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "tests.helpers.churn", str(node.ws_port), "10000", "200", SECRET],
            env=dict(os.environ), path=os.getcwd(),
        )
        self.assertEqual(status, 0, err)
        outcomes = json.loads(out)
        self.assertEqual(sum(v for k, v in outcomes.items() if k.startswith("way")), 10_000,
                         outcomes)

        async def settled() -> bool:
            health = await node.health()
            return health["connections"] == 0 and len(os.listdir(fds)) == baseline

        yield wait_until(settled, timeout=15, what="connections gone, fds at baseline")
        print(f"\n  10,000 connections churned in {time.monotonic() - started:.1f} s: {outcomes}",
              end=" ")
