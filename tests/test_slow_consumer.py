"""
Slow consumers (ARCHITECTURE.md, PROTOCOL.md section 7: UNREALON_SEND_BUFFER_LIMIT).

A client that stops reading while its room is busy must not make the server
hold an unbounded amount of data for it: once more than the budget is
waiting for it the server closes it with 4008, and the other members of the
room lose nothing.  The node runs in this process (Redis engine, a private
redis-server), so the test can watch the bytes the server holds for the slow
connection: the transport's user-space buffer, sampled every few
milliseconds, plus what the session counted in its budget.

What the slow client sees: its socket buffers (kernel) hold what was sent
before the server stopped; once it reads again it gets those events, then
the close frame with 4008 if the server's closing handshake had not timed out
yet, else the TCP connection is simply gone (an unclean close, code 1006 on
the client's side).  Both are accepted; which one happened is recorded in
the test's output.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from tests.helpers.cluster import EVENT, Tap
from tests.helpers.node import mint_token, start_node
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until
from unrealon._compat.transport import unsent
from unrealon.engine.pubsub import READ_SLICE
from unrealon.engine.redisclient import StreamClient, connect, parse_redis_url

COUNT = 2000
#: 16 MB in all: more than the kernel's socket buffers hold (send buffer up to
#: 4 MiB here, plus the receiver's), so the server must hold the rest
SIZE = 8192
LIMIT = 1_048_576
ROOM = "workspace:busy"


def buffered(session: Any) -> int:
    """Bytes the session's transport holds in user space (not yet taken by the kernel)."""
    transport = session.transport
    return 0 if transport is None else unsent(transport)


class SlowConsumerTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_slow_reader_closed_others_get_everything(self) -> Any:
        server = yield start_redis(self)
        running = yield start_node(
            self, redis_url=server.url, send_buffer_limit=LIMIT, handshake_timeout=2
        )
        redis = connect(parse_redis_url(server.url))
        self.addCleanup(redis.disconnect)
        token = mint_token("fast", rooms=["*"])
        fast = Tap((yield running.connect(token)))
        self.addCleanup(fast.client.drop)
        other = Tap((yield running.connect(mint_token("other", rooms=["*"]))))
        self.addCleanup(other.client.drop)
        slow = Tap((yield running.connect(mint_token("slow", rooms=["*"]))))
        self.addCleanup(slow.client.drop)
        for tap in (fast, other, slow):
            yield tap.join(ROOM)
        [session] = [
            s for s in running.service.factory.connections if s.user_id == "slow"
        ]
        # the slow client stops reading from its socket
        assert slow.client.protocol is not None
        slow.client.protocol.transport.pauseProducing()  # type: ignore[union-attr]

        peak = {"buffer": 0}

        def sample() -> None:
            peak["buffer"] = max(peak["buffer"], buffered(session))

        sampler = LoopingCall(sample)
        sampler.start(0.002)
        self.addCleanup(lambda: sampler.running and sampler.stop())

        padding = "x" * SIZE
        streams = StreamClient(redis)
        adds = []
        for seq in range(COUNT):
            payload = {"method": "publish",
                       "params": {"room": ROOM, "event": EVENT,
                                  "data": {"seq": seq, "pad": padding}}}
            adds.append(streams.xadd("stream:requests", {"payload": json.dumps(payload)}))
        yield gatherResults(adds)
        yield wait_until(
            lambda: len(fast.events) >= COUNT and len(other.events) >= COUNT,
            timeout=30, what="every event at the fast clients",
        )
        yield wait_until(lambda: session.transport is None or session._closing, timeout=10)
        sampler.stop()
        # the others got everything, once, in order of their cursors
        self.assertEqual(sorted(fast.seqs()), list(range(COUNT)))
        self.assertEqual(fast.seqs(), other.seqs())
        self.assertEqual(fast.client.close_code, None)
        # the slow one was closed, and the server never held much more than the budget
        self.assertTrue(session._closing)
        # the budget is judged after each turn's write: at most one turn's
        # worth of events (a read of the room's channel and the event that crossed it)
        # past the limit was ever held
        self.assertLessEqual(peak["buffer"], LIMIT + READ_SLICE + 2 * SIZE)
        # reading again: what the kernel held, then the close (or the dropped connection)
        slow.client.protocol.transport.resumeProducing()  # type: ignore[union-attr]
        code, _ = yield slow.client.closed
        self.assertIn(code, (4008, 1006))
        self.assertLess(len(slow.events), COUNT)
        print(
            f"\n  slow reader: close code {code} after {len(slow.events)} events; "
            f"server peak buffer {peak['buffer']} B",
            end=" ",
        )
