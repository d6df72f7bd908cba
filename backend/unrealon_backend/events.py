"""
Consume the servers' lifecycle events (PROTOCOL.md section 9.1:
C{user.online}, C{user.offline}, C{room.occupied}, C{room.vacated},
C{connection.opened}, C{connection.closed}) from C{stream:events} in a
consumer group of the backend's own.

    from unrealon_backend import EventConsumer

    consumer = EventConsumer("redis://127.0.0.1:6379/0")

    @consumer.on("user.online")
    def online(event):                      # sync: run on a thread
        User.objects.filter(pk=event["user_id"]).update(online=True)

    @consumer.on("*")                        # every event, after the typed handlers
    async def audit(event):
        ...

    consumer.run()   # until SIGINT / SIGTERM

Or register on the process-wide default with C{from unrealon_backend import
on} and run C{python -m unrealon_backend events --redis URL --handlers
myapp.lifecycle} (or the Django command C{unrealon_events}).

Delivery is at least once, in stream order per consumer: an entry is
acknowledged once all its handlers returned.  A handler that raises is logged
(logger C{unrealon_backend.events}) and the entry is left pending; it is
taken again (by this consumer or another of the group) once it has been idle
C{claim_idle} seconds, and all its handlers run again -- so handlers must be
idempotent, and a retried event may come after later ones.  An entry
delivered more than C{max_deliveries} times, or whose payload is not a JSON
object with a C{type}, is moved to the dead-letter stream C{<stream>:dead}
(fields C{payload}, C{reason}, C{entry_id}) and acknowledged.  Entries of a
consumer that died are taken over the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from unrealon_backend import _streams
from unrealon_backend._streams import REDIS_DOWN, Backoff, RedisClient

__all__ = ["EventConsumer", "EventHandlers", "default_event_handlers", "on"]

log = logging.getLogger("unrealon_backend.events")

H = TypeVar("H", bound=Callable[..., Any])

#: the catch-all event type
ANY = "*"
READ_BATCH = 64
DEAD_MAXLEN = 10000


class EventHandlers:
    """Event type -> the handlers of one consumer (or of the process-wide default)."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Callable[[dict[str, Any]], Any]]] = {}

    def on(self, event_type: str) -> Callable[[H], H]:
        """Decorator: call the handler with each event of C{event_type} (C{"*"}: every event)."""
        if not isinstance(event_type, str) or not event_type:
            raise ValueError("the event type must be a non-empty string (or '*')")

        def register(handler: H) -> H:
            if not callable(handler):
                raise ValueError(f"the handler of {event_type!r} must be callable")
            self.handlers.setdefault(event_type, []).append(handler)
            return handler

        return register

    def for_type(self, event_type: str) -> list[Callable[[dict[str, Any]], Any]]:
        """The handlers of C{event_type}, then the catch-all ones."""
        typed = self.handlers.get(event_type, []) if event_type != ANY else []
        return [*typed, *self.handlers.get(ANY, [])]


#: the handlers C{unrealon_backend.on} adds to; the CLI and the Django command run them
default_event_handlers = EventHandlers()
#: C{from unrealon_backend import on}: register on the default handlers
on = default_event_handlers.on


