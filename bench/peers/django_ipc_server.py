"""django-ipc 1.0.9 server with its defaults made fair (benchmarking notes 5.3(c)).

Runs in bench/.venv-peers (see bench/setup_peers.sh), never in the main venv.
django-ipc speaks its own envelope, not JSON-RPC 2.0; the load client has a
"django-ipc" dialect for it:

- the first frame is ``Bearer <token>`` (here ``auth_mode="none"``, any token),
  answered by ``{"type": "auth", "status": "ok"}``;
- calls are ``{"type": "rpc", "method", "params", "correlation_id"}``;
  ``system.ping`` is the echo, ``join_room {room}`` joins,
  ``broadcast {target: "room", room, title, message}`` publishes (the message
  is a string of at most 1000 characters: the client puts its JSON there);
- room events arrive as ``{"type": "broadcast", "data": "<message>"}``;
- the backend ingress is the same Redis stream (``stream:requests``, group
  ``rpc_group``, field ``payload``), so XADD of ``broadcast`` works too.

What is changed from the shipped defaults, and why (fairness):
- host 127.0.0.1 (default 0.0.0.0); health HTTP server off (default on :8766);
- permessage-deflate off (default on): every server runs uncompressed;
- keepalive ping at its maximum, 300 s (it cannot be turned off; minimum 5 s),
  so no ping falls inside a run;
- loguru and the per-RPC file logger at WARNING (default INFO, which writes
  one JSON line per RPC to ./logs);
- listen backlog 1024 and ``max_queue=None`` like the other peers (``serve``
  is wrapped: its config has no such options; defaults 100 and 32).
Not changed: pydantic validation per message, sequential ``await send`` per
room member, the default asyncio loop (no uvloop), stdlib json.

Usage: python bench/peers/django_ipc_server.py --port 9003 --redis-url redis://127.0.0.1:6390/0
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile

from loguru import logger


def main() -> None:
    """Configure and run django-ipc's WebSocketServer."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--redis-url", required=True, help="redis://host:port/db (no unix sockets)")
    args = ap.parse_args()

    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    import django_ipc.server.websocket_server as wss
    from django_ipc.logger import LoggerConfig, RPCLogger
    from django_ipc.server.config import AuthMode, HandlerConfig, ServerConfig, WSServerConfig

    wss.serve = functools.partial(wss.serve, backlog=1024, max_queue=None)
    wss.display_startup_banner = lambda: None  # rich banner on stdout: noise only
    wss.check_version = lambda silent=False: True  # purely local, but prints a panel

    # One fixed directory: the process is killed, so it could never clean up
    # a fresh one (and at WARNING its files stay empty).
    log_dir = os.path.join(tempfile.gettempdir(), "bench-django-ipc-logs")
    os.makedirs(log_dir, exist_ok=True)
    rpc_logger = RPCLogger(LoggerConfig(log_dir=log_dir, level="WARNING", log_rpc_calls=False,
                                        log_performance=False, log_connections=False),
                           name="message_router")
    config = ServerConfig(
        server=WSServerConfig(
            host=args.host, port=args.port, redis_url=args.redis_url,
            auth_mode=AuthMode.NONE, enable_compression=False,
            enable_health_endpoint=False, ping_interval=300, ping_timeout=60,
            log_level="WARNING", log_connections=False, max_connections=100000,
        ),
        handlers=HandlerConfig(),
    )
    server = wss.WebSocketServer(config, rpc_logger=rpc_logger)
    asyncio.run(server.start())


if __name__ == "__main__":
    main()
