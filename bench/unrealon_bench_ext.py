"""Benchmark-only extension for unrealon-ws: a client-callable ``bench.publish``.

The memory engine has no backend ingress, so a benchmark client needs another
way to publish to a room. The harness starts the memory-engine server with
``UNREALON_EXTENSIONS=unrealon_bench_ext:register`` (and ``bench/`` on
``PYTHONPATH``); nothing else ever loads this module. It goes through the
same broker calls as the backend methods (PROTOCOL.md section 6), so the
delivery path measured is the real one; only the entry point differs:
``broker.publish`` like the backend ``publish``, and for a ``session.message``
whose data has ``seq`` (a chunk of a streamed message, section 5.1)
``broker.append_chunk`` like the catalogue's ``session.message``.

``bench.publish {room, event, data}`` -> ``{room, cursor}``, the same call the
peers implement. Set ``BENCH_UNREALON_PUBLISH_METHOD`` for the harness to use
another method instead (e.g. one the server itself exposes).
"""

from __future__ import annotations

from typing import Any

STREAMED_EVENT = "session.message"


def register(registry: Any) -> None:
    """Add ``bench.publish`` for clients (UNREALON_EXTENSIONS entry point)."""
    from unrealon.backendapi import Published, PublishParams
    from unrealon.engine.interfaces import MessageChunk

    async def bench_publish(call: Any, params: PublishParams) -> Published:
        """Benchmark only: publish an event (or a streamed chunk) to a room from a client."""
        data = params.data
        if params.event == STREAMED_EVENT and data.get("seq") is not None:
            error = data.get("error")
            chunk = MessageChunk(
                message_id=str(data["message_id"]), seq=int(data["seq"]),
                content=str(data.get("content", "")), done=bool(data.get("done")),
                error=None if error is None else str(error), fields=data)
            cursor = await call.node.broker.append_chunk(params.room, params.event, chunk)
        else:
            cursor = await call.node.broker.publish(params.room, params.event, params.data)
        return Published(room=params.room, cursor=cursor)

    registry.method("bench.publish", params=PublishParams, result=Published)(bench_publish)
