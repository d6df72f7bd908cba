"""
What the backend worker and the lifecycle event consumer share: Redis
connections made from a URL, the consumer group created at id 0, claiming a
dead consumer's entries with their delivery counts, retrying with backoff
while Redis is away, sync code on daemon threads, and running a service until
SIGINT/SIGTERM.

Private to the package (L{unrealon_backend.worker}, L{unrealon_backend.events}).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import redis.asyncio
import redis.exceptions

T = TypeVar("T")

if TYPE_CHECKING:
    # an asyncio client made with decode_responses=True (the stubs' generic; not at runtime)
    RedisClient = redis.asyncio.Redis[str]
else:
    RedisClient = redis.asyncio.Redis

#: what "Redis is away" looks like; everything else is a bug or a refusal
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    OSError,
)

#: a command that gets no answer in this long counts as Redis being away
COMMAND_TIMEOUT = 10.0


def connect(url: str, *, block_seconds: float = 0.0) -> RedisClient:
    """
    An asyncio client for C{url} (C{redis://host:port/db},
    C{unix:///path?db=N}), answers decoded as text.  A client that blocks
    (XREADGROUP BLOCK) gets a socket timeout longer than its block.
    """
    client: RedisClient = redis.asyncio.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5.0,
        socket_timeout=COMMAND_TIMEOUT + block_seconds,
    )
    return client


async def close_client(client: RedisClient) -> None:
    """Close a client and its pool; redis-py 5 renamed close() to aclose()."""
    closer = getattr(client, "aclose", None) or client.close
    try:
        await closer()
    except REDIS_DOWN as e:
        logging.getLogger("unrealon_backend").debug("closing a Redis client: %s", e)


def default_consumer_name() -> str:
    """host-pid-random: unique per process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"


class Backoff:
    """Delays between retries: 0.1 s doubling up to C{cap}; L{reset} after a success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        delay: float = min(self.cap, self.first * (2.0 ** min(self.failures, 16)))
        self.failures += 1
        # jitter, so a fleet of workers does not reconnect in one burst
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.failures = 0


async def ensure_group(client: RedisClient, stream: str, group: str) -> None:
    """XGROUP CREATE <stream> <group> 0 MKSTREAM; an existing group is fine."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def is_nogroup(error: BaseException) -> bool:
    """The group (or the stream) is gone: Redis restarted without its data."""
    return isinstance(error, redis.exceptions.ResponseError) and "NOGROUP" in str(error)


class ClaimedEntry(NamedTuple):
    """An entry taken over from an idle consumer; C{fields} is None when it was deleted."""

    entry_id: str
    fields: dict[str, str] | None
    deliveries: int


async def claim_idle(client: RedisClient, stream: str, group: str, consumer: str,
                     min_idle_ms: int, count: int) -> list[ClaimedEntry]:
    """
    XAUTOCLAIM up to C{count} entries idle for C{min_idle_ms} (this
    increments their delivery counts), then read each one's count with
    XPENDING, since XAUTOCLAIM does not report it.
    """
    reply: list[Any] = await client.xautoclaim(stream, group, consumer, min_idle_ms,
                                               start_id="0-0", count=count)
    entries: list[tuple[str | None, dict[str, str] | None]] = reply[1] if len(reply) > 1 else []
    claimed = [(entry_id, fields) for entry_id, fields in entries if entry_id is not None]
    if not claimed:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for entry_id, _fields in claimed:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        pending: list[list[dict[str, Any]]] = await pipe.execute()
    result: list[ClaimedEntry] = []
    for (entry_id, fields), info in zip(claimed, pending):
        # an entry acknowledged in between is no longer pending: not ours to handle
        if info:
            result.append(ClaimedEntry(entry_id, fields, int(info[0]["times_delivered"])))
    return result


class DaemonThreads:
    """
    Reused daemon threads for sync handlers.  Daemon threads, not an
    executor: a handler stuck in a sync call must not keep the process alive
    after the shutdown grace period (executor threads are joined at exit).
    Reused, not one per call: starting a thread cost more than the rest of a
    small call's handling (bench/backend_rpc.py).  A job goes to an idle
    thread when there is one, else to a new one; so there are never more
    threads than jobs that ran at once, which the caller bounds.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that thread takes this job (or an equal one)
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._serve, name="unrealon-backend-call",
                             daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


_THREADS = DaemonThreads()


def run_in_thread(fn: Callable[[], T],
                  cleanup: Callable[[], None] | None = None) -> asyncio.Future[T]:
    """
    C{fn()} on a daemon thread (L{DaemonThreads}), as a future of the
    running loop, then C{cleanup()} on that thread (e.g. close its Django
    database connections).  Concurrency is bounded by the caller.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle_result(value: T) -> None:
        if not future.done():
            future.set_result(value)

    def settle_error(error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def body() -> None:
        try:
            value = fn()
        except BaseException as e:  # handed to the awaiting coroutine, which reports it
            loop.call_soon_threadsafe(settle_error, e)
        else:
            loop.call_soon_threadsafe(settle_result, value)
        finally:
            if cleanup is not None:
                try:
                    cleanup()
                except Exception:
                    logging.getLogger("unrealon_backend").exception("thread cleanup failed")

    _THREADS.submit(body)
    return future


def run_until_signalled(serve: Callable[[], Awaitable[None]], stop: Callable[[], None],
                        log: logging.Logger) -> None:
    """
    Run C{serve()} on a new event loop until it returns; SIGINT and SIGTERM
    call C{stop()} (which makes C{serve()} wind down and return).
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop)
            except (NotImplementedError, RuntimeError) as e:  # not the main thread, or Windows
                log.warning("cannot handle %s here (%s): stop it another way", sig.name, e)
        await serve()

    asyncio.run(main())
