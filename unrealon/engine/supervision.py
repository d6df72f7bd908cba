"""
Supervised long-running work on Redis: one error policy for every loop.

Two shapes of work run for as long as a node does: blocking readers (the
ingress consumer group, the cluster feed), which read, handle, and read
again; and periodic work (presence heartbeat and sweep, ingress
statistics).  Both are supervised here the same way:

  - Redis unreachable (a lost connection, a timeout): a warning through
    the node's L{RedisLink} (one line when Redis goes away, at most one
    every L{OUTAGE_LOG_INTERVAL} seconds while it stays away, one when it is
    back, naming the address and never the password), then retry;
  - anything else: C{log.failure} with the traceback, counted in
    C{unrealon_loop_failures{loop=...}}, then restart;
  - a reader backs off (L{BACKOFF_START} doubling to L{BACKOFF_MAX}) and,
    before reading again, runs its C{prepare} step (re-create the consumer
    group, take back its own pending entries, check the feed's continuity);
  - L{SupervisedReader.reading} and L{SupervisedLoop.healthy} say whether
    the work is being done; C{/health} is 503 "degraded" while one is not.

No loop ever ends on an error; only L{stop} ends it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from unrealon.engine.interfaces import BackendUnavailable

log = Logger(namespace="unrealon.engine.supervision")

#: Redis unreachable: expected, retried quietly (txredisapi's TimeoutError
#: is one of its ConnectionErrors)
REDIS_DOWN = (txredisapi.ConnectionError, ConnectionError, TimeoutError, BackendUnavailable)
BACKOFF_START = 0.1
BACKOFF_MAX = 1.0
#: seconds between "still unreachable" lines while Redis stays away
OUTAGE_LOG_INTERVAL = 30.0


def redis_down(error: BaseException) -> bool:
    """Whether C{error} means Redis could not be reached (as opposed to a bug)."""
    return isinstance(error, REDIS_DOWN)


class ISupervised(Interface):
    """Long-running work whose state /health reports."""

    name = Attribute("what it is, for logs and /health")

    def working() -> bool:
        """Whether it is doing its work now."""


class RedisLink:
    """
    What the node knows of its Redis: reachable or not, logged on every
    change (and every L{OUTAGE_LOG_INTERVAL} seconds of an outage).

    Every supervised piece of work reports here; the address is the URL
    with its password masked (L{unrealon.engine.redisclient.RedisAddress.display}).
    """

    def __init__(self, clock: IReactorTime, address: str) -> None:
        self._clock = clock
        self.address = address
        self.up = True
        self._down_since = 0.0
        self._reminder: IDelayedCall | None = None
        self._stopped = False

    def failed(self, error: BaseException, where: str) -> None:
        """A command or read failed because Redis could not be reached."""
        if not self.up or self._stopped:
            return  # (connections closed by a stop fail too: not an outage)
        self.up = False
        self._down_since = self._clock.seconds()
        log.warn("Redis at {address} is unreachable ({where}: {error}); retrying",
                 address=self.address, where=where, error=_describe(error))
        self._reminder = self._clock.callLater(OUTAGE_LOG_INTERVAL, self._remind)

    def succeeded(self) -> None:
        """Redis answered."""
        if self.up:
            return
        self.up = True
        if self._reminder is not None and self._reminder.active():
            self._reminder.cancel()
        self._reminder = None
        log.info("Redis at {address} is reachable again after {seconds:.1f} s",
                 address=self.address, seconds=self._clock.seconds() - self._down_since)

    def _remind(self) -> None:
        self._reminder = None
        if self.up:
            return
        log.warn("Redis at {address} still unreachable after {seconds:.0f} s",
                 address=self.address, seconds=self._clock.seconds() - self._down_since)
        self._reminder = self._clock.callLater(OUTAGE_LOG_INTERVAL, self._remind)

    def stop(self) -> None:
        self._stopped = True
        if self._reminder is not None and self._reminder.active():
            self._reminder.cancel()
        self._reminder = None


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text and text[0] else type(error).__name__


class _Failures:
    """Counts and logs what a supervised piece of work caught."""

    def __init__(self, name: str, link: RedisLink | None, count: Callable[[str], None]) -> None:
        self.name = name
        self._link = link
        self._count = count

    def caught(self, failure: Failure) -> None:
        error = failure.value
        assert error is not None
        if redis_down(error):
            if self._link is not None:
                self._link.failed(error, self.name)
            else:
                log.warn("{loop}: store unavailable ({error})", loop=self.name,
                         error=_describe(error))
            return
        self._count(self.name)
        log.failure("{loop} failed; restarting it", failure, loop=self.name)

    def fine(self) -> None:
        if self._link is not None:
            self._link.succeeded()


@implementer(ISupervised)
class SupervisedReader:
    """
    A loop of blocking reads that never dies: C{prepare} once before the
    first read and again after every error, then C{step} over and over.

    @param step: one read and the handing-off of what it returned; fires
        when the next read may start.  Errors are the supervisor's.
    @param prepare: what must hold before reading (or reading again after
        an error): fires when it does, fails if it cannot (and is retried).
    """

    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        step: Callable[[], Awaitable[Any]],
        prepare: Callable[[], Awaitable[Any]],
        *,
        link: RedisLink | None = None,
        count_failure: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._step = step
        self._prepare = prepare
        self._failures = _Failures(name, link, count_failure)
        self._running = False
        self._loop: Deferred[None] | None = None
        self._sleep: Deferred[None] | None = None
        #: the prepare step in progress (cancelled by a stop: it waits on a
        #: Redis that is away, and nothing it asked for can be lost)
        self._preparing: Deferred[Any] | None = None
        #: waiting for the first successful prepare (None once it happened)
        self._waiters: list[Deferred[None]] | None = []
        #: True while reads are being made (prepared, and the last read went through)
        self.reading = False

    def prepared(self) -> Deferred[None]:
        """
        Fires once C{prepare} has succeeded for the first time (at once if it
        has); fails with C{CancelledError} if the reader stops before that.
        """
        d: Deferred[None] = Deferred()
        if self._waiters is None:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def working(self) -> bool:
        return self._running and self.reading

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("{loop} supervisor ended", f, loop=self.name))

    def stop(self) -> Deferred[None]:
        """Stop after the read in flight (the reader's owner ends a BLOCK early if it can)."""
        self._running = False
        if self._sleep is not None and not self._sleep.called:
            self._sleep.cancel()
        if self._preparing is not None and not self._preparing.called:
            self._preparing.cancel()
        waiters, self._waiters = self._waiters or [], [] if self._waiters is not None else None
        for waiter in waiters:
            waiter.errback(CancelledError(f"{self.name} stopped before it was ready"))
        loop = self._loop
        if loop is None or loop.called:
            return Deferred.fromCoroutine(_done())
        return loop

    def stopped(self) -> bool:
        # a method, not the attribute: mypy would narrow the attribute in the loop
        return not self._running

    async def _run(self) -> None:
        delay = BACKOFF_START
        prepared = False
        while self._running:
            try:
                if not prepared:
                    self._preparing = Deferred.fromCoroutine(_awaited(self._prepare))
                    try:
                        await self._preparing
                    finally:
                        self._preparing = None
                    prepared = True
                    delay = BACKOFF_START  # Redis answered
                    self.reading = True  # ready: reads go out from now on
                    waiters, self._waiters = self._waiters or [], None
                    for waiter in waiters:
                        waiter.callback(None)
                await self._step()
            except Exception:
                failure = Failure()
                self.reading = False
                prepared = False
                if self.stopped():
                    return
                self._failures.caught(failure)
                if not await self._pause(delay):
                    return
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.reading = True
            self._failures.fine()
            delay = BACKOFF_START

    async def _pause(self, seconds: float) -> bool:
        """Sleep (a stop cuts it short); whether to go on."""
        self._sleep = deferLater(self._clock, seconds, lambda: None)
        try:
            await self._sleep
        except CancelledError:
            return False
        finally:
            self._sleep = None
        return self._running


async def _done() -> None:
    return None


async def _awaited(work: Callable[[], Awaitable[Any]]) -> Any:
    return await work()


@implementer(ISupervised)
class SupervisedLoop:
    """
    Periodic work that never dies: C{work} every C{interval} seconds (the
    next run waits for the last one), whatever it raises or fails with.
    """

    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        interval: float,
        work: Callable[[], Any],
        *,
        link: RedisLink | None = None,
        count_failure: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._interval = interval
        self._work = work
        self._failures = _Failures(name, link, count_failure)
        self._call: IDelayedCall | None = None
        #: the run in progress, cancelled by stop (it may be waiting on Redis)
        self._current: Deferred[Any] | None = None
        self._running = False
        #: whether the last run succeeded
        self.healthy = True

    def working(self) -> bool:
        return self._running and self.healthy

    def start(self, now: bool = False) -> None:
        self._running = True
        self._schedule(0.0 if now else self._interval)

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._current is not None:
            self._current.cancel()

    def _schedule(self, delay: float) -> None:
        if self._running:
            self._call = self._clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._call = None
        d = self._current = maybeDeferred(self._work)
        d.addCallbacks(self._succeeded, self._failed)
        d.addBoth(self._ran)

    def _ran(self, _: Any) -> None:
        self._current = None
        self._schedule(self._interval)

    def _succeeded(self, _: Any) -> None:
        self.healthy = True
        self._failures.fine()

    def _failed(self, failure: Failure) -> None:
        if not self._running and failure.check(CancelledError):
            return  # stopped mid-run: nothing went wrong
        self.healthy = False
        self._failures.caught(failure)
