"""
What a flood costs the node, and what it does to a healthy client (issue 12).

    .venv/bin/python bench/flood.py [--seconds 8] [--messages 50000]

Part 1, in process (the node's real session on an in-memory transport, no
syscalls): CPU per message through the whole receive path (frame, unmask,
UTF-8, JSON, rate guard, dispatch or refusal, reply framing), for a
handled ``system.ping`` and for messages refused by the rate limit (a
request answered -32029, a notification dropped, text that is not JSON).

Part 2, on real sockets: a node process (``twist unrealon-ws``, memory
engine, pinned to CPU 0 when ``taskset`` exists), a healthy client pinging
20 times a second, its round-trip p50/p99 alone and then while another
connection floods the node with garbage at nine times the rate limit (just
under the ten-times rule, so it is refused rather than closed at once),
and the node's CPU per flood message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-flood-secret-0123456789abcdef0123456789"
RATE = 500  # the node's UNREALON_RATE_LIMIT in part 2


# -- part 1: in process -----------------------------------------------------------------


def in_process(messages: int) -> dict[str, float]:
    from twisted.trial.unittest import SynchronousTestCase

    from tests.helpers.node import mint_token
    from tests.helpers.session import SyncSession, build_node, client_frame

    class Holder(SynchronousTestCase):
        def runTest(self) -> None:
            pass

    holder = Holder()
    results: dict[str, float] = {}
    ping = json.dumps({"jsonrpc": "2.0", "id": 12345, "method": "system.ping"}).encode()
    note = json.dumps({"jsonrpc": "2.0", "method": "system.ping"}).encode()
    refresh = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "auth.refresh",
                          "params": {"token": "e30.e30.bad"}}).encode()
    cases = {
        "handled system.ping": (ping, 10**9),
        "handled auth.refresh with a bad token": (refresh, 10**9),
        "refused auth.refresh (-32029)": (refresh, 100),
        "refused request (-32029)": (ping, 100),
        "refused notification (dropped)": (note, 100),
        "refused garbage (not JSON)": (b"definitely { not json", 100),
    }
    for name, (payload, rate) in cases.items():
        service = build_node(holder, rate_limit=rate)
        session = SyncSession(service, mint_token("bench", rooms=["*"]))
        frame = client_frame(payload)
        # The clock stands still (no token comes back), and the guard's two
        # abuse rules are set back every 100 messages (a bench-only poke at
        # its counters), so what is measured is the refusal path itself,
        # not the close.

        _feed(session, frame, 2_000)  # warm up (and spend the burst)
        started = time.process_time()
        _feed(session, frame, messages)
        elapsed = time.process_time() - started
        assert not session.disconnecting, name
        results[name] = 1e6 * elapsed / messages
        session.lose()
    for cleanup in reversed(holder._cleanups):
        cleanup[0](*cleanup[1], **cleanup[2])
    return results


def _feed(session: Any, frame: bytes, count: int) -> None:
    protocol = session.protocol
    for i in range(count):
        protocol.dataReceived(frame)
        if i % 100 == 0:
            session.transport.clear()
            guard = protocol._guard
            if guard is not None:
                guard._limited_since = None
                guard._window = guard._previous = 0


# -- part 2: real sockets ---------------------------------------------------------------


def _frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode]) + (
        bytes([0x80 | n]) if n < 126 else bytes([0xFE]) + struct.pack("!H", n)
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _token(user: str) -> str:
    import jwt

    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, SECRET, "HS256")


async def _open(port: int, user: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
         f"Authorization: Bearer {_token(user)}\r\n\r\n").encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    _, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return await reader.readexactly(n)


async def _pings(port: int, seconds: float) -> list[float]:
    reader, writer = await _open(port, "healthy")
    rtts = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        t0 = time.perf_counter()
        writer.write(_frame(json.dumps({"jsonrpc": "2.0", "id": i,
                                        "method": "system.ping"}).encode()))
        reply = json.loads(await _read_frame(reader))
        assert reply.get("id") == i and "result" in reply, reply
        rtts.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    writer.close()
    return rtts


async def _flood(port: int, seconds: float, per_second: int) -> int:
    reader, writer = await _open(port, "flooder")
    garbage = _frame(b"definitely { not json")
    sent = 0
    deadline = time.monotonic() + seconds
    tick = 0.01
    drain = asyncio.ensure_future(reader.read(-1))  # read (and drop) the refusals
    while time.monotonic() < deadline:
        writer.write(garbage * (per_second // 100))
        sent += per_second // 100
        await asyncio.sleep(tick)
    writer.close()
    drain.cancel()
    return sent


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def real_sockets(seconds: float) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp()
    env = {**os.environ, "JWT_SECRET": SECRET, "UNREALON_RATE_LIMIT": str(RATE),
           "UNREALON_LOG_LEVEL": "warn"}
    argv = [str(ROOT / ".venv/bin/twist"), "unrealon-ws",
            "--ws", f"tcp:{port}:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1"]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0", *argv]
    node = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.1)

        async def run() -> dict[str, Any]:
            alone = await _pings(port, seconds)
            cpu0 = _cpu(node.pid)
            pings, sent = await asyncio.gather(_pings(port, seconds),
                                               _flood(port, seconds, 9 * RATE))
            cpu = _cpu(node.pid) - cpu0
            return {"alone": alone, "flooded": pings, "flood_sent": sent, "cpu_s": cpu}

        result = asyncio.run(run())
    finally:
        node.terminate()
        node.wait(15)
        shutil.rmtree(work, ignore_errors=True)
    return result


def ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--messages", type=int, default=50_000)
    args = parser.parse_args()
    print("## CPU per message, in process (us)\n")
    costs = in_process(args.messages)
    handled = costs["handled system.ping"]
    for name, us in costs.items():
        print(f"- {name}: {us:.2f} us ({us / handled:.0%} of a handled call)")
    print(f"\n## Healthy client next to a flood of {9 * RATE} garbage messages/s "
          f"(limit {RATE}/s), {args.seconds:.0f} s\n")
    result = real_sockets(args.seconds)
    alone, flooded = result["alone"], result["flooded"]
    print(f"- ping alone: p50 {ms(alone, 0.5)} ms, p99 {ms(alone, 0.99)} ms ({len(alone)} pings)")
    print(f"- ping during the flood: p50 {ms(flooded, 0.5)} ms, p99 {ms(flooded, 0.99)} ms "
          f"({len(flooded)} pings, every one answered)")
    print(f"- flood: {result['flood_sent']} messages sent; node CPU {result['cpu_s']:.2f} s "
          f"= {1e6 * result['cpu_s'] / max(1, result['flood_sent']):.1f} us per flood message "
          f"(syscalls and the healthy client's pings included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
