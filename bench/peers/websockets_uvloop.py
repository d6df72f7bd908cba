"""Minimal ``websockets`` + uvloop peer with the benchmark's JSON-RPC subset.

The "best configuration" of the most used Python WebSocket library: uvloop,
``max_queue=None`` (as websockets' author asks for throughput tests),
compression off, no keepalive pings, backlog 1024, and
``websockets.broadcast()`` for fan-out (frames once per connection, no
backpressure, never awaits).

With ``--redis-url`` it also reads the backend ingress the way our server
does (PROTOCOL.md section 6: XREADGROUP on ``stream:requests``, group
``rpc_group``, field ``payload``) and handles ``publish`` and
``session.message``; that variant is the like-for-like baseline for the
XADD -> client path.

Usage: python bench/peers/websockets_uvloop.py --port 9002 [--redis-url unix:///tmp/r.sock?db=0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minirpc import Hub


def _broadcast(members: set[Any], payload: str) -> None:
    broadcast(members, payload)


HUB = Hub(_broadcast)


async def handler(ws: ServerConnection) -> None:
    """Serve one connection until it closes."""
    handle = HUB.handle
    try:
        async for message in ws:
            reply = handle(ws, message)
            if reply is not None:
                await ws.send(reply)
    except ConnectionClosed:
        pass
    finally:
        HUB.drop(ws)


def _ingress_entry(payload: bytes) -> None:
    """Turn one backend entry into a room event (subset of PROTOCOL.md section 6)."""
    try:
        msg: Any = json.loads(payload)
        method = msg["method"]
        params = msg.get("params") or {}
        if method == "publish":
            HUB.publish(params["room"], params["event"], params.get("data", {}))
        elif method == "session.message":
            HUB.publish(f"session:{params['session_id']}", method, params)
    except (ValueError, KeyError, TypeError):
        logging.warning("bad ingress entry dropped")


async def ingress(redis_url: str, stream: str, group: str, consumer: str) -> None:
    """Consume the ingress stream; ack each batch after it was handled."""
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    r = aioredis.from_url(redis_url)
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:  # BUSYGROUP: already there
        if "BUSYGROUP" not in str(exc):
            raise
    while True:
        resp = await r.xreadgroup(group, consumer, {stream: ">"}, count=100, block=1000)
        for _name, entries in resp or ():
            ids = []
            for entry_id, fields in entries:
                payload = fields.get(b"payload")
                if payload is not None:
                    _ingress_entry(payload)
                ids.append(entry_id)
            if ids:
                await r.xack(stream, group, *ids)


async def amain(port: int, host: str, redis_url: str | None) -> None:
    """Listen (and optionally consume the ingress) until cancelled."""
    async with serve(handler, host, port, compression=None, max_queue=None,
                     ping_interval=None, backlog=1024, open_timeout=10):
        if redis_url:
            await ingress(redis_url, "stream:requests", "rpc_group", f"peer-{port}")
        else:
            await asyncio.Future()


def main() -> None:
    """Parse flags and run on uvloop."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(amain(args.port, args.host, args.redis_url))


if __name__ == "__main__":
    main()
