"""picows connection wrapper used by every load-client role.

One :class:`Client` per WebSocket. Incoming messages go to ``self.on_msg``,
an attribute that roles swap for their hot path once setup (auth, join) is
done; during setup it resolves the waiter of :meth:`Client.call`. picows
delivers frames, not messages, so continuation frames are reassembled here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

from dialects import Dialect
from picows import WSCloseCode, WSListener, WSMsgType, WSTransport, ws_connect

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY
CONT = WSMsgType.CONTINUATION
CLOSE = WSMsgType.CLOSE


class Client(WSListener):
    """One connection: setup-time request/reply plus a swappable hot path."""

    def __init__(self, dialect: Dialect, tag: int = 0) -> None:
        super().__init__()
        self.dialect = dialect
        self.tag = tag
        self.transport: WSTransport | None = None
        self.on_msg: Callable[[bytes], None] = self._setup_msg
        self.waiter: asyncio.Future[bytes] | None = None
        self.early: list[bytes] = []  # events that arrived during setup
        self.frags: list[bytes] | None = None
        self.closed = False
        self.close_code: int | None = None
        self.state: Any = None  # role-specific per-connection state
        self.t_start = 0  # perf_counter_ns() when connect_many began this connection

    # picows callbacks -------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        t = frame.msg_type
        if t is TEXT or t is BINARY:
            if frame.fin:
                self.on_msg(frame.get_payload_as_bytes())
            else:
                self.frags = [frame.get_payload_as_bytes()]
        elif t is CONT:
            if self.frags is not None:
                self.frags.append(frame.get_payload_as_bytes())
                if frame.fin:
                    payload = b"".join(self.frags)
                    self.frags = None
                    self.on_msg(payload)
        elif t is CLOSE:
            try:
                self.close_code = int(frame.get_close_code())
            except (TypeError, ValueError):
                self.close_code = -1
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError(f"closed (code {self.close_code})"))

    # setup-time helpers -----------------------------------------------------
    def _setup_msg(self, payload: bytes) -> None:
        w = self.waiter
        if w is not None and not w.done() and not self.dialect.is_event(payload):
            w.set_result(payload)
        else:
            self.early.append(payload)

    def send(self, data: bytes) -> None:
        """Send one text message (no-op once closed)."""
        if not self.closed and self.transport is not None:
            self.transport.send(TEXT, data)

    async def call(self, data: bytes, timeout: float = 10.0) -> bytes:
        """Send a request and wait for the next non-event message (setup only)."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.send(data)
        try:
            return await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (network loss)."""
        if self.transport is not None and not self.closed:
            self.transport.disconnect(graceful=False)

    def close(self) -> None:
        """Polite close; the server sees 1000."""
        if self.transport is not None and not self.closed:
            try:
                self.transport.send_close(WSCloseCode.OK)  # default would be 0: invalid
                self.transport.disconnect()
            except Exception:  # already gone: nothing to clean up
                pass


async def connect(url: str, dialect: Dialect, tag: int = 0,
                  factory: Callable[[], Client] | None = None,
                  timeout: float = 10.0) -> Client:
    """Open one connection and complete the dialect's auth step."""
    make = factory or (lambda: Client(dialect, tag))
    _transport, listener = await asyncio.wait_for(
        ws_connect(make, url, enable_auto_ping=False, websocket_handshake_timeout=timeout),
        timeout)
    client = cast(Client, listener)
    if dialect.auth_frame is not None:
        reply = await client.call(dialect.auth_frame, timeout)
        if not dialect.check_auth(reply):
            client.close()
            raise ConnectionError(f"auth refused: {reply[:120]!r}")
    return client


def failure_kind(exc: BaseException) -> str:
    """Short label for a failed connect, for the report."""
    name = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status", None)
    return f"{name}:{int(status)}" if status is not None else name


async def connect_many(n: int, concurrency: int, url: str, dialect: Dialect,
                       factory: Callable[[int], Client] | None = None,
                       after: Callable[[Client], Any] | None = None,
                       deadline_s: float = 120.0) -> tuple[list[Client], dict[str, int], float]:
    """Open ``n`` connections, at most ``concurrency`` in flight, within a deadline.

    ``after`` (sync or async) runs on each connection right after it opened
    (e.g. rooms.join). Returns (clients, failures by kind, elapsed seconds).
    """
    clients: list[Client] = []
    failures: dict[str, int] = {}
    counter = iter(range(n))
    t0 = time.monotonic()
    stop_at = t0 + deadline_s

    async def worker() -> None:
        for i in counter:
            if time.monotonic() > stop_at:
                failures["deadline"] = failures.get("deadline", 0) + 1
                continue
            try:
                fac = (lambda i=i: factory(i)) if factory else None
                t_start = time.perf_counter_ns()
                c = await connect(url, dialect, i, fac)
                c.t_start = t_start
                if after is not None:
                    r = after(c)
                    if asyncio.iscoroutine(r):
                        await r
                clients.append(c)
            except Exception as exc:  # counted and reported, never fatal
                k = failure_kind(exc)
                failures[k] = failures.get(k, 0) + 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    return clients, failures, time.monotonic() - t0


async def close_all(clients: list[Client], grace_s: float = 2.0) -> None:
    """Close politely, then give the loop a moment to flush close frames."""
    for c in clients:
        c.close()
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(not c.closed for c in clients):
        await asyncio.sleep(0.05)
