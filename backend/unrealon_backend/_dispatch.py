"""
One entry of the backend stream, from its fields to its acknowledgement
(PROTOCOL.md section 9.3): decide whether to run it (valid, a method served
here, not past its deadline, not cancelled, not a lost call it must not run
again), run the handler, and append its progress, then its result or error,
to the call's C{reply_to} stream; the entry is acknowledged only once its
final reply is appended (in the same script) or it was decided not to run it.

Private to the package: L{unrealon_backend.worker.Worker} owns a
L{Dispatcher} and the L{InFlight} calls it shares with its cancel and
refresh loops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from unrealon_backend._call import RESERVED_CODES, Call, Cancelled, MethodError, ProgressSender
from unrealon_backend._methods import Method, MethodRegistry
from unrealon_backend._schema import validate
from unrealon_backend._streams import REDIS_DOWN, Backoff, RedisClient

log = logging.getLogger("unrealon_backend.worker")

T = TypeVar("T")

CANCEL_KEY_PREFIX = "unrealon:backend:cancel:"
#: replies: XADD <reply_to> MAXLEN ~ 10000, EXPIRE <reply_to> 3600 (section 9.3)
REPLY_MAXLEN = 10000
REPLY_TTL = 3600
#: how long after a call's deadline a reply or an ack is still worth retrying
RETRY_PAST_DEADLINE_MS = 60_000

#: KEYS: reply_to, backend stream.  ARGV: payload, maxlen, ttl, group, entry to ack ("": none).
#: Appends a reply and, for a final one, acknowledges the call's entry with it.
REPLY_SCRIPT = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'payload', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[5] ~= '' then redis.call('XACK', KEYS[2], ARGV[4], ARGV[5]) end
return 1
"""

INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
WORKER_LOST = -32015


def error_reply(call_id: str, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"call_id": call_id, "type": "error", "error": error}


def internal_error(call_id: str) -> dict[str, Any]:
    """-32603 without the exception's text (section 3)."""
    return error_reply(call_id, INTERNAL_ERROR, "internal error")


class InFlight:
    """The entries this worker is handling, and the calls made of them."""

    def __init__(self) -> None:
        self.entries: dict[str, Call | None] = {}
        self.calls: dict[str, Call] = {}

    def add(self, entry_id: str) -> None:
        self.entries[entry_id] = None

    def attach(self, entry_id: str, call: Call) -> None:
        self.entries[entry_id] = call
        self.calls[call.call_id] = call

    def remove(self, entry_id: str) -> None:
        call = self.entries.pop(entry_id, None)
        if call is not None and self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]


class Batch(NamedTuple):
    """What L{Dispatcher.read_batch} read of one read's entries at once."""

    #: the decoded payloads, by entry id (entries that are not JSON objects are absent)
    payloads: dict[str, dict[str, Any]]
    #: the call ids cancelled before they start; None: not known (Redis did not answer)
    cancelled: set[str] | None


class Refused(NamedTuple):
    """A call not to run: the error reply to send, or None to acknowledge it without one."""

    reply: dict[str, Any] | None


def _entry_problem(payload: Mapping[str, Any]) -> str | None:
    """Why a call entry cannot be run, or None when its fields are as section 9.3 says."""
    if not isinstance(payload.get("call_id"), str) or not payload["call_id"]:
        return "call_id is missing or not a string"
    if not isinstance(payload.get("method"), str):
        return "method is missing or not a string"
    if not isinstance(payload.get("params", {}), dict):
        return "params is not an object"
    deadline = payload.get("deadline")
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        return "deadline is missing or not a number"
    if payload.get("reply_to") is not None and not isinstance(payload["reply_to"], str):
        return "reply_to is not a string"
    return None


