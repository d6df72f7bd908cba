"""
The ingress consumer's state machine on a L{Clock}, against the in-memory
stand-in of L{tests.helpers.fakestreams}: taking back its own entries after
Redis comes back, claiming a dead consumer's, dead-lettering a poison
entry, recreating a lost group.  (tests/test_ingress.py checks the same
behaviours, and more, against a real redis-server.)
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers.fakestreams import FakeRedis
from unrealon import jsonrpc
from unrealon.ingress import IngressConsumer
from unrealon.jsonrpc import RPCError

STREAM, GROUP, DEAD = "stream:requests", "rpc_group", "stream:requests:dead"


def payload(n: int, reply_to: str | None = None) -> dict[str, str]:
    body: dict[str, Any] = {"method": "test.call", "params": {"n": n}}
    if reply_to is not None:
        body["reply_to"] = reply_to
    return {"payload": json.dumps(body)}


class ConsumerClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.redis = FakeRedis(self.clock)
        self.calls: list[tuple[int, str]] = []
        self.answers: list[Deferred[Any]] = []
        self.answer_at_once = True

    def dispatch(self, method: str, params: dict[str, Any], entry_id: str) -> Deferred[Any]:
        self.calls.append((params["n"], entry_id))
        if self.answer_at_once:
            return succeed({"n": params["n"]})
        d: Deferred[Any] = Deferred()
        self.answers.append(d)
        return d

    def consumer(self, **options: Any) -> IngressConsumer:
        values: dict[str, Any] = {"claim_idle": 30.0, "max_deliveries": 3}
        values.update(options)
        consumer = IngressConsumer(
            self.clock, self.redis.handler(), self.redis.handler(), self.dispatch,
            stream=STREAM, group=GROUP, consumer="me", dead_stream=DEAD, **values,
        )
        consumer.start()
        self.addCleanup(self.stop, consumer)
        return consumer

    def stop(self, consumer: IngressConsumer) -> None:
        d = consumer.stop()
        self.clock.advance(5)
        self.successResultOf(d)

    def replies(self, key: str) -> list[Any]:
        return [json.loads(r) for r in self.redis.lists.get(key, [])]

    def test_entries_handled_replied_and_acknowledged(self) -> None:
        self.consumer()
        self.redis.xadd(STREAM, payload(1, "list:r1"))
        self.clock.advance(0)
        self.assertEqual([n for n, _ in self.calls], [1])
        [reply] = self.replies("list:r1")
        self.assertEqual((reply["success"], reply["result"]), (True, {"n": 1}))
        self.assertEqual(self.redis.groups[(STREAM, GROUP)].pending, {})

    def test_own_entries_taken_back_at_once_after_redis_comes_back(self) -> None:
        """
        An entry read and not finished when Redis went away is handled again
        as soon as Redis is back, long before the claim idle (30 s).
        """
        self.answer_at_once = False
        consumer = self.consumer()
        entry_id = self.redis.xadd(STREAM, payload(7, "list:r7"))
        self.clock.advance(0)
        self.assertEqual(self.calls, [(7, entry_id)])
        self.redis.go_away()
        self.answers[0].callback({"n": 7})  # its reply cannot be written: left pending
        self.flushLoggedErrors()
        self.assertFalse(consumer.reader.working())
        self.clock.advance(2)
        self.redis.come_back()
        self.clock.advance(1)  # the reader's backoff is at most 1 s
        self.assertEqual(self.calls, [(7, entry_id), (7, entry_id)])
        self.answers[1].callback({"n": 7})
        self.assertEqual(len(self.replies("list:r7")), 1)
        self.clock.advance(0)  # acknowledgements go out at the end of the turn
        self.assertEqual(self.redis.groups[(STREAM, GROUP)].pending, {})
        self.assertTrue(consumer.reader.working())

    def test_a_dead_consumers_entries_are_claimed_after_the_idle(self) -> None:
        self.redis.execute("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
        entry_id = self.redis.xadd(STREAM, payload(3))
        self.redis.execute("XREADGROUP", "GROUP", GROUP, "dead", "COUNT", 10,
                           "STREAMS", STREAM, ">")
        self.consumer(claim_idle=10.0)
        self.clock.advance(5)
        self.assertEqual(self.calls, [])
        self.clock.advance(6)
        self.assertEqual(self.calls, [(3, entry_id)])
        self.assertEqual(self.redis.groups[(STREAM, GROUP)].pending, {})

    def test_a_poison_entry_is_dead_lettered_after_max_deliveries(self) -> None:
        failures: list[Deferred[Any]] = []

        def failing(method: str, params: dict[str, Any], entry_id: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            d.errback(RPCError(jsonrpc.INTERNAL_ERROR))
            failures.append(d)
            return d

        self.dispatch = failing  # type: ignore[method-assign]
        self.consumer(claim_idle=1.0, max_deliveries=3)
        self.redis.xadd(STREAM, payload(9, "list:r9"))
        for _ in range(10):
            self.clock.advance(1.1)
        self.assertEqual(len(failures), 3)
        [dead] = self.redis.streams[DEAD].values()
        fields = dict(zip(dead[::2], dead[1::2], strict=True))
        self.assertIn("failed 3 times", fields["reason"])
        [reply] = self.replies("list:r9")
        self.assertEqual(reply["error_code"], "internal_error")
        self.assertEqual(self.redis.groups[(STREAM, GROUP)].pending, {})

    def test_a_lost_group_is_created_again(self) -> None:
        consumer = self.consumer()
        self.clock.advance(0)
        self.redis.go_away()
        self.clock.advance(1)
        self.redis.come_back(empty=True)
        self.clock.advance(2)
        self.assertIn((STREAM, GROUP), self.redis.groups)
        self.redis.xadd(STREAM, payload(4))
        self.clock.advance(0)
        self.assertEqual([n for n, _ in self.calls], [4])
        self.assertTrue(consumer.reader.working())
