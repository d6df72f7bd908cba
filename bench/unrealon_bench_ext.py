"""Benchmark-only extension for unrealon-ws: a client-callable ``bench.publish``.

The memory engine has no backend ingress, so a benchmark client needs another
way to publish to a room. The harness starts the memory-engine server with
``UNREALON_EXTENSIONS=unrealon_bench_ext:register`` (and ``bench/`` on
``PYTHONPATH``); nothing else ever loads this module. It goes through the
same broker call as the backend ``publish`` method (PROTOCOL.md section 6),
so the delivery path measured is the real one; only the entry point differs.

``bench.publish {room, event, data}`` -> ``{room, cursor}``, the same call the
peers implement. Set ``BENCH_UNREALON_PUBLISH_METHOD`` for the harness to use
another method instead (e.g. one the server itself exposes).
"""

from __future__ import annotations

from typing import Any


def register(registry: Any) -> None:
    """Add ``bench.publish`` for clients (UNREALON_EXTENSIONS entry point)."""
    from unrealon.backendapi import Published, PublishParams

    async def bench_publish(call: Any, params: PublishParams) -> Published:
        """Benchmark only: publish an event to a room from a client connection."""
        cursor = await call.node.broker.publish(params.room, params.event, params.data)
        return Published(room=params.room, cursor=cursor)

    registry.method("bench.publish", params=PublishParams, result=Published)(bench_publish)
