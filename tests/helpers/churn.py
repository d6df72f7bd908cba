"""
``python -m tests.helpers.churn PORT TOTAL CONCURRENCY SECRET``: open and end
TOTAL WebSocket connections to a node, CONCURRENCY at a time, every way a
connection can end, and print one JSON line of counts.

A separate process with plain asyncio sockets, so the client side of a
10,000-connection churn costs the test's reactor nothing and runs on the
other core.  The ways, by connection number modulo 5: a clean close
handshake; a ping answered, then a reset; a reset right after the upgrade;
a binary message (the server closes with 1003); no token and no message
(the server's authentication timeout closes it with 4001).  Each
connection is its own user (tokens signed with SECRET), so the per-user
cap does not apply.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import sys
import time
from collections import Counter

import jwt


def _frame(payload: bytes, opcode: int) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _request(token: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{auth}\r\n"
    ).encode()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _one(port: int, i: int, secret: str, outcomes: Counter[str]) -> None:
    way = i % 5
    token = None
    if way != 4:
        token = jwt.encode({"sub": f"u{i}", "exp": int(time.time()) + 300}, secret, "HS256")
    # Many source addresses (all loopback): with one, 10,000 connections in
    # seconds reuse ephemeral ports whose old connection the server still
    # holds in TIME_WAIT, and the kernel resets the new one.
    source = (f"127.0.{1 + i // 250 % 250}.{1 + i % 250}", 0)
    stage = "connect"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=source)
    except OSError as e:
        outcomes[f"error:connect:{type(e).__name__}"] += 1
        return
    try:
        stage = "handshake"
        writer.write(_request(token))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        stage = "action"
        if not head.startswith(b"HTTP/1.1 101"):
            outcomes["refused:" + head.split(b"\r\n")[0].decode()] += 1
            return
        if way == 0:
            writer.write(_frame(struct.pack("!H", 1000), 0x8))
            await asyncio.wait_for(reader.read(), 10)  # the server's close, then FIN
        elif way == 1:
            writer.write(_frame(b'{"jsonrpc":"2.0","id":1,"method":"system.ping"}', 0x1))
            await asyncio.wait_for(reader.readexactly(2), 10)
            _reset(writer)
        elif way == 2:
            _reset(writer)
        elif way == 3:
            writer.write(_frame(b"\x00", 0x2))
            await asyncio.wait_for(reader.readexactly(4), 10)  # close 1003
            writer.write(_frame(struct.pack("!H", 1003), 0x8))
            await asyncio.wait_for(reader.read(), 10)
        else:
            close = await asyncio.wait_for(reader.readexactly(4), 10)  # 4001 ...
            writer.write(_frame(close[2:4], 0x8))
            await asyncio.wait_for(reader.read(), 10)
        outcomes[f"way{way}"] += 1
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
        outcomes[f"error:way{way}:{stage}:{type(e).__name__}"] += 1
    finally:
        if not writer.is_closing():
            writer.close()


async def churn(port: int, total: int, concurrency: int, secret: str) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    limit = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with limit:
            await _one(port, i, secret, outcomes)

    await asyncio.gather(*(bounded(i) for i in range(total)))
    return outcomes


def main(argv: list[str]) -> int:
    port, total, concurrency, secret = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    outcomes = asyncio.run(churn(port, total, concurrency, secret))
    print(json.dumps(dict(outcomes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