class EventConsumer:
    """
    Reads C{stream} in consumer group C{group} (created at id 0, so no
    event appended before the first start is skipped) as consumer
    C{consumer}, and calls the handlers.  See the module docstring.
    """

    def __init__(self, redis_url: str, *, stream: str = "stream:events",
                 group: str = "backend_events", consumer: str | None = None,
                 claim_idle: float = 30.0, max_deliveries: int = 5,
                 dead_stream: str | None = None, handlers: EventHandlers | None = None,
                 thread_cleanup: Callable[[], None] | None = None) -> None:
        if claim_idle <= 0 or max_deliveries < 1:
            raise ValueError("claim_idle must be positive and max_deliveries at least 1")
        self.redis_url = redis_url
        self.stream = stream
        self.group = group
        self.consumer = consumer or _streams.default_consumer_name()
        self.claim_idle = claim_idle
        self.max_deliveries = max_deliveries
        self.dead_stream = dead_stream or f"{stream}:dead"
        self.handlers = handlers if handlers is not None else EventHandlers()
        # called on a sync handler's thread once it ends (Django: close its DB connections)
        self.thread_cleanup = thread_cleanup
        # look for idle entries twice per claim_idle, but at least every 5 s
        self.reclaim_interval = min(claim_idle / 2, 5.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def on(self, event_type: str) -> Callable[[H], H]:
        """Register a handler of this consumer: L{EventHandlers.on}."""
        return self.handlers.on(event_type)

    def run(self) -> None:
        """Consume until SIGINT or SIGTERM."""
        _streams.run_until_signalled(self.serve, self.stop, log)

    def stop(self) -> None:
        """Ask L{serve} to return once the event in hand is handled; safe from any thread."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)

    async def serve(self) -> None:
        """Consume until L{stop}."""
        self._loop = asyncio.get_running_loop()
        self._stopping = stopping = asyncio.Event()
        block_ms = int(min(2.0, self.reclaim_interval) * 1000)
        client = _streams.connect(self.redis_url, block_seconds=block_ms / 1000)
        log.info("events consumer %s: reading %s (group %s)", self.consumer, self.stream,
                 self.group)
        backoff = Backoff()
        group_ready = False
        last_reclaim = 0.0
        try:
            while not stopping.is_set():
                try:
                    if not group_ready:
                        await _streams.ensure_group(client, self.stream, self.group)
                        group_ready = True
                    if time.monotonic() - last_reclaim >= self.reclaim_interval:
                        last_reclaim = time.monotonic()
                        await self._reclaim(client, stopping)
                    reply = await client.xreadgroup(self.group, self.consumer,
                                                    {self.stream: ">"}, count=READ_BATCH,
                                                    block=block_ms)
                    for _stream, entries in reply or []:
                        for entry_id, fields in entries:
                            await self._handle(client, entry_id, fields, 1)
                    backoff.reset()
                except Exception as e:
                    if _streams.is_nogroup(e):
                        log.warning("events consumer %s: group %s is gone: creating it again",
                                    self.consumer, self.group)
                        group_ready = False
                        continue
                    if not isinstance(e, REDIS_DOWN):
                        raise
                    delay = backoff.next_delay()
                    log.warning("events consumer %s: Redis unavailable (%s): retrying in %.1f s",
                                self.consumer, e, delay)
                    await asyncio.sleep(delay)
        finally:
            await _streams.close_client(client)
            log.info("events consumer %s: stopped", self.consumer)

    async def _reclaim(self, client: RedisClient, stopping: asyncio.Event) -> None:
        """Take the entries idle for claim_idle (failed here, or a dead consumer's)."""
        while not stopping.is_set():
            claimed = await _streams.claim_idle(client, self.stream, self.group, self.consumer,
                                                int(self.claim_idle * 1000), READ_BATCH)
            for entry in claimed:
                await self._handle(client, entry.entry_id, entry.fields, entry.deliveries)
            if len(claimed) < READ_BATCH:
                return

    async def _handle(self, client: RedisClient, entry_id: str,
                      fields: Mapping[str, str] | None, deliveries: int) -> None:
        if fields is None:
            log.warning("events consumer %s: entry %s was trimmed before it was handled: "
                        "acknowledged", self.consumer, entry_id)
            await client.xack(self.stream, self.group, entry_id)
            return
        raw = fields.get("payload", "")
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self._dead(client, entry_id, raw, "payload is not a JSON object with a type")
            return
        if deliveries > self.max_deliveries:
            await self._dead(client, entry_id, raw,
                             f"handlers failed {deliveries - 1} times (max_deliveries)")
            return
        # the stream id orders the events (it grows in stream order) and names
        # each one, so a handler can drop a retried or stale event
        event["event_id"] = entry_id
        for handler in self.handlers.for_type(event["type"]):
            try:
                await _call(handler, dict(event), self.thread_cleanup)  # a handler's changes stay its own
            except Exception:
                log.exception("events consumer %s: handler %s failed on %s (entry %s, delivery "
                              "%d): it is retried after %.0f s", self.consumer,
                              getattr(handler, "__qualname__", handler), event["type"], entry_id,
                              deliveries, self.claim_idle)
                return  # left pending: retried when idle for claim_idle
        await client.xack(self.stream, self.group, entry_id)

    async def _dead(self, client: RedisClient, entry_id: str, payload: str,
                    reason: str) -> None:
        log.error("events consumer %s: entry %s moved to %s: %s", self.consumer, entry_id,
                  self.dead_stream, reason)
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_stream, {"payload": payload, "reason": reason,
                                         "entry_id": entry_id},
                      maxlen=DEAD_MAXLEN, approximate=True)
            pipe.xack(self.stream, self.group, entry_id)
            await pipe.execute()


async def _call(handler: Callable[[dict[str, Any]], Any], event: dict[str, Any],
                thread_cleanup: Callable[[], None] | None) -> None:
    """A coroutine function on the loop; anything else on a thread (it may block)."""
    if inspect.iscoroutinefunction(inspect.unwrap(handler)):
        await handler(event)
        return
    outcome = await _streams.run_in_thread(lambda: handler(event), thread_cleanup)
    if inspect.isawaitable(outcome):
        await outcome
