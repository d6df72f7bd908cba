"""
The backend ingress: a consumer-group reader of the Redis stream the backend
appends to (PROTOCOL.md section 6).

Each node reads C{stream:requests} in group C{rpc_group} as consumer
C{node_id} (stable across restarts, so a restarted node finds its own
unacknowledged entries).  An entry is parsed, checked against its deadline,
dispatched to the backend method, answered on its C{reply_to} list when it
has one (LPUSH + EXPIRE in one script), and only then acknowledged.

What keeps work from being lost or stuck:
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

import datetime
import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import txredisapi
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from unrealon import jsonrpc
from unrealon.backendapi import error_code_name
from unrealon.engine.redisclient import (
    RedisHandler,
    StreamClient,
    StreamEntry,
    push_reply,
    redis_error_code,
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
_REDIS_DOWN = (txredisapi.ConnectionError, ConnectionError)


class Malformed(Exception):
    """The payload is not a request we can read."""


@attrs.frozen
class IngressRequest:
    method: str
    params: dict[str, Any]
    correlation_id: str | None
    reply_to: str | None
    timeout: float | None


def parse_payload(fields: Mapping[str, str]) -> IngressRequest:
    """The request in an entry's C{payload} field, or L{Malformed}."""
    raw = fields.get("payload")
    if raw is None:
        raise Malformed("entry has no payload field")
    try:
        obj = jsonrpc.decode_json(raw)
    except (ValueError, RecursionError):
        raise Malformed("payload is not JSON") from None
    if not isinstance(obj, dict):
        raise Malformed("payload is not a JSON object")
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise Malformed("payload has no method")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise Malformed("params is not a JSON object")
    reply_to = obj.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not reply_to):
        raise Malformed("reply_to is not a string")
    correlation_id = obj.get("correlation_id")
    if correlation_id is not None and not isinstance(correlation_id, str):
        correlation_id = str(correlation_id) if isinstance(correlation_id, int) else None
    timeout = obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise Malformed("timeout is not a positive number")
    return IngressRequest(method, params, correlation_id, reply_to, timeout)


