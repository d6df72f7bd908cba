"""
asyncio helpers for the tests of the Python client (unrealon_client): waiting
for a condition on the client's loop, and a scripted server connection that
answers what a client sends first (auth.authenticate, rooms.join).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0,
                   what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def answer_auth_and_joins(
    ws: Any, join_result: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """
    Play the server of one connection (a websockets ServerConnection) until
    it closes: auth.authenticate succeeds as alice, rooms.join is answered
    with C{join_result(params)}, anything else gets no answer.
    """
    from websockets.exceptions import ConnectionClosed

    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            m = json.loads(raw)
            if m["method"] == "auth.authenticate":
                result: Any = {"user_id": "alice", "expires_at": time.time() + 300}
            elif m["method"] == "rooms.join":
                result = join_result(m["params"])
            else:
                continue
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": result}))
