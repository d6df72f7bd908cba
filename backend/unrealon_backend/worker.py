"""
Serve backend methods to browsers: the worker side of PROTOCOL.md section 9
(9.2 declaring methods, 9.3 answering calls), with redis-py's asyncio client.

    from unrealon_backend import Worker, MethodError

    worker = Worker("redis://127.0.0.1:6379/0")

    @worker.method("ai.ask", params={"type": "object", "required": ["prompt"],
                                     "properties": {"prompt": {"type": "string"}}},
                   result={"type": "object"}, progress={"type": "string"}, timeout=60)
    def ask(call, prompt):
        for chunk in model.stream(prompt):       # a sync handler runs on a thread
            if call.cancelled:                   # the caller gave up: stop early
                return None
            call.progress(chunk)                 # rpc.progress to the caller, in order
        return {"answer": "..."}

    worker.run()   # until SIGINT / SIGTERM

Or declare on the process-wide default registry with
C{from unrealon_backend import method} and serve it with
C{python -m unrealon_backend worker --redis URL --handlers myapp.backend_methods}
(or the Django command C{unrealon_worker}).

Rules:

  - A handler is C{handler(call, **params)}: a plain function (run on a
    thread of its own, so it may block), an C{async def} (run on the
    worker's loop: it must not block), a generator or an async generator.
  - Declaring: C{params} defaults to any object (C{{"type": "object",
    "additionalProperties": true}}; the handler's signature is then the only
    check, a mismatch is -32602), C{result} to any JSON value (C{{}}),
    C{progress} to None (no progress) except for generator handlers, where it
    defaults to any JSON value.  When C{params} is given, its properties and
    the handler's keyword arguments must agree (C{ValueError} otherwise).
  - Progress: C{call.progress(item)} (from a thread it returns once the item
    is appended; on the loop it queues the item in order and returns) or
    C{await call.aprogress(item)}; each item must fit the C{progress}
    schema.  A generator's every yield is a progress item; a sync
    generator's C{return value} is the result; an async generator gives its
    result by yielding C{Result(value)} last (without it the result is None).
  - Cancel (the caller's C{rpc.cancel}, its connection closing, the
    deadline): C{call.cancelled} becomes True, C{progress}/C{aprogress}
    raise L{Cancelled}, generators get L{Cancelled} thrown in at their next
    yield.  After a cancel the worker sends nothing more for that call (the
    server has answered it) and acknowledges the entry when the handler ends.
  - Errors: C{raise MethodError(code, message, data)} (code outside
    -32768..-32000) reaches the caller as it is; any other exception, and a
    result that does not fit the C{result} schema, is logged (logger
    C{unrealon_backend.worker}) and answered -32603 "internal error".
  - One consumer group, one set of methods: every worker reading a group
    must serve the same methods; an entry for a method this worker does not
    serve is answered -32601 and acknowledged.
  - A call is run again on another worker only when this one is lost
    mid-call and the method is idempotent (at most C{max_deliveries} runs in
    all); the rerun numbers its progress from 1 again and the server drops
    the items the caller already has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from unrealon_backend import _streams
from unrealon_backend._call import Call, Cancelled, MethodError, Result, encode_json
from unrealon_backend._dispatch import Batch, Dispatcher, InFlight
from unrealon_backend._methods import F, MethodRegistry, default_registry, method
from unrealon_backend._streams import REDIS_DOWN, Backoff, RedisClient
from unrealon_backend._watch import CallWatcher

__all__ = ["Call", "Cancelled", "MethodError", "MethodRegistry", "Result", "Worker",
           "default_registry", "method"]

log = logging.getLogger("unrealon_backend.worker")

METHODS_KEY = "unrealon:backend:methods"
WORKERS_KEY = "unrealon:backend:workers"
#: a heartbeat's field is valid this long after Redis' TIME (section 9.2)
HEARTBEAT_TTL_MS = 10_000
#: at most this many entries per XREADGROUP
READ_BATCH = 16
READ_BLOCK_MS = 2000

# One atomic step on Redis' clock: the declarations, then this worker's field
# with "expires" = TIME + ttl.  Returns TIME in ms, for this worker's clock offset.
_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], ARGV[1], '{"methods":' .. ARGV[2] .. ',"expires":' ..
  string.format('%.0f', now + tonumber(ARGV[3])) .. '}')
return now
"""


