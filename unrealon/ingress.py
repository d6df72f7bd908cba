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
from twisted.python.failure import Failure

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


def describe(error: RPCError) -> str:
    """An error's message for a reply or a dead letter, naming the fields at fault."""
    data = error.data if isinstance(error.data, dict) else {}
    errors = data.get("errors")
    if error.code == jsonrpc.INVALID_PARAMS and isinstance(errors, list) and errors:
        details = "; ".join(
            f"{e.get('field')}: {e.get('message')}" for e in errors[:10] if isinstance(e, dict)
        )
        return f"{error.message}: {details}"
    return error.message


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
        self._reader_id: int | None = None
        #: where the read loop continues through this consumer's own pending
        #: entries (an earlier life's), or None once they are all taken
        self._backlog_from: str | None = None
        self.stats = IngressStats()
        self._watcher = LoopingCall(self.refresh_stats)
        self._watcher.clock = reactor
        self._claim_interval = max(0.2, min(claim_idle / 2, 10.0))
        self._next_claim = 0.0

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
        self._backlog_from = "0"  # first take back what we read in an earlier life
        self._next_claim = 0.0  # and claim what dead nodes left at once
        await self.refresh_stats()  # /health has numbers from the start
        self._reader_id = await self._reader_client_id()
        self._loop = Deferred.fromCoroutine(self._read_loop())
        self._watcher.start(2.0, now=False).addErrback(
            lambda f: log.failure("ingress stats stopped", f)
        )

    def stop(self) -> Deferred[None]:
        """Stop reading and wait for entries in flight; unacked ones stay pending for others."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._running = False
        if self._watcher.running:
            self._watcher.stop()
        if self._slot is not None and not self._slot.called:
            self._slot.callback(None)
        if self._loop is not None and not self._loop.called:
            await self._unblock_reader()
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

    def _free(self) -> int:
        """How many more entries this node may take on now."""
        return self._max_in_flight - len(self._in_flight)

    async def _read_loop(self) -> None:
        # Reading, taking back our own backlog and claiming others' idle
        # entries all happen here, one at a time, so together they never take
        # on more than max_in_flight entries.
        delay = 0.1
        while self._running:
            free = self._free()
            if free <= 0:
                self._slot = Deferred()
                await self._slot
                continue
            now = self._reactor.seconds()
            if self._backlog_from is None and now >= self._next_claim:
                self._next_claim = now + self._claim_interval
                await self.claim()
                continue
            if self._reader_id is None:
                self._reader_id = await self._reader_client_id()
            backlog = self._backlog_from
            count = min(free, 100)
            # wake up in time for the next claim pass
            block_ms = max(1, min(READ_BLOCK_MS, int((self._next_claim - now) * 1000) + 1))
            try:
                if backlog is not None:
                    # this consumer's own unacknowledged entries, from an
                    # earlier life (same node id), oldest first, a batch at a time
                    batches = await self._reader.xreadgroup(
                        self.group, self.consumer, {self.stream: backlog},
                        count=count, block_ms=None,
                    )
                else:
                    batches = await self._reader.xreadgroup(
                        self.group, self.consumer, {self.stream: ">"},
                        count=count, block_ms=block_ms,
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
                self._reader_id = None  # a new connection gets a new id
                if self.stopped():
                    return
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            self.stats.reading = True
            entries = [entry for _, batch in batches for entry in batch]
            if backlog is None:
                for entry in entries:
                    self._spawn(entry, deliveries=1)
                continue
            self._backlog_from = entries[-1].id if entries else None
            if entries:
                # reading them again counted one more delivery; the PEL knows how many
                counts = await self._deliveries(entries)
                log.info("taking back {count} unacknowledged ingress entries",
                         count=len(entries))
                for entry in entries:
                    self._spawn(entry, deliveries=counts.get(entry.id, 1))

    async def _deliveries(self, entries: list[StreamEntry]) -> dict[str, int]:
        """How many times each of these (our pending) entries was delivered."""
        try:
            pending = await self._streams.xpending_range(
                self.stream, self.group, entries[0].id, entries[-1].id, count=len(entries),
                consumer=self.consumer,
            )
        except Exception:
            return {}
        return {p.id: p.deliveries for p in pending}

    async def _reader_client_id(self) -> int | None:
        """The reader connection's CLIENT ID, so L{stop} can end its BLOCK early."""
        try:
            return int(await self._reader.redis.execute_command("CLIENT", "ID"))
        except Exception:
            return None  # not allowed (ACLs) or Redis away: stop waits for the BLOCK instead

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
        except Exception:
            pass  # the read ends within READ_BLOCK_MS anyway

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

        d.addErrback(self._handling_failed, entry.id)
        d.addBoth(done)

    def _handling_failed(self, failure: Failure, entry_id: str) -> None:
        if failure.check(*_REDIS_DOWN, TimeoutError):
            # Redis went away mid-way: the entry is still pending (unacknowledged)
            # and is claimed again after claim_idle, by this node or another.
            log.warn("ingress entry {id} left pending: Redis unavailable ({error})",
                     id=entry_id, error=failure.getErrorMessage())
            self._count("retry")
        else:
            log.failure("handling ingress entry {id}", failure, id=entry_id)

    def claim(self) -> Deferred[None]:
        """
        Take over entries idle longer than claim_idle (a dead node's), as
        many as there are free slots.  The read loop runs this every
        claim_interval; it never fails (a failed pass is logged and retried).
        """
        d = Deferred.fromCoroutine(self._claim())
        d.addErrback(
            lambda f: log.warn("ingress claim failed: {error}", error=f.getErrorMessage())
        )
        return d

    async def _claim(self) -> None:
        start = "0-0"
        for _ in range(10):  # bounded per pass
            free = self._free()
            if not self._running or free <= 0:
                return
            claimed = await self._streams.xautoclaim(
                self.stream, self.group, self.consumer, self._claim_idle_ms, start,
                count=min(free, 100),
            )
            counts = await self._deliveries(claimed.entries) if claimed.entries else {}
            if claimed.entries:
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
        # Not d.addTimeout: the cancellation would reach us as whatever the
        # dispatcher turned the CancelledError into (an internal error, which
        # is retried), not as a timeout.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(budget, expire)
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
        body = reply_body(correlation_id, self._reactor.seconds(), **outcome)
        await push_reply(self._redis, reply_to, body, REPLY_TTL)

    async def _ack(self, entry: StreamEntry) -> None:
        await self._streams.xack(self.stream, self.group, entry.id)

    async def _dead(
        self, entry: StreamEntry, reason: str, deliveries: int, *, ack: bool = True
    ) -> None:
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
        if ack:
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
