"""
Support for the backend-ingress tests: a producer's Redis connection, its
replies, and test-only backend methods registered as extensions.

Producer side calls go through redis-py (synchronous).  Against a private
redis-server on a Unix socket a single command takes well under a
millisecond, so the short ones run inline in the reactor thread; anything
that blocks (BRPOP, a producer loop that rides out a Redis restart) runs in
a thread with C{deferToThread}.

The extension L{register} adds backend-only methods:

  - C{test.fail}: always fails with an internal error (a poison entry);
  - C{test.forbidden}: always answers -32003;
  - C{test.unavailable}: always finds Redis unreachable (-32011, retried);
  - C{test.slow}: waits on a Deferred the test fires (L{SLOW});
  - C{test.publish_then_exit}: publishes like C{publish}, then -- only in a
    process started with C{UNREALON_TEST_EXIT_AFTER_PUBLISH=1} -- ends the
    process with C{os._exit} before the ingress can reply or acknowledge:
    a node crashing between its publish and its ack.

A node process loads it with C{UNREALON_EXTENSIONS=tests.helpers.ingress_support:register}
(L{tests.helpers.process.NodeProcess} puts the repository on its path).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import attrs
import redis
from twisted.internet.defer import Deferred, inlineCallbacks

from tests.helpers.waiting import wait_until
from unrealon import jsonrpc
from unrealon.backendapi import BackendCall, Published, PublishParams, store_errors
from unrealon.engine.interfaces import BackendUnavailable
from unrealon.jsonrpc import RPCError
from unrealon.rpc import Caller, Registry, param

TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
STREAM = "stream:requests"
GROUP = "rpc_group"
DEAD = "stream:requests:dead"
EXIT_ENV = "UNREALON_TEST_EXIT_AFTER_PUBLISH"


def sync_redis(url: str) -> redis.Redis[str]:
    """A redis-py client of the fixture server, answering str."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)


@inlineCallbacks
def wait_reply(r: redis.Redis[str], key: str, timeout: float = 5.0) -> Any:
    """(reply object, TTL of the list when the reply was there) of the next reply on C{key}."""
    yield wait_until(lambda: r.llen(key), timeout=timeout, what=f"a reply on {key}")
    ttl = r.ttl(key)
    raw = r.rpop(key)
    return json.loads(raw), ttl


def xadd_payload(r: redis.Redis[str], payload: Any, *, id: str = "*",
                 stream: str = STREAM) -> str:
    """XADD one entry whose payload is C{payload} (JSON-encoded unless a str)."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return r.xadd(stream, {"payload": body}, id=id)


def group_info(r: redis.Redis[str], stream: str = STREAM, group: str = GROUP) -> dict[str, Any]:
    for g in r.xinfo_groups(stream):
        if g["name"] == group:
            return dict(g)
    raise AssertionError(f"no group {group} on {stream}")


# -- test-only backend methods -------------------------------------------------------


@attrs.frozen
class AnyParams:
    note: str = param(default="")


@attrs.define
class SlowCalls:
    """The test.slow calls in progress: (entry id, Deferred the test fires)."""

    waiting: list[tuple[str | None, Deferred[Any]]] = attrs.field(factory=list)
    started: int = 0
    #: entry ids in the order their calls started
    order: list[str | None] = attrs.field(factory=list)
    #: the most calls ever waiting at once
    most: int = 0

    def release_all(self, value: Any = None) -> None:
        while self.waiting:
            _, d = self.waiting.pop(0)
            if not d.called:
                d.callback(value)


SLOW = SlowCalls()


def fail(call: BackendCall, params: AnyParams) -> Any:
    """Always an internal error."""
    raise RuntimeError("poison entry: this method always fails")


@store_errors
async def unavailable(call: BackendCall, params: AnyParams) -> Any:
    """The store is unreachable, every time."""
    raise BackendUnavailable("Redis is unavailable")


def forbidden(call: BackendCall, params: AnyParams) -> Any:
    """Always forbidden."""
    raise RPCError(jsonrpc.FORBIDDEN, "not allowed for this producer")


def slow(call: BackendCall, params: AnyParams) -> Deferred[Any]:
    """Waits until the test fires it."""
    d: Deferred[Any] = Deferred()
    SLOW.started += 1
    SLOW.order.append(call.entry_id)
    SLOW.waiting.append((call.entry_id, d))
    SLOW.most = max(SLOW.most, len(SLOW.waiting))
    return d.addCallback(lambda _: {"note": params.note})


async def publish_then_exit(call: BackendCall, params: PublishParams) -> Published:
    """Publish (idempotently, like publish); then die in a crash-test subprocess."""
    cursor = await call.node.broker.publish(
        params.room, params.event, params.data, call.idempotency_key()
    )
    if os.environ.get(EXIT_ENV) == "1":
        os._exit(17)  # no reply, no XACK: the entry stays pending for this consumer
    return Published(room=params.room, cursor=cursor)


def register(registry: Registry) -> None:
    """The UNREALON_EXTENSIONS entry point: add the test-only backend methods."""
    registry.method("test.fail", params=AnyParams, callers=Caller.BACKEND)(fail)
    registry.method("test.forbidden", params=AnyParams, callers=Caller.BACKEND)(forbidden)
    registry.method("test.unavailable", params=AnyParams,
                    callers=Caller.BACKEND)(unavailable)
    registry.method("test.slow", params=AnyParams, callers=Caller.BACKEND)(slow)
    registry.method("test.publish_then_exit", params=PublishParams, result=Published,
                    callers=Caller.BACKEND)(publish_then_exit)
