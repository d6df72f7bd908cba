"""
Backend methods and lifecycle event handlers for tests/test_backend_worker.py,
served by real worker processes (C{python -m unrealon_backend worker
--handlers tests.backend_handlers}).  They record what they saw in the test's
private Redis (C{$BACKEND_TEST_REDIS}) under C{test:*} keys, so the test can
tell what a handler did inside its process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
from unrealon_backend import Call, Cancelled, MethodError, Result, method, on

_client: redis.Redis | None = None


def marks() -> redis.Redis:
    """The test's Redis, for the markers the handlers leave."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BACKEND_TEST_REDIS"], decode_responses=True)
    return _client


def mark(call: Call, what: str) -> None:
    marks().rpush(f"test:marks:{call.call_id}", what)


TEXT = {"type": "object", "required": ["text"], "additionalProperties": False,
        "properties": {"text": {"type": "string"}}}
COUNT = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0}}}


@method("test.echo", params=TEXT, result={"type": "object", "required": ["echo"]},
        description="sync: the text back, with who asked", pass_claims=["info"])
def echo(call: Call, text: str) -> dict[str, Any]:
    mark(call, "ran")
    return {"echo": text, "user_id": call.user_id, "claims": call.claims,
            "delivery": call.delivery}


@method("test.aecho", params=TEXT)
async def aecho(call: Call, text: str) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"echo": text, "async": True}


@method("test.count", params=COUNT, progress={"type": "integer"}, result={"type": "object"})
def count(call: Call, n: int) -> Iterator[int]:
    yield from range(n)
    return {"total": n}


@method("test.acount", params=COUNT, progress={"type": "integer"}, timeout=20)
async def acount(call: Call, n: int) -> AsyncIterator[Any]:
    for i in range(n):
        yield i
    yield Result({"total": n, "async": True})


@method("test.progress_calls", params=COUNT, progress={"type": "string"})
async def progress_calls(call: Call, n: int) -> str:
    for i in range(n):
        if i % 2:
            await call.aprogress(f"item {i}")
        else:
            call.progress(f"item {i}")  # on the loop: queued in order
    return "done"


@method("test.app_error")
def app_error(call: Call) -> None:
    raise MethodError(4001, "quota exceeded", {"limit": 3})


@method("test.crash")
def crash(call: Call) -> None:
    raise RuntimeError("secret detail that must not leave the worker")


@method("test.bad_result", result={"type": "object", "required": ["ok"]})
def bad_result(call: Call) -> dict[str, Any]:
    return {"nope": 1}


@method("test.wait_cancel", timeout=30)
def wait_cancel(call: Call) -> dict[str, Any]:
    """Polls the flag; reports what it saw."""
    mark(call, "started")
    limit = time.monotonic() + 20
    while time.monotonic() < limit:
        if call.cancelled:
            mark(call, "flag")
            mark(call, f"reason {call.cancel_reason}")
            return {"finished": "after cancel"}
        time.sleep(0.02)
    mark(call, "timeout")
    return {"finished": "never cancelled"}


@method("test.gen_cancel", timeout=30)
def gen_cancel(call: Call) -> Iterator[int]:
    """Yields until Cancelled is thrown in at a yield."""
    mark(call, "started")
    i = 0
    try:
        while i < 400:
            yield i
            i += 1
            time.sleep(0.05)
    except Cancelled:
        mark(call, "thrown")
        raise
    mark(call, "ran out")


@method("test.slow", params={"type": "object", "properties": {"seconds": {"type": "number"}}},
        idempotent=True, timeout=60)
def slow(call: Call, seconds: float = 30.0) -> dict[str, Any]:
    """First delivery: marks, then sleeps (the test kills the worker); later ones answer."""
    mark(call, f"delivery {call.delivery}")
    if call.delivery == 1:
        time.sleep(seconds)
    return {"delivery": call.delivery}


@method("test.slow_once", params={"type": "object", "properties": {"seconds": {"type": "number"}}},
        timeout=60)
def slow_once(call: Call, seconds: float = 30.0) -> dict[str, Any]:
    mark(call, f"delivery {call.delivery}")
    time.sleep(seconds)
    return {"delivery": call.delivery}


# -- lifecycle events ---------------------------------------------------------------


@on("user.online")
def user_online(event: dict[str, Any]) -> None:
    marks().rpush("test:events:online", json.dumps(event, sort_keys=True))


@on("*")
async def every_event(event: dict[str, Any]) -> None:
    marks().rpush("test:events:all", event["type"])
    marks().sadd("test:events:ids", event["event_id"])


@on("test.flaky")
def flaky(event: dict[str, Any]) -> None:
    """Fails its first two deliveries."""
    tries = marks().incr(f"test:events:tries:{event['n']}")
    if tries <= 2:
        raise RuntimeError(f"flaky handler, try {tries}")
    marks().rpush("test:events:flaky", str(event["n"]))


@on("test.broken")
def broken(event: dict[str, Any]) -> None:
    marks().incr("test:events:broken")
    raise RuntimeError("always fails")
