"""
A WebSocket session driven synchronously, with no network and no real time.

L{SyncSession} builds the node's real L{unrealon.ws.RPCSession} from its real
factory, attaches it to an in-memory transport, performs the opening
handshake and then feeds it client frames byte for byte, exactly as a socket
would.  The node's reactor is a L{Clock} (so the rate limit, auth timeout
and token expiry are driven by the test), and txaio's loop points at the
same clock while the session lives, so Autobahn's own timers (handshake,
ping, close timeouts) never touch the global reactor either.  This is what
makes hypothesis tests over the whole session possible (they must be
synchronous) and what lets a test cross "10 s over the rate limit" in no
time at all.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any

import attrs
import txaio
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers.node import test_config
from unrealon.service import Extension, NodeService, makeService
from unrealon.ws import RPCSession

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class FakeTransport(StringTransport):
    """
    A StringTransport Autobahn can live on: it unregisters producers and
    sets TCP_NODELAY, and closing it is only recorded (the harness delivers
    connectionLost itself).
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def abortConnection(self) -> None:
        self.loseConnection()


def client_frame(
    payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One masked client-to-server frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4) if mask is None else mask
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 2**16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


@attrs.frozen
class Frame:
    """One server-to-client frame."""

    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    def json(self) -> Any:
        assert self.opcode == OP_TEXT, self
        return json.loads(self.payload)


def parse_server_frames(data: bytes) -> list[Frame]:
    """Split what the server wrote into frames (server frames are unmasked)."""
    frames = []
    i = 0
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        i += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        frames.append(Frame(b0 & 0x0F, data[i : i + n]))
        i += n
    return frames


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


def build_node(
    testcase: SynchronousTestCase,
    extensions: tuple[Extension, ...] = (),
    **overrides: Any,
) -> NodeService:
    """
    A node whose reactor is a L{Clock} set to the wall clock (so freshly
    minted tokens are valid), not started: sessions need no listener.  txaio
    uses the same clock until the test ends.
    """
    clock = Clock()
    clock.advance(time.time())
    previous = txaio.config.loop
    txaio.config.loop = clock
    testcase.addCleanup(setattr, txaio.config, "loop", previous)
    overrides.setdefault("ping_interval", 3600)
    return makeService(test_config(**overrides), clock, extensions)


class SyncSession:
    """One connection to C{service}'s factory over a L{FakeTransport}."""

    def __init__(self, service: NodeService, token: str | None = None) -> None:
        self.service = service
        self.clock: Clock = service.node.reactor
        self.transport = FakeTransport()
        protocol = service.factory.buildProtocol(None)
        assert isinstance(protocol, RPCSession)
        self.protocol = protocol
        self.lost = False
        protocol.makeConnection(self.transport)
        request = HANDSHAKE
        if token is not None:
            request += b"Authorization: Bearer " + token.encode() + b"\r\n"
        protocol.dataReceived(request + b"\r\n")
        response = self.transport.value()
        self.transport.clear()
        head, _, rest = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert rest == b"", rest

    def feed(self, data: bytes) -> list[Frame]:
        """Deliver raw bytes; return the frames the server wrote in answer."""
        self.protocol.dataReceived(data)
        return self.take()

    def send(self, payload: bytes | str, opcode: int = OP_TEXT) -> list[Frame]:
        """Send one message in one frame; return the server's frames."""
        data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        return self.feed(client_frame(data, opcode))

    def call(self, message: Any) -> list[Any]:
        """Send one JSON message; return the decoded text replies."""
        return [f.json() for f in self.send(json.dumps(message)) if f.opcode == OP_TEXT]

    def take(self) -> list[Frame]:
        # the node writes what a turn produced at the end of the turn
        self.clock.advance(0)
        data = self.transport.value()
        self.transport.clear()
        return parse_server_frames(data)

    @property
    def disconnecting(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """The TCP connection ends (as after a close, or a drop)."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
