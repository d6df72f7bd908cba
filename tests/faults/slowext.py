"""
A test-only extension for node processes in the fault suite
(C{UNREALON_EXTENSIONS=tests.faults.slowext:register}).

C{test.slow_publish {room, event, data, delay_ms}} is a backend method
(called through the ingress stream) that waits C{delay_ms} before it
publishes, like any catalogue event, with the entry's idempotency key: it
keeps entries pending long enough for a test to kill or stop the node that
read them.
"""

from __future__ import annotations

import attrs
from twisted.internet import reactor
from twisted.internet.task import deferLater

from unrealon.backendapi import BackendCall, Published, PublishParams
from unrealon.rpc import Caller, Registry, param


@attrs.frozen
class SlowPublishParams(PublishParams):
    """The backend's publish params, and how long to wait first."""

    delay_ms: int = param(default=0, minimum=0)


async def slow_publish(call: BackendCall, p: SlowPublishParams) -> Published:
    await deferLater(reactor, p.delay_ms / 1000, lambda: None)  # type: ignore[arg-type]
    cursor = await call.node.broker.publish(p.room, p.event, p.data, call.idempotency_key())
    return Published(room=p.room, cursor=cursor)


def register(registry: Registry) -> None:
    registry.method("test.slow_publish", params=SlowPublishParams, result=Published,
                    callers=Caller.BACKEND)(slow_publish)