def readable_reply_to(fields: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(reply_to, correlation_id) of a payload we could not fully read."""
    try:
        obj = json.loads(fields.get("payload") or "")
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    reply_to = obj.get("reply_to")
    correlation_id = obj.get("correlation_id")
    return (
        reply_to if isinstance(reply_to, str) and reply_to else None,
        correlation_id if isinstance(correlation_id, str) else None,
    )


def reply_body(
    correlation_id: str | None,
    now: float,
    *,
    result: Any = None,
    error: str | None = None,
    error_code: str | None = None,
) -> bytes:
    """The reply layout django-ipc style producers read (PROTOCOL.md section 6)."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
    ok = error_code is None
    return jsonrpc.encode(
        {
            "type": "response" if ok else "error",
            "correlation_id": correlation_id,
            "success": ok,
            "result": result if ok else None,
            "error": error,
            "error_code": error_code,
            "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
        }
    )


@attrs.define
class IngressStats:
    """What /health and /metrics report about the ingress."""

    lag: int | None = None
    pending: int | None = None
    dead: int | None = None
    group_ok: bool = False
    reading: bool = False


class IngressConsumer:
    """Reads the ingress stream in the consumer group and handles entries."""

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
    ) -> None:
        self._reactor = reactor
        self._redis = redis
        self._streams = StreamClient(redis)
        self._reader = StreamClient(reader)
        self._dispatch = dispatch
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = dead_stream
        self._claim_idle_ms = int(claim_idle * 1000)
        self._max_deliveries = max_deliveries
        self._max_in_flight = max_in_flight
        self._metrics = metrics
        self._running = False
        self._in_flight: dict[str, Deferred[None]] = {}
        self._slot: Deferred[None] | None = None
        self._loop: Deferred[None] | None = None
        self.stats = IngressStats()
        self._claimer = LoopingCall(self.claim)
        self._claimer.clock = reactor
        self._watcher = LoopingCall(self.refresh_stats)
        self._watcher.clock = reactor
        self._claim_interval = max(0.2, min(claim_idle / 2, 10.0))

    def stopped(self) -> bool:
        # a method, not the attribute: mypy would narrow the attribute in loops
        return not self._running

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._running = True
        await self.ensure_group()
        self.stats.reading = True
        await self.handle_own_pending()
        self._loop = Deferred.fromCoroutine(self._read_loop())
        self._claimer.start(self._claim_interval, now=True).addErrback(
            lambda f: log.failure("ingress claimer stopped", f)
        )
        self._watcher.start(2.0, now=True).addErrback(
            lambda f: log.failure("ingress stats stopped", f)
        )

    def stop(self) -> Deferred[None]:
        """Stop reading and wait for entries in flight; unacked ones stay pending for others."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._running = False
        for loop in (self._claimer, self._watcher):
            if loop.running:
                loop.stop()
        if self._slot is not None and not self._slot.called:
            self._slot.callback(None)
        if self._loop is not None:
            loop_d = self._loop
            loop_d.addTimeout(READ_BLOCK_MS / 1000 + 2, self._reactor)
            try:
                await loop_d
            except Exception:
                pass
        for d in list(self._in_flight.values()):
            try:
                await d
            except Exception:
                pass

    async def ensure_group(self) -> None:
        """Create the group at id 0 (no earlier entry skipped); existing is fine."""
        created = await self._streams.xgroup_create(self.stream, self.group, "0", mkstream=True)
        self.stats.group_ok = True
        if created:
            log.info("created consumer group {group} on {stream}", group=self.group, stream=self.stream)

    # -- reading -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = 0.1
        while self._running:
            free = self._max_in_flight - len(self._in_flight)
            if free <= 0:
                self._slot = Deferred()
                await self._slot
                continue
            try:
                batches = await self._reader.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: ">"},
                    count=min(free, 100),
                    block_ms=READ_BLOCK_MS,
                )
            except txredisapi.ResponseError as e:
                self.stats.reading = False
                if redis_error_code(e) == "NOGROUP" and self._running:
                    log.warn("consumer group {group} is gone (Redis lost data?); recreating",
                             group=self.group)
                    await self._retry(self.ensure_group)
                    continue
                log.failure("ingress read failed")
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 2.0)
                continue
            except _REDIS_DOWN:
                self.stats.reading = False
                if self.stopped():
                    return
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            self.stats.reading = True
            for _, entries in batches:
                for entry in entries:
                    self._spawn(entry, deliveries=1)

    async def _retry(self, action: Callable[[], Any]) -> None:
        try:
            await action()
        except Exception as e:
            log.warn("ingress: {error}", error=str(e))
            await deferLater(self._reactor, 0.5, lambda: None)

    def _spawn(self, entry: StreamEntry, deliveries: int) -> None:
        if entry.id in self._in_flight:
            return
        d = Deferred.fromCoroutine(self._handle(entry, deliveries))
        self._in_flight[entry.id] = d

        def done(_: Any) -> None:
            self._in_flight.pop(entry.id, None)
            slot, self._slot = self._slot, None
            if slot is not None and not slot.called:
                slot.callback(None)

        d.addErrback(lambda f: log.failure("handling ingress entry {id}", f, id=entry.id))
        d.addBoth(done)

    async def handle_own_pending(self) -> None:
        """Entries this consumer read in an earlier life and never acknowledged."""
        counts = {
            p.id: p.deliveries
            for p in await self._streams.xpending_range(
                self.stream, self.group, count=1000, consumer=self.consumer
            )
        }
        if not counts:
            return
        batches = await self._streams.xreadgroup(
            self.group, self.consumer, {self.stream: "0"}, count=1000, block_ms=None
        )
        for _, entries in batches:
            for entry in entries:
                self._spawn(entry, deliveries=counts.get(entry.id, 1))

    def claim(self) -> Deferred[None]:
        """Take over entries idle longer than claim_idle (a dead node's)."""
        d = Deferred.fromCoroutine(self._claim())
        d.addErrback(
            lambda f: log.warn("ingress claim failed: {error}", error=f.getErrorMessage())
        )
        return d

    async def _claim(self) -> None:
        start = "0-0"
        for _ in range(10):  # bounded per pass
            free = self._max_in_flight - len(self._in_flight)
            if not self._running or free <= 0:
                return
            claimed = await self._streams.xautoclaim(
                self.stream, self.group, self.consumer, self._claim_idle_ms, start, count=min(free, 100)
            )
            if claimed.entries:
                first, last = claimed.entries[0].id, claimed.entries[-1].id
                pending = await self._streams.xpending_range(
                    self.stream, self.group, first, last, count=len(claimed.entries),
                    consumer=self.consumer,
                )
                counts = {p.id: p.deliveries for p in pending}
                log.info("claimed {count} idle ingress entries", count=len(claimed.entries))
                for entry in claimed.entries:
                    self._spawn(entry, deliveries=counts.get(entry.id, 2))
            start = claimed.next_id
            if start == "0-0":
                return

    # -- handling one entry ----------------------------------------------------------------

    async def _handle(self, entry: StreamEntry, deliveries: int) -> None:
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
        now = self._reactor.seconds()
        age = now - entry.ms() / 1000
        if request.timeout is not None and age > request.timeout:
            await self._finish(entry, request, error="deadline exceeded", error_code="deadline_exceeded")
            self._count("deadline_exceeded")
            return
        budget = DEFAULT_HANDLER_TIMEOUT
        if request.timeout is not None:
            budget = max(0.001, request.timeout - age)
        d = maybeDeferred(self._dispatch, request.method, request.params, entry.id)
        d.addTimeout(budget, self._reactor)
        try:
            result = await d
        except RPCError as e:
            if e.code in RETRYABLE and deliveries < self._max_deliveries:
                self._count("retry")
                return  # stays pending; claimed again after claim_idle
            reason = e.message if e.code not in RETRYABLE else f"failed {deliveries} times: {e.message}"
            if request.reply_to is None:
                await self._dead(entry, reason, deliveries)
            await self._finish(entry, request, error=e.message, error_code=error_code_name(e))
            self._count(error_code_name(e))
            return
        except TimeoutError:
            await self._finish(entry, request, error="deadline exceeded", error_code="deadline_exceeded")
            self._count("deadline_exceeded")
            return
        await self._finish(entry, request, result=result)
        self._count("ok")

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
        body = reply_body(correlation_id, self._reactor.seconds(), **outcome)
        await push_reply(self._redis, reply_to, body, REPLY_TTL)

    async def _ack(self, entry: StreamEntry) -> None:
        await self._streams.xack(self.stream, self.group, entry.id)

    async def _dead(self, entry: StreamEntry, reason: str, deliveries: int) -> None:
        payload = (entry.fields or {}).get("payload", "")
        await self._streams.xadd(
            self.dead_stream,
            {
                "payload": payload,
                "reason": reason,
                "entry_id": entry.id,
                "stream": self.stream,
                "deliveries": str(deliveries),
                "consumer": self.consumer,
            },
            maxlen=100_000,
        )
        log.warn("ingress entry {id} dead-lettered: {reason}", id=entry.id, reason=reason)
        await self._ack(entry)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.ingress_handled.labels(outcome=outcome).inc()

    # -- health ------------------------------------------------------------------------------

    def refresh_stats(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._refresh_stats())
        d.addErrback(lambda _: setattr(self.stats, "group_ok", False))
        return d

    async def _refresh_stats(self) -> None:
        d = self._streams.xinfo_groups(self.stream)
        d.addTimeout(1.0, self._reactor)
        groups = await d
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
        return succeed(
            {"lag": s.lag, "pending": s.pending, "dead": s.dead, "ok": s.group_ok and s.reading}
        )
