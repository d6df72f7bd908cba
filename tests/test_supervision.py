"""
The supervised readers and loops on a L{Clock}: errors never end them, the
backoff grows and is capped, a reader prepares again after every error,
and what Redis being away looks like in the log.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from unrealon.engine.supervision import (
    BACKOFF_MAX,
    OUTAGE_LOG_INTERVAL,
    RedisLink,
    SupervisedLoop,
    SupervisedReader,
)


class Script:
    """A reader's step and prepare whose outcomes the test decides, one call at a time."""

    def __init__(self) -> None:
        self.steps: list[Deferred[None]] = []
        self.prepares: list[Deferred[None]] = []

    def step(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.steps.append(d)
        return d

    def prepare(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.prepares.append(d)
        return d


class LogCapture:
    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") == level
                and e.get("log_namespace") == "unrealon.engine.supervision"]


class SupervisedReaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.script = Script()
        self.failures: list[str] = []
        self.reader = SupervisedReader(
            "test reader", self.clock, self.script.step, self.script.prepare,
            count_failure=self.failures.append,
        )

    def test_prepares_then_reads(self) -> None:
        ready = self.reader.prepared()
        self.reader.start()
        self.assertEqual((len(self.script.prepares), len(self.script.steps)), (1, 0))
        self.assertNoResult(ready)
        self.assertFalse(self.reader.working())
        self.script.prepares[0].callback(None)
        self.successResultOf(ready)
        self.assertTrue(self.reader.working())
        self.assertEqual(len(self.script.steps), 1)
        self.script.steps[0].callback(None)
        self.assertEqual(len(self.script.steps), 2)

    def test_a_bug_is_logged_counted_and_the_loop_restarts_prepared(self) -> None:
        """An unexpected exception: traceback, count, backoff, prepare again, read again."""
        self.reader.start()
        self.script.prepares[0].callback(None)
        self.script.steps[0].errback(RuntimeError("bug"))
        self.assertEqual(self.failures, ["test reader"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.reader.working())
        self.assertEqual(len(self.script.prepares), 1)  # not before the backoff
        self.clock.advance(0.1)
        self.assertEqual(len(self.script.prepares), 2)
        self.script.prepares[1].callback(None)
        self.assertTrue(self.reader.working())
        self.assertEqual(len(self.script.steps), 2)

    def test_backoff_doubles_up_to_its_cap_and_resets(self) -> None:
        self.reader.start()
        waits = []
        for i in range(6):
            self.script.prepares[i].errback(txredisapi.ConnectionError("down"))
            [call] = self.clock.getDelayedCalls()
            waits.append(round(call.getTime() - self.clock.seconds(), 6))
            self.clock.advance(waits[-1])
            self.assertEqual(len(self.script.prepares), i + 2)
        self.assertEqual(waits[:4], [0.1, 0.2, 0.4, 0.8])
        self.assertEqual(waits[4:], [BACKOFF_MAX, BACKOFF_MAX])
        self.assertEqual(self.failures, [])  # Redis being away is not a bug
        self.script.prepares[6].callback(None)
        self.script.steps[0].errback(txredisapi.ConnectionError("down again"))
        self.clock.advance(0.1)  # back to the first delay after a success
        self.assertEqual(len(self.script.prepares), 8)

    def test_stop_during_backoff_ends_the_loop_and_the_waiters(self) -> None:
        ready = self.reader.prepared()
        self.reader.start()
        self.script.prepares[0].errback(txredisapi.ConnectionError("down"))
        stopped = self.reader.stop()
        self.successResultOf(stopped)
        self.failureResultOf(ready, CancelledError)
        self.clock.advance(10)
        self.assertEqual(len(self.script.prepares), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_a_prepare_waiting_on_redis(self) -> None:
        """A prepare cannot lose anything: a stop does not wait for Redis to answer it."""
        self.reader.start()
        stopped = self.reader.stop()
        self.successResultOf(stopped)
        self.assertTrue(self.script.prepares[0].called)  # cancelled
        self.assertEqual((len(self.script.prepares), len(self.script.steps)), (1, 0))


class SupervisedLoopTests(SynchronousTestCase):
    def test_runs_every_interval_whatever_happens(self) -> None:
        clock = Clock()
        outcomes: list[Any] = [succeed(None), RuntimeError("bug"), None]
        runs = []
        failures: list[str] = []

        def work() -> Any:
            runs.append(clock.seconds())
            outcome = outcomes.pop(0) if outcomes else None
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        loop = SupervisedLoop("test loop", clock, 2.0, work, count_failure=failures.append)
        loop.start(now=True)
        clock.advance(0)
        clock.advance(2)
        self.assertFalse(loop.working())
        self.assertEqual(failures, ["test loop"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(2)
        self.assertTrue(loop.working())
        self.assertEqual(runs, [0, 2, 4])
        loop.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_cancels_a_run_waiting_on_redis(self) -> None:
        """
        A run still waiting (on a Redis that is away, with a timeout of its
        own) is cancelled by stop: no timer outlives the node, and being
        stopped is not counted as a failure.
        """
        clock = Clock()
        failures: list[str] = []
        waiting: list[Deferred[None]] = []

        def work() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            d.addTimeout(1.0, clock)
            waiting.append(d)
            return d

        loop = SupervisedLoop("stats", clock, 2.0, work, count_failure=failures.append)
        loop.start(now=True)
        clock.advance(0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the run's own timeout
        loop.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertTrue(waiting[0].called)  # cancelled, and handled by the loop
        self.assertEqual(failures, [])
        self.assertEqual(self.flushLoggedErrors(), [])


class RedisLinkTests(SynchronousTestCase):
    def test_an_outage_is_logged_once_then_every_30_s_then_back(self) -> None:
        clock = Clock()
        log = LogCapture(self)
        link = RedisLink(clock, "redis://:***@db:6379/0")
        for _ in range(10):
            link.failed(txredisapi.ConnectionError("Lost connection"), "ingress reader")
            clock.advance(1)
        warnings = log.lines(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["address"], "redis://:***@db:6379/0")
        clock.advance(OUTAGE_LOG_INTERVAL)
        self.assertEqual(len(log.lines(LogLevel.warn)), 2)
        link.succeeded()
        link.succeeded()
        back = log.lines(LogLevel.info)
        self.assertEqual(len(back), 1)
        self.assertIn("reachable again", back[0]["log_format"])
        self.assertEqual(clock.getDelayedCalls(), [])
