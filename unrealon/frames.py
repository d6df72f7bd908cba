"""
Direct data-frame I/O for open, uncompressed server connections.

Autobahn's frame machinery is general (fragmentation, chopped and sync
sends, compression, frame logging, traffic statistics) and it costs most of
a small call's server time: for every frame it builds a C{FrameHeader} and a
cffi XOR masker, joins fragment lists, and formats a debug log line eagerly
(C{hltype}/C{hlval}) on every read and every write, logged or not.

The common case is much narrower: one complete, masked, unfragmented text
frame per read, answered with one unfragmented text frame.  L{DirectFrames}
handles exactly that case and hands everything else to Autobahn unchanged:
a partial frame, a fragmented message, every control frame (ping, pong,
close), RSV bits, an unmasked client frame, a frame over the size limits,
invalid UTF-8, a connection that is not open, and any connection with
compression, frame or octet logging, timing or server-side masking on.
The direct path reads Autobahn's state but never writes it, and only
consumes whole frames while Autobahn holds no partial input, so the two
paths may alternate at any frame boundary and every error (1002, 1007,
1009) is still Autobahn's own.
"""

from __future__ import annotations

import struct
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]

_OPEN = WebSocketProtocol.STATE_OPEN

#: FIN set, RSV 0, opcode 1 (text)
_FIN_TEXT = 0x81
_SHORT_TEXT_HEADERS = tuple(bytes((_FIN_TEXT, n)) for n in range(126))
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")

#: Below this many bytes XOR through one Python integer beats a cffi masker
#: (measured: 0.7 us against 3 us at 200 bytes; they cross near 1.5 KiB).
_INT_UNMASK_MAX = 1024


def unmask(payload: bytes, mask: bytes) -> bytes:
    """C{payload} XOR the repeating 4-byte C{mask} (RFC 6455 section 5.3)."""
    n = len(payload)
    if n > _INT_UNMASK_MAX:
        return bytes(create_xor_masker(mask, n).process(payload))
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented server-to-client text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return _SHORT_TEXT_HEADERS[n] + payload
    if n < 0x10000:
        return _HEADER_16.pack(_FIN_TEXT, 126, n) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, n) + payload


def _valid_utf8(payload: bytes) -> bool:
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class DirectFrames:
    """
    Mixin for an Autobahn C{WebSocketServerProtocol} subclass (list it first).

    Call L{enable_direct_frames} from C{onOpen}, when the negotiated options
    are known; until then, and whenever a condition above fails, Autobahn
    does all the work.  C{send_text} replaces C{sendMessage(payload)} and
    C{write_prepared} replaces C{sendPreparedMessage(prepared)}.  (The
    methods see C{self} as C{Any}: the attributes they read are Autobahn's,
    which a mixin cannot declare without clashing with Autobahn's own.)
    """

    _direct = False
    _direct_limit = 0

    def enable_direct_frames(self) -> None:
        """Take the direct path from now on, if this connection's options allow it."""
        ws: Any = self
        self._direct = (
            ws._perMessageCompress is None
            and not ws.logFrames
            and not ws.logOctets
            and not ws.trackTimings
            and not ws.autoFragmentSize
            and not ws.maskServerFrames
            and ws.applyMask
        )
        limits = [size for size in (ws.maxFramePayloadSize, ws.maxMessagePayloadSize) if size > 0]
        self._direct_limit = min(limits) if limits else 2**63 - 1

    # -- receiving --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Autobahn's C{dataReceived} minus its eager debug line, plus the direct path."""
        ws: Any = self
        if (
            self._direct
            and ws.state == _OPEN
            and not ws.data
            and ws.current_frame is None
            and not ws.inside_message
        ):
            taken = self._take_text_frames(data)
            if taken == len(data):
                return
            data = data[taken:]
        ws._dataReceived(data)

    def _take_text_frames(self, data: bytes) -> int:
        """
        Deliver the complete plain text frames at the start of C{data}; the
        number of bytes they took.  Stops before the first frame this path
        does not handle, which Autobahn then reads from its first byte.
        """
        ws: Any = self
        pos, end, limit = 0, len(data), self._direct_limit
        while end - pos >= 6 and ws.state == _OPEN:
            b1 = data[pos + 1]
            if data[pos] != _FIN_TEXT or not b1 & 0x80:
                break
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                length = int.from_bytes(data[head : head + 2], "big")
                head += 2
                if length < 126:
                    break  # not the minimal encoding: Autobahn's 1002
            elif length == 127:
                length = int.from_bytes(data[head : head + 8], "big")
                head += 8
                if length < 0x10000 or length > 0x7FFFFFFFFFFFFFFF:
                    break
            start = head + 4
            stop = start + length
            if length > limit or stop > end:
                break  # over a limit (Autobahn's 1009) or not all here yet
            payload = unmask(data[start:stop], data[head:start])
            if not _valid_utf8(payload):
                break  # Autobahn's 1007
            pos = stop
            if ws.autoPingTimeoutCall and ws.autoPingRestartOnAnyTraffic:
                # as Autobahn's onFrameEnd: any traffic proves the peer alive
                ws._cancelAutoPingTimeoutCall()
            ws.onMessage(payload, False)
        return pos

    # -- sending ----------------------------------------------------------------

    def queue_frame(self, frame: bytes) -> None:
        """Write one complete frame; the session overrides this to coalesce writes."""
        ws: Any = self
        ws.transport.write(frame)

    def send_text(self, payload: bytes) -> None:
        """Send one text message: a single frame, written by L{queue_frame}."""
        ws: Any = self
        if self._direct and ws.state == _OPEN and not ws.send_queue:
            self.queue_frame(text_frame(payload))
        else:
            ws.sendMessage(payload, isBinary=False)

    def write_prepared(self, prepared: Any) -> None:
        """Send a message framed once by C{factory.prepareMessage} (fan-out)."""
        ws: Any = self
        if self._direct and ws.state == _OPEN and not ws.send_queue:
            self.queue_frame(prepared.payloadHybi)
        else:
            ws.sendPreparedMessage(prepared)
