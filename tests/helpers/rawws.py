"""
A raw WebSocket client over a real TCP connection, for tests that need to
see bytes and TCP endings no WebSocket library shows: invalid close frames,
the server's close frame followed by FIN or by a reset, floods of frames.

L{open_raw} does the opening handshake and fires with a L{RawWebSocket};
L{RawWebSocket.send} writes any frame (built by
L{tests.helpers.session.client_frame}, so it can be invalid on purpose);
L{RawWebSocket.frames} are the server's frames parsed so far, and
L{RawWebSocket.ended} fires with C{"fin"} or C{"reset"} when the TCP
connection ends.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from tests.helpers.session import OP_CLOSE, OP_TEXT, Frame, client_frame, parse_server_frames


class RawWebSocket(Protocol):
    """One connection: the handshake answer, then server frames as they come."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = b""
        self.head: bytes | None = None
        #: the body of a refused handshake (grows until the server closes)
        self.body = b""
        self.frames: list[Frame] = []
        #: fires with the response head once it is complete
        self.answered: Deferred[bytes] = Deferred()
        #: fires with "fin" or "reset" when the TCP connection ends
        self.ended: Deferred[str] = Deferred()
        self._waiters: list[tuple[Any, Deferred[None]]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.head is not None and not self.upgraded:
            self.body += data
            return
        self._buffer += data
        if self.head is None:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self._buffer = head, rest
            if not self.upgraded:
                self.body, self._buffer = self._buffer, b""
            self.answered.callback(self.head)
            if not self.upgraded:
                return
        complete = _complete_prefix(self._buffer)
        if complete:
            self.frames.extend(parse_server_frames(self._buffer[:complete]))
            self._buffer = self._buffer[complete:]
            self._wake()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.answered.called:
            self.answered.errback(reason)
        self.ended.callback("fin" if reason.check(ConnectionDone) else "reset")
        self._wake()

    # -- use ------------------------------------------------------------------

    @property
    def upgraded(self) -> bool:
        return self.head is not None and self.head.startswith(b"HTTP/1.1 101")

    def header(self, name: str) -> str | None:
        """A response header's value (the first one), or None."""
        assert self.head is not None
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def send(self, payload: bytes | str, opcode: int = OP_TEXT, *, fin: bool = True) -> None:
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        self.send_bytes(client_frame(data, opcode, fin=fin))

    def send_bytes(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self, payload: bytes) -> None:
        """Send a close frame with exactly this payload (code and reason, or anything)."""
        self.send(payload, OP_CLOSE)

    def texts(self) -> list[bytes]:
        return [f.payload for f in self.frames if f.opcode == OP_TEXT]

    def close_frames(self) -> list[Frame]:
        return [f for f in self.frames if f.opcode == OP_CLOSE]

    def wait_for(self, condition: Any, timeout: float = 5.0) -> Deferred[None]:
        """Fires once C{condition()} holds (checked as frames arrive), or fails after C{timeout}."""
        d: Deferred[None] = Deferred()
        if condition():
            d.callback(None)
            return d
        self._waiters.append((condition, d))
        d.addTimeout(timeout, reactor)
        return d

    def _wake(self) -> None:
        waiting, self._waiters = self._waiters, []
        for condition, d in waiting:
            if d.called:
                continue
            if condition() or self.ended.called:
                d.callback(None)
            else:
                self._waiters.append((condition, d))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def _complete_prefix(data: bytes) -> int:
    """How many bytes at the start of C{data} are whole server frames."""
    i = 0
    while len(data) - i >= 2:
        n = data[i + 1] & 0x7F
        head = 2
        if n == 126:
            if len(data) - i < 4:
                break
            n = int.from_bytes(data[i + 2 : i + 4], "big")
            head = 4
        elif n == 127:
            if len(data) - i < 10:
                break
            n = int.from_bytes(data[i + 2 : i + 10], "big")
            head = 10
        if len(data) - i < head + n:
            break
        i += head + n
    return i


def handshake_request(token: str | None = None, headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def open_raw(
    port: int, token: str | None = None, headers: dict[str, str] | None = None
) -> RawWebSocket:
    """Connect and send the handshake; returns once the server answered (101 or not)."""
    proto = RawWebSocket(handshake_request(token, headers))
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await connectProtocol(endpoint, proto)
    answered = proto.answered
    answered.addTimeout(5, reactor)
    await answered
    return proto