class Dispatcher:
    """Handles entries of one stream and group for one worker (see the module docstring)."""

    def __init__(self, client: RedisClient, registry: MethodRegistry, *, stream: str,
                 group: str, worker_id: str, max_deliveries: int, in_flight: InFlight,
                 now_ms: Callable[[], float], clock_offset_ms: Callable[[], float],
                 encode: Callable[[Any], str],
                 thread_cleanup: Callable[[], None] | None = None) -> None:
        self.redis = client
        self.thread_cleanup = thread_cleanup
        self.registry = registry
        self.stream = stream
        self.group = group
        self.worker_id = worker_id
        self.max_deliveries = max_deliveries
        self.in_flight = in_flight
        self.now_ms = now_ms
        self.clock_offset_ms = clock_offset_ms
        self.encode = encode
        self._reply_script = client.register_script(REPLY_SCRIPT)

    async def handle(self, entry_id: str, fields: Mapping[str, str] | None, deliveries: int,
                     batch: Batch | None = None) -> None:
        """
        Everything about one entry; never raises but C{CancelledError}.
        C{batch}: what was read of its read's batch at once (L{read_batch});
        None: the entry is decoded and its cancel key read on its own.
        """
        try:
            await self._handle(entry_id, fields, deliveries, batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            # the entry stays pending: another worker (or this one) claims it once idle
            log.exception("worker %s: entry %s of %s was left unacknowledged",
                          self.worker_id, entry_id, self.stream)

    async def _handle(self, entry_id: str, fields: Mapping[str, str] | None,
                      deliveries: int, batch: Batch | None) -> None:
        payload = batch.payloads.get(entry_id) if batch is not None else None
        if payload is None:
            payload = self._payload(entry_id, fields)  # (and logs why it is not one)
        if payload is None:
            await self._retrying(lambda: self._ack(entry_id), None)
            return
        problem = _entry_problem(payload)
        call_id, reply_to = payload.get("call_id"), payload.get("reply_to")
        if problem is not None:
            log.warning("worker %s: invalid call entry %s: %s", self.worker_id, entry_id, problem)
            if isinstance(call_id, str) and isinstance(reply_to, str):
                await self._finish(entry_id, reply_to, None,
                                   error_reply(call_id, INVALID_REQUEST, f"invalid call: {problem}"))
            else:
                await self._retrying(lambda: self._ack(entry_id), None)
            return
        deadline = int(payload["deadline"])
        method = self.registry.methods.get(payload["method"])
        refused = await self._refusal(payload, method, deliveries,
                                      batch.cancelled if batch is not None else None)
        if refused is not None:
            await self._finish(entry_id, reply_to, deadline, refused.reply)
            return
        assert method is not None  # _refusal refuses unknown methods
        await self._run(entry_id, payload, method, deliveries)

    async def read_batch(self, entries: list[tuple[str, Mapping[str, str] | None]]) -> Batch:
        """
        One read's entries, decoded once, and which of their calls were
        cancelled before they start: one MGET of their cancel keys, instead
        of one EXISTS each (a round trip cost as much as the rest of a small
        call's handling).  C{cancelled} is None when Redis did not answer
        (each entry then asks on its own).
        """
        payloads: dict[str, dict[str, Any]] = {}
        ids: list[str] = []
        for entry_id, fields in entries:
            try:
                payload = json.loads((fields or {}).get("payload", ""))
            except ValueError:
                continue  # refused by _handle, with its reason logged
            if isinstance(payload, dict):
                payloads[entry_id] = payload
                if isinstance(payload.get("call_id"), str):
                    ids.append(payload["call_id"])
        if not ids:
            return Batch(payloads, set())
        try:
            values = await self.redis.mget([CANCEL_KEY_PREFIX + i for i in ids])
        except Exception as e:  # Redis away, or refused: never the read loop's end
            log.info("worker %s: reading the cancel keys of a batch failed (%r): each entry "
                     "reads its own", self.worker_id, e)
            return Batch(payloads, None)
        return Batch(payloads, {call_id for call_id, value in zip(ids, values) if value is not None})

    def _payload(self, entry_id: str, fields: Mapping[str, str] | None) -> dict[str, Any] | None:
        if fields is None:
            log.warning("worker %s: entry %s was deleted from %s before it was handled",
                        self.worker_id, entry_id, self.stream)
            return None
        try:
            payload = json.loads(fields.get("payload", ""))
        except ValueError as e:
            log.warning("worker %s: entry %s has no JSON payload (%s): acknowledged, not run",
                        self.worker_id, entry_id, e)
            return None
        if not isinstance(payload, dict):
            log.warning("worker %s: entry %s: the payload is not a JSON object: acknowledged",
                        self.worker_id, entry_id)
            return None
        return payload

    async def _refusal(self, payload: Mapping[str, Any], method: Method | None,
                       deliveries: int, cancelled_ids: set[str] | None) -> Refused | None:
        """None to run the call, else what to do instead."""
        call_id: str = payload["call_id"]
        deadline = int(payload["deadline"])
        if method is None:
            log.warning("worker %s: call %s of %r: no such method here (all workers of group %s "
                        "must serve the same methods)", self.worker_id, call_id, payload["method"],
                        self.group)
            return Refused(error_reply(call_id, METHOD_NOT_FOUND, "method not found"))
        if self.now_ms() >= deadline:
            log.info("worker %s: call %s (%s) is past its deadline: not run", self.worker_id,
                     call_id, method.name)
            return Refused(None)
        if deliveries > 1:
            idempotent = bool(payload.get("idempotent", method.idempotent))
            if not idempotent or deliveries > self.max_deliveries:
                log.warning("worker %s: call %s (%s) was taken over from a lost worker "
                            "(delivery %d): answered -32015", self.worker_id, call_id,
                            method.name, deliveries)
                return Refused(error_reply(call_id, WORKER_LOST, "backend worker lost",
                                           {"retryable": False}))
            log.info("worker %s: call %s (%s) taken over from a lost worker: run again "
                     "(delivery %d)", self.worker_id, call_id, method.name, deliveries)
        if cancelled_ids is not None:
            cancelled = call_id in cancelled_ids
        else:
            cancelled = bool(await self._retrying(
                lambda: self.redis.exists(CANCEL_KEY_PREFIX + call_id), deadline))
        if cancelled:
            log.info("worker %s: call %s (%s) was cancelled before it started", self.worker_id,
                     call_id, method.name)
            return Refused(None)
        params = payload.get("params", {})
        errors = validate(params, method.params, "")
        unbound = method.bind_problem(params) if not errors else None
        if unbound is not None:
            errors = [{"field": "", "message": unbound}]
        if errors:
            log.warning("worker %s: call %s (%s): params refused: %s", self.worker_id, call_id,
                        method.name, errors)
            return Refused(error_reply(call_id, INVALID_PARAMS, "invalid params",
                                       {"errors": errors}))
        return None

    async def _run(self, entry_id: str, payload: Mapping[str, Any], method: Method,
                   deliveries: int) -> None:
        call_id: str = payload["call_id"]
        reply_to: str | None = payload.get("reply_to")
        deadline = int(payload["deadline"])

        async def append_progress(reply: dict[str, Any]) -> None:
            assert reply_to is not None
            await self._retrying(lambda: self._append(reply_to, reply, None), deadline)

        sender = ProgressSender(asyncio.get_running_loop(), call_id, method.name, method.progress,
                                reply_to is not None, append_progress, self.encode)
        call = Call(payload, delivery=deliveries, clock_offset_ms=self.clock_offset_ms(),
                    sender=sender)
        self.in_flight.attach(entry_id, call)
        started = time.monotonic()
        reply = await self._outcome(method, call)
        await sender.drain()
        if call.cancelled:
            log.info("worker %s: call %s (%s) cancelled (%s) after %.3f s: no reply",
                     self.worker_id, call_id, method.name, call.cancel_reason,
                     time.monotonic() - started)
            reply = None
        await self._finish(entry_id, reply_to, deadline, reply)

    async def _outcome(self, method: Method, call: Call) -> dict[str, Any] | None:
        """The final reply for the handler's outcome, or None when it was cancelled."""
        try:
            value = await method.run(call, self.thread_cleanup)
        except asyncio.CancelledError:
            raise
        except Cancelled:
            return None
        except MethodError as e:
            if e.code in RESERVED_CODES:
                log.error("worker %s: %s raised MethodError with reserved code %d: sent as "
                          "-32603", self.worker_id, method.name, e.code)
                return internal_error(call.call_id)
            reply = error_reply(call.call_id, e.code, e.message, e.data)
            return self._encodable(method, call, reply)
        except BaseException:  # whatever a handler raises, even SystemExit, is its failure
            if not call.cancelled:
                log.exception("worker %s: %s failed (call %s)", self.worker_id, method.name,
                              call.call_id)
            else:
                log.info("worker %s: %s raised after it was cancelled (call %s)", self.worker_id,
                         method.name, call.call_id, exc_info=True)
            return internal_error(call.call_id)
        errors = validate(value, method.result, "result")
        if errors:
            log.error("worker %s: %s returned a result that does not fit its schema (call %s): "
                      "%s", self.worker_id, method.name, call.call_id, errors)
            return internal_error(call.call_id)
        return self._encodable(method, call, {"call_id": call.call_id, "type": "result",
                                              "result": value})

    def _encodable(self, method: Method, call: Call, reply: dict[str, Any]) -> dict[str, Any]:
        try:
            self.encode(reply)
        except (TypeError, ValueError) as e:
            log.error("worker %s: %s: the reply of call %s is not JSON (%s): sent as -32603",
                      self.worker_id, method.name, call.call_id, e)
            return internal_error(call.call_id)
        return reply

    async def _finish(self, entry_id: str, reply_to: str | None, deadline: int | None,
                      reply: dict[str, Any] | None) -> None:
        """Append the final reply (if any, and if the call has a reply_to) and acknowledge."""
        if reply is not None and reply_to is not None:
            await self._retrying(lambda: self._append(reply_to, reply, entry_id), deadline)
        else:
            await self._retrying(lambda: self._ack(entry_id), deadline)

    async def _append(self, reply_to: str, reply: dict[str, Any], ack: str | None) -> None:
        # one script, not MULTI/XADD/EXPIRE/XACK/EXEC: atomic the same, and
        # one command to encode and one reply to parse instead of five
        await self._reply_script(keys=[reply_to, self.stream],
                                 args=[self.encode(reply), REPLY_MAXLEN, REPLY_TTL, self.group,
                                       ack or ""])

    async def _ack(self, entry_id: str) -> None:
        await self.redis.xack(self.stream, self.group, entry_id)

    async def _retrying(self, op: Callable[[], Awaitable[T]], deadline: int | None) -> T:
        """
        C{op()}, again while Redis is away, until a minute past C{deadline}
        (nobody waits for the call then, and the entry stays pending for
        whoever comes next) or, without a deadline, for ever.
        """
        backoff = Backoff()
        while True:
            try:
                return await op()
            except REDIS_DOWN as e:
                if deadline is not None and self.now_ms() > deadline + RETRY_PAST_DEADLINE_MS:
                    raise
                delay = backoff.next_delay()
                log.warning("worker %s: Redis unavailable (%s): retrying in %.1f s",
                            self.worker_id, e, delay)
                await asyncio.sleep(delay)
