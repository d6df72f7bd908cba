"""
The backend ingress: a consumer-group reader of the Redis stream the backend
appends to (PROTOCOL.md section 6).

Each node reads C{stream:requests} in group C{rpc_group} as consumer
C{node_id} (stable across restarts, so a restarted node finds its own
unacknowledged entries).  An entry is parsed, checked against its deadline,
dispatched to the backend method, answered on its C{reply_to} list when it
has one (LPUSH + EXPIRE in one script), and only then acknowledged
(L{EntryHandler}; the payload and reply layouts are L{unrealon.ingresswire}).

What keeps work from being lost or stuck:
  - the read loop is a L{SupervisedReader}: it never ends on an error, and
    before its first read and after every error (a Redis restart, say) it
    re-creates the consumer group if Redis lost it and takes back this
    consumer's own pending entries first (C{XREADGROUP ... 0}), so what was
    read but not finished when the connection broke is handled again at
    once, not after C{claim_idle};
  - entries another (dead) node left pending longer than C{claim_idle} are
    claimed with XAUTOCLAIM, at start and periodically;
  - a failing entry is retried (left pending, claimed again) until it has been
    delivered C{max_deliveries} times, then moved to the dead-letter stream
    with the reason and acknowledged;
  - a malformed payload never stops the loop: dead letter, and an
    C{invalid_params} reply when C{reply_to} can be read;
  - publishing is idempotent per entry id, so an entry handled twice (a crash
    before the ack) publishes once;
  - at most C{max_in_flight} entries are handled at once: a slow handler makes
    the reader wait instead of reading without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import txredisapi
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from unrealon import jsonrpc
from unrealon.engine.redisclient import (
    RedisHandler,
    StreamClient,
    StreamEntry,
    push_reply,
    redis_error_code,
)
from unrealon.engine.streamacks import StreamAcks
from unrealon.engine.supervision import RedisLink, SupervisedLoop, SupervisedReader, redis_down
from unrealon.ingresswire import (
    IngressRequest,
    Malformed,
    describe,
    error_code_name,
    parse_payload,
    readable_reply_to,
    reply_body,
)
from unrealon.jsonrpc import RPCError
from unrealon.metrics import Metrics

log = Logger(namespace="unrealon.ingress")

#: (method, params, entry id) -> Deferred of the JSON result; fails with RPCError
Dispatch = Callable[[str, dict[str, Any], str], Deferred[Any]]

READ_BLOCK_MS = 1000
#: longest a handler may run when the entry has no timeout of its own
DEFAULT_HANDLER_TIMEOUT = 30.0
REPLY_TTL = 60
#: errors after which the same entry may well succeed later
RETRYABLE = (jsonrpc.INTERNAL_ERROR, jsonrpc.BACKEND_UNAVAILABLE)


@attrs.define
class IngressStats:
    """What /health and /metrics report about the ingress."""

    lag: int | None = None
    pending: int | None = None
    dead: int | None = None
    group_ok: bool = False


class EntryHandler:
    """Handles one ingress entry: deadline, dispatch, reply, ack or dead letter."""

    def __init__(
        self,
        clock: IReactorTime,
        redis: RedisHandler,
        dispatch: Dispatch,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_stream: str,
        max_deliveries: int,
        count: Callable[[str], None],
    ) -> None:
        self._clock = clock
        self._redis = redis
        self._streams = StreamClient(redis)
        self._dispatch = dispatch
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._dead_stream = dead_stream
        self._max_deliveries = max_deliveries
        self._count = count
        self._acks = StreamAcks(clock, self._streams, stream, group)

    async def handle(self, entry: StreamEntry, deliveries: int) -> None:
        fields = entry.fields
        if fields is None:  # deleted while pending
            await self._ack(entry)
            return
        try:
            request = parse_payload(fields)
        except Malformed as e:
            reply_to, correlation_id = readable_reply_to(fields)
            if reply_to is not None:
                await self._reply(reply_to, correlation_id, error=str(e), error_code="invalid_params")
            await self._dead(entry, str(e), deliveries)
            self._count("malformed")
            return
        now = self._clock.seconds()
        age = now - entry.ms() / 1000
        if request.timeout is not None and age > request.timeout:
            await self._finish(entry, request, error="deadline exceeded", error_code="deadline_exceeded")
            self._count("deadline_exceeded")
            return
        budget = DEFAULT_HANDLER_TIMEOUT
        if request.timeout is not None:
            budget = max(0.001, request.timeout - age)
        d = maybeDeferred(self._dispatch, request.method, request.params, entry.id)
        # Not d.addTimeout: the cancellation would reach us as whatever the
        # dispatcher turned the CancelledError into (an internal error, which
        # is retried), not as a timeout.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._clock.callLater(budget, expire)
        try:
            result = await d
        except Exception as e:
            if expired:
                await self._finish(entry, request, error="deadline exceeded",
                                   error_code="deadline_exceeded")
                self._count("deadline_exceeded")
                return
            if not isinstance(e, RPCError):
                raise
            await self._failed(entry, request, e, deliveries)
            return
        finally:
            if timer.active():
                timer.cancel()
        await self._finish(entry, request, result=result)
        self._count("ok")

    async def _failed(
        self, entry: StreamEntry, request: IngressRequest, error: RPCError, deliveries: int
    ) -> None:
        message = describe(error)
        code = error_code_name(error)
        if error.code in RETRYABLE:
            if deliveries < self._max_deliveries:
                self._count("retry")
                return  # stays pending; claimed again after claim_idle
            # a poison entry: give up on it, for good and visibly
            await self._dead(entry, f"failed {deliveries} times: {message}", deliveries,
                             ack=False)
        elif request.reply_to is None:
            # refused, and nobody waits for a reply: keep it where someone can see it
            await self._dead(entry, message, deliveries, ack=False)
        await self._finish(entry, request, error=message, error_code=code)
        self._count(code)

    async def _finish(
        self,
        entry: StreamEntry,
        request: IngressRequest,
        *,
        result: Any = None,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        # Reply before the ack: a crash between them re-handles the entry,
        # which publishes nothing twice and replies again (harmless).
        if request.reply_to is not None:
            await self._reply(
                request.reply_to, request.correlation_id,
                result=result, error=error, error_code=error_code,
            )
        await self._ack(entry)

    async def _reply(self, reply_to: str, correlation_id: str | None, **outcome: Any) -> None:
        body = reply_body(correlation_id, self._clock.seconds(), **outcome)
        await push_reply(self._redis, reply_to, body, REPLY_TTL)

    async def _ack(self, entry: StreamEntry) -> None:
        await self._acks.ack(entry.id)

    async def _dead(
        self, entry: StreamEntry, reason: str, deliveries: int, *, ack: bool = True
    ) -> None:
        payload = (entry.fields or {}).get("payload", "")
        await self._streams.xadd(
            self._dead_stream,
            {
                "payload": payload,
                "reason": reason,
                "entry_id": entry.id,
                "stream": self._stream,
                "deliveries": str(deliveries),
                "consumer": self._consumer,
            },
            maxlen=100_000,
        )
        log.warn("ingress entry {id} dead-lettered: {reason}", id=entry.id, reason=reason)
        if ack:
            await self._ack(entry)


class IngressConsumer:
    """Reads the ingress stream in the consumer group and hands entries to L{EntryHandler}."""

    def __init__(
        self,
        reactor: IReactorTime,
        redis: RedisHandler,
        reader: RedisHandler,
        dispatch: Dispatch,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_stream: str,
        claim_idle: float,
        max_deliveries: int,
        max_in_flight: int = 64,
        metrics: Metrics | None = None,
        link: RedisLink | None = None,
    ) -> None:
        self._reactor = reactor
        self._redis = redis
        self._streams = StreamClient(redis)
        self._reader = StreamClient(reader)
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream
        self._claim_idle_ms = int(claim_idle * 1000)
        self._max_in_flight = max_in_flight
        self._metrics = metrics
        self._handler = EntryHandler(
            reactor, redis, dispatch, stream=stream, group=group, consumer=consumer,
            dead_stream=dead_stream, max_deliveries=max_deliveries, count=self._count,
        )
        self._in_flight: dict[str, Deferred[None]] = {}
        self._slot: Deferred[None] | None = None
        self._reader_id: int | None = None
        #: where reading continues through this consumer's own pending
        #: entries (an earlier life's, or the ones a broken connection left),
        #: or None once they are all taken
        self._backlog_from: str | None = None
        self._claim_interval = max(0.2, min(claim_idle / 2, 10.0))
        self._next_claim = 0.0
        self.stats = IngressStats()
        failures = metrics.loop_failure if metrics is not None else _ignore
        self.reader = SupervisedReader(
            "ingress reader", reactor, self._read_once, self._prepare,
            link=link, count_failure=failures,
        )
        self._watcher = SupervisedLoop(
            "ingress statistics", reactor, 2.0, self.refresh_stats,
            link=link, count_failure=failures,
        )

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start reading; fires once the group exists (which waits for Redis)."""
        self.reader.start()
        self._watcher.start(now=True)
        return self.reader.prepared()

    def stop(self) -> Deferred[None]:
        """Stop reading and wait for entries in flight; unacked ones stay pending for others."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._watcher.stop()
        stopping = self.reader.stop()
        if self._slot is not None and not self._slot.called:
            self._slot.callback(None)
        if not stopping.called:
            await self._unblock_reader()
        stopping.addTimeout(READ_BLOCK_MS / 1000 + 2, self._reactor)
        try:
            await stopping
        except TimeoutError:
            log.warn("the ingress read did not end in time; leaving it")
        for d in list(self._in_flight.values()):
            await d  # never fails: _spawn's errback logs

    async def ensure_group(self) -> None:
        """Create the group at id 0 (no earlier entry skipped); existing is fine."""
        created = await self._streams.xgroup_create(self.stream, self.group, "0", mkstream=True)
        self.stats.group_ok = True
        if created:
            log.info("created consumer group {group} on {stream}", group=self.group, stream=self.stream)

    # -- reading ---------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Before reading, and again after any error: the group, then our own backlog."""
        await self.ensure_group()
        self._backlog_from = "0"  # take back what we read and did not finish
        self._next_claim = 0.0  # and claim what dead nodes left, at once
        self._reader_id = await self._reader_client_id()

    @property
    def waiting_for_a_slot(self) -> bool:
        """
        Whether the reader is parked because C{max_in_flight} entries are being
        handled: it reads nothing more until one of them finishes.
        """
        return self._slot is not None and not self._slot.called

    def _free(self) -> int:
        """How many more entries this node may take on now."""
        return self._max_in_flight - len(self._in_flight)

    async def _read_once(self) -> None:
        # Reading, taking back our own backlog and claiming others' idle
        # entries all happen here, one at a time, so together they never take
        # on more than max_in_flight entries.
        free = self._free()
        if free <= 0:
            self._slot = Deferred()
            await self._slot
            return
        now = self._reactor.seconds()
        if self._backlog_from is None and now >= self._next_claim:
            self._next_claim = now + self._claim_interval
            await self._claim()
            return
        backlog = self._backlog_from
        count = min(free, 100)
        try:
            if backlog is not None:
                # this consumer's own unacknowledged entries, oldest first
                batches = await self._reader.xreadgroup(
                    self.group, self.consumer, {self.stream: backlog},
                    count=count, block_ms=None,
                )
            else:
                # wake up in time for the next claim pass
                block_ms = max(1, min(READ_BLOCK_MS, int((self._next_claim - now) * 1000) + 1))
                batches = await self._reader.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"},
                    count=count, block_ms=block_ms,
                )
        except txredisapi.ResponseError as e:
            if redis_error_code(e) != "NOGROUP":
                raise
            log.warn("consumer group {group} is gone (Redis lost its data?); recreating it",
                     group=self.group)
            await self._prepare()
            return
        entries = [entry for _, batch in batches for entry in batch]
        if backlog is None:
            for entry in entries:
                self._spawn(entry, deliveries=1)
            return
        self._backlog_from = entries[-1].id if entries else None
        if entries:
            # reading them again counted one more delivery; the PEL knows how many
            counts = await self._deliveries(entries)
            log.info("taking back {count} unfinished ingress entries", count=len(entries))
            for entry in entries:
                self._spawn(entry, deliveries=counts.get(entry.id, 1))

    async def _deliveries(self, entries: list[StreamEntry]) -> dict[str, int]:
        """How many times each of these (our pending) entries was delivered."""
        pending = await self._streams.xpending_range(
            self.stream, self.group, entries[0].id, entries[-1].id, count=len(entries),
            consumer=self.consumer,
        )
        return {p.id: p.deliveries for p in pending}

    async def _reader_client_id(self) -> int | None:
        """The reader connection's CLIENT ID, so L{stop} can end its BLOCK early."""
        client_id = await self._reader.client_id()
        if client_id is None:
            log.info("CLIENT ID refused (ACLs?): stopping waits for the read's BLOCK to end")
        return client_id

    async def _unblock_reader(self) -> None:
        """
        CLIENT UNBLOCK the reader's XREADGROUP: it returns as if its BLOCK
        timed out (nothing read, nothing lost), so stopping is immediate.
        """
        if self._reader_id is None:
            return
        d = self._redis.execute_command("CLIENT", "UNBLOCK", self._reader_id)
        d.addTimeout(1.0, self._reactor)
        try:
            await d
        except Exception as e:
            # the read ends within READ_BLOCK_MS anyway
            log.info("CLIENT UNBLOCK failed ({error}); waiting for the read", error=str(e))

    def _spawn(self, entry: StreamEntry, deliveries: int) -> None:
        if entry.id in self._in_flight:
            return
        d = Deferred.fromCoroutine(self._handler.handle(entry, deliveries))
        self._in_flight[entry.id] = d

        def done(_: Any) -> None:
            self._in_flight.pop(entry.id, None)
            slot, self._slot = self._slot, None
            if slot is not None and not slot.called:
                slot.callback(None)

        d.addErrback(self._handling_failed, entry.id)
        d.addBoth(done)

    def _handling_failed(self, failure: Failure, entry_id: str) -> None:
        if failure.value is not None and redis_down(failure.value):
            # Redis went away mid-way: the entry is still pending (unacknowledged);
            # the reader takes it back as soon as Redis is back.
            log.warn("ingress entry {id} left pending: Redis unavailable ({error})",
                     id=entry_id, error=failure.getErrorMessage())
            self._count("retry")
        else:
            log.failure("handling ingress entry {id}", failure, id=entry_id)
            self._count("internal_error")

    def claim(self) -> Deferred[None]:
        """One pass taking over entries idle longer than claim_idle (tests and the read loop)."""
        return Deferred.fromCoroutine(self._claim())

    async def _claim(self) -> None:
        start = "0-0"
        for _ in range(10):  # bounded per pass
            free = self._free()
            if self.reader.stopped() or free <= 0:
                return
            claimed = await self._streams.xautoclaim(
                self.stream, self.group, self.consumer, self._claim_idle_ms, start,
                count=min(free, 100),
            )
            if claimed.entries:
                counts = await self._deliveries(claimed.entries)
                log.info("claimed {count} idle ingress entries", count=len(claimed.entries))
                for entry in claimed.entries:
                    self._spawn(entry, deliveries=counts.get(entry.id, 2))
            start = claimed.next_id
            if start == "0-0":
                return

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.ingress_handled.labels(outcome=outcome).inc()

    # -- health ------------------------------------------------------------------------------

    def refresh_stats(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refresh_stats())

    async def _refresh_stats(self) -> None:
        d = self._streams.xinfo_groups(self.stream)
        d.addTimeout(1.0, self._reactor)
        try:
            groups = await d
        except txredisapi.ResponseError as e:
            # no stream at all (Redis came back empty): the reader re-creates it
            self.stats.group_ok = False
            log.info("ingress statistics: {error}", error=str(e))
            return
        except Exception:
            self.stats.group_ok = False
            raise
        mine = [g for g in groups if g.name == self.group]
        self.stats.group_ok = bool(mine)
        if mine:
            self.stats.lag = mine[0].lag
            self.stats.pending = mine[0].pending
        self.stats.dead = await self._streams.xlen(self.dead_stream)
        if self._metrics is not None:
            self._metrics.ingress_lag.set(self.stats.lag or 0)
            self._metrics.ingress_pending.set(self.stats.pending or 0)
            self._metrics.ingress_dead.set(self.stats.dead or 0)

    def health(self) -> Deferred[dict[str, Any]]:
        """The /health C{ingress} object plus C{ok} (group exists and is being read)."""
        s = self.stats
        return succeed({"lag": s.lag, "pending": s.pending, "dead": s.dead,
                        "ok": s.group_ok and self.reader.working()})


def _ignore(name: str) -> None:
    """No metrics to count in."""