class Worker:
    """
    Serves the methods of C{registry} (its own by default; see
    L{Worker.method}) from C{stream} in consumer group C{group}.

    @param redis_url: the servers' C{REDIS_URL} (C{redis://host:port/db},
        C{unix:///path?db=N}).
    @param stream: the servers' C{UNREALON_BACKEND_STREAM}.
    @param worker_id: its consumer name and heartbeat field (default
        host-pid-random).
    @param concurrency: calls handled at once.
    @param claim_idle: seconds after which a pending entry of a lost worker
        is taken over (the protocol's 5 s; smaller only in tests).
    @param shutdown_grace: seconds in-flight calls get to finish on stop;
        the ones still running are left pending for another worker.
    @param json_default: C{json.dumps}' C{default}, for results with dates,
        UUIDs, Decimals (e.g. C{DjangoJSONEncoder().default}).
    @param thread_cleanup: called on a sync handler's thread once the
        handler ends (Django: C{django.db.connections.close_all}).
    """

    def __init__(self, redis_url: str, *, stream: str = "stream:backend",
                 group: str = "backend_workers", worker_id: str | None = None,
                 concurrency: int = 32, claim_idle: float = 5.0,
                 registry: MethodRegistry | None = None, heartbeat_interval: float = 3.0,
                 refresh_interval: float = 1.0, reclaim_interval: float = 1.0,
                 max_deliveries: int = 3, shutdown_grace: float = 10.0,
                 json_default: Callable[[Any], Any] | None = None,
                 thread_cleanup: Callable[[], None] | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if claim_idle <= 0 or heartbeat_interval <= 0 or refresh_interval <= 0:
            raise ValueError("claim_idle and the intervals must be positive")
        self.redis_url = redis_url
        self.stream = stream
        self.group = group
        self.worker_id = worker_id or _streams.default_consumer_name()
        self.concurrency = concurrency
        self.claim_idle = claim_idle
        self.registry = registry if registry is not None else MethodRegistry()
        self.heartbeat_interval = heartbeat_interval
        self.refresh_interval = refresh_interval
        self.reclaim_interval = reclaim_interval
        self.max_deliveries = max_deliveries
        self.shutdown_grace = shutdown_grace
        self.json_default = json_default
        self.thread_cleanup = thread_cleanup
        self.in_flight = InFlight()
        self._clock_offset_ms = 0.0
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # True while an XREADGROUP is under way: stopping waits for it rather than cancel it
        self._reading = False

    # -- declaring --------------------------------------------------------------

    def method(self, name: str, *, params: Mapping[str, Any] | None = None,
               result: Mapping[str, Any] | None = None,
               progress: Mapping[str, Any] | None = None, description: str = "",
               timeout: float | None = None, idempotent: bool = False,
               pass_claims: Iterable[str] = ()) -> Callable[[F], F]:
        """Declare a method served by this worker: L{MethodRegistry.method}."""
        return self.registry.method(name, params=params, result=result, progress=progress,
                                    description=description, timeout=timeout,
                                    idempotent=idempotent, pass_claims=pass_claims)

    def declarations(self) -> list[dict[str, Any]]:
        """The declaration objects (PROTOCOL.md 9.2) of the methods served, sorted by name."""
        return self.registry.declarations()

    # -- running ------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop cleanly (see L{serve})."""
        _streams.run_until_signalled(self.serve, self.stop, log)

    def stop(self) -> None:
        """Ask L{serve} to wind down; safe from any thread and from signal handlers."""
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None:
            return
        loop.call_soon_threadsafe(stopping.set)

    def now_ms(self) -> float:
        """Redis' clock in epoch ms, as far as this worker knows it (from its heartbeats)."""
        return time.time() * 1000 + self._clock_offset_ms

    async def serve(self) -> None:
        """
        Declare, read and handle calls until L{stop}: then stop reading,
        delete this worker's heartbeat field, let in-flight calls finish for
        up to C{shutdown_grace} seconds, and return.
        """
        if not self.registry.methods:
            raise ValueError("this worker serves no method: declare some with @method first")
        self._loop = asyncio.get_running_loop()
        self._stopping = stopping = asyncio.Event()
        client = _streams.connect(self.redis_url)
        reader = _streams.connect(self.redis_url, block_seconds=READ_BLOCK_MS / 1000)
        dispatcher = Dispatcher(
            client, self.registry, stream=self.stream, group=self.group,
            worker_id=self.worker_id, max_deliveries=self.max_deliveries,
            in_flight=self.in_flight, now_ms=self.now_ms,
            clock_offset_ms=lambda: self._clock_offset_ms, encode=self._encode,
            thread_cleanup=self.thread_cleanup,
        )
        watcher = CallWatcher(client, self.in_flight, stream=self.stream, group=self.group,
                              worker_id=self.worker_id, now_ms=self.now_ms)
        slots = asyncio.Semaphore(self.concurrency)
        handling: set[asyncio.Task[None]] = set()
        log.info("worker %s: serving %s from %s (group %s)", self.worker_id,
                 ", ".join(sorted(self.registry.methods)), self.stream, self.group)
        loops = {
            "heartbeat": self._heartbeat_loop(client, stopping),
            "read": self._read_loop(reader, dispatcher, slots, handling, stopping),
            "reclaim": self._reclaim_loop(client, dispatcher, slots, handling, stopping),
            "cancel": watcher.cancel_loop(),
            "refresh": watcher.refresh_loop(self.refresh_interval),
        }
        tasks = {name: asyncio.ensure_future(coro) for name, coro in loops.items()}
        try:
            await stopping.wait()
            log.info("worker %s: stopping (%d calls in flight)", self.worker_id, len(handling))
            await self._forget_heartbeat(client, tasks["heartbeat"])
            # entries read or claimed but not started would be left pending, and taken
            # for a lost worker's: let a read or a claim under way finish first
            if not self._reading:
                tasks["read"].cancel()
            await asyncio.wait([tasks["read"], tasks["reclaim"]],
                               timeout=READ_BLOCK_MS / 1000 + _streams.COMMAND_TIMEOUT)
            await self._drain(handling)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await _streams.close_client(reader)
            await _streams.close_client(client)
            log.info("worker %s: stopped", self.worker_id)

    async def _drain(self, handling: set[asyncio.Task[None]]) -> None:
        if not handling:
            return
        _done, running = await asyncio.wait(set(handling), timeout=self.shutdown_grace)
        if not running:
            return
        log.warning("worker %s: %d calls still running after %.1f s: left pending for "
                    "another worker", self.worker_id, len(running), self.shutdown_grace)
        for call in list(self.in_flight.calls.values()):
            call.cancel("shutdown")
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _encode(self, value: Any) -> str:
        return encode_json(value, self.json_default)

    # -- the loops ----------------------------------------------------------------

    async def _heartbeat_loop(self, client: RedisClient, stopping: asyncio.Event) -> None:
        heartbeat = client.register_script(_HEARTBEAT_LUA)
        declarations = self.declarations()
        names = self._encode([d["name"] for d in declarations])
        args: list[str | int] = [self.worker_id, names, HEARTBEAT_TTL_MS]
        for declaration in declarations:
            args += [declaration["name"], self._encode(declaration)]
        backoff = Backoff(cap=self.heartbeat_interval)
        while not stopping.is_set():
            try:
                now = await heartbeat(keys=[METHODS_KEY, WORKERS_KEY], args=args)
                self._clock_offset_ms = float(now) - time.time() * 1000
                backoff.reset()
                delay = self.heartbeat_interval
            except REDIS_DOWN as e:
                delay = backoff.next_delay()
                log.warning("worker %s: heartbeat failed, Redis unavailable (%s): retrying in "
                            "%.1f s", self.worker_id, e, delay)
            await _pause(stopping, delay)

    async def _forget_heartbeat(self, client: RedisClient,
                                heartbeat: asyncio.Task[None]) -> None:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        try:
            await client.hdel(WORKERS_KEY, self.worker_id)
        except REDIS_DOWN as e:
            log.warning("worker %s: could not delete its heartbeat (%s): it expires in 10 s",
                        self.worker_id, e)

    async def _read_loop(self, reader: RedisClient, dispatcher: Dispatcher,
                         slots: asyncio.Semaphore, handling: set[asyncio.Task[None]],
                         stopping: asyncio.Event) -> None:
        backoff = Backoff()
        group_ready = False
        while not stopping.is_set():
            await slots.acquire()
            taken = 1
            while taken < READ_BATCH and not slots.locked():
                await slots.acquire()
                taken += 1
            try:
                if not group_ready:
                    await _streams.ensure_group(reader, self.stream, self.group)
                    group_ready = True
                self._reading = True
                try:
                    reply = await reader.xreadgroup(self.group, self.worker_id,
                                                    {self.stream: ">"}, count=taken,
                                                    block=READ_BLOCK_MS)
                finally:
                    self._reading = False
                backoff.reset()
            except Exception as e:
                for _ in range(taken):
                    slots.release()
                if _streams.is_nogroup(e):
                    log.warning("worker %s: group %s is gone (Redis lost its data?): "
                                "creating it again", self.worker_id, self.group)
                    group_ready = False
                    continue
                if not isinstance(e, REDIS_DOWN):
                    raise
                delay = backoff.next_delay()
                log.warning("worker %s: reading %s failed, Redis unavailable (%s): retrying in "
                            "%.1f s", self.worker_id, self.stream, e, delay)
                await _pause(stopping, delay)
                continue
            entries = [entry for _stream, stream_entries in reply or []
                       for entry in stream_entries]
            for _ in range(taken - len(entries)):
                slots.release()
            batch = await dispatcher.read_batch(entries) if entries else None
            for entry_id, fields in entries:
                self._start(dispatcher, slots, handling, entry_id, fields, 1, batch)

    def _start(self, dispatcher: Dispatcher, slots: asyncio.Semaphore,
               handling: set[asyncio.Task[None]], entry_id: str,
               fields: Mapping[str, str] | None, deliveries: int,
               batch: Batch | None = None) -> None:
        """Handle one entry in a task of its own; its slot is released when it ends."""
        self.in_flight.add(entry_id)

        async def handle() -> None:
            try:
                await dispatcher.handle(entry_id, fields, deliveries, batch)
            finally:
                self.in_flight.remove(entry_id)
                slots.release()

        task = asyncio.ensure_future(handle())
        handling.add(task)
        task.add_done_callback(handling.discard)

    async def _reclaim_loop(self, client: RedisClient, dispatcher: Dispatcher,
                            slots: asyncio.Semaphore, handling: set[asyncio.Task[None]],
                            stopping: asyncio.Event) -> None:
        """Take over the entries of lost workers (idle for more than claim_idle)."""
        while not await _pause(stopping, self.reclaim_interval):
            taken = 0
            while taken < READ_BATCH and not slots.locked():
                await slots.acquire()
                taken += 1
            if not taken:
                continue
            try:
                claimed = await _streams.claim_idle(client, self.stream, self.group,
                                                    self.worker_id, int(self.claim_idle * 1000),
                                                    taken)
            except Exception as e:
                claimed = []
                if not isinstance(e, REDIS_DOWN) and not _streams.is_nogroup(e):
                    raise
                log.warning("worker %s: could not claim idle entries (%s)", self.worker_id, e)
            for entry in claimed:
                if entry.entry_id in self.in_flight.entries:
                    # ours and still running: its refresh was late, not a lost worker's
                    continue
                taken -= 1
                self._start(dispatcher, slots, handling, entry.entry_id, entry.fields,
                            entry.deliveries)
            for _ in range(taken):
                slots.release()


async def _pause(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep C{seconds} or until C{stopping} is set; whether it is."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True
