"""
The direct frame path: plain text frames in and out without Autobahn's
per-frame machinery, for open, uncompressed server connections.

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

Why it is here: it reads Autobahn's frame state (C{data}, C{current_frame},
C{inside_message}, C{state}, C{send_queue}, the negotiated options, the
auto-ping timer) to know when it may take over, and calls Autobahn's
C{_dataReceived} for everything else.  L{check} verifies each of them at
import.  Upstream: a public "deliver a complete text message" hook and a
lazy debug log in Autobahn's frame path would remove the need for it.
"""

from __future__ import annotations

import inspect
from typing import Any

from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol

from unrealon._compat import require, unsupported
from unrealon.frames import text_frame, unmask, valid_utf8

_OPEN = WebSocketProtocol.STATE_OPEN

#: FIN set, RSV 0, opcode 1 (text)
_FIN_TEXT = 0x81

#: protocol options the direct path reads (Autobahn's CONFIG_ATTRS)
_OPTIONS = (
    "logFrames", "logOctets", "trackTimings", "autoFragmentSize", "maskServerFrames",
    "applyMask", "maxFramePayloadSize", "maxMessagePayloadSize", "autoPingRestartOnAnyTraffic",
)
#: per-connection state it reads (assigned in Autobahn's protocol code)
_STATE = (
    "_perMessageCompress", "state", "data", "current_frame", "inside_message",
    "autoPingTimeoutCall", "send_queue",
)
_CALLS = ("_cancelAutoPingTimeoutCall", "_dataReceived", "sendMessage", "sendPreparedMessage")


def check() -> None:
    require("autobahn", WebSocketProtocol, _CALLS)
    options = set(WebSocketProtocol.CONFIG_ATTRS_COMMON) | set(
        WebSocketProtocol.CONFIG_ATTRS_SERVER
    )
    missing = [name for name in _OPTIONS if name not in options]
    # state attributes exist only on a connected protocol: check Autobahn still assigns them
    source = inspect.getsource(autobahn_protocol)
    missing += [name for name in _STATE if f"self.{name} = " not in source]
    if missing:
        raise unsupported("autobahn", f"the direct frame path needs {', '.join(missing)}")


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
            if not valid_utf8(payload):
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


check()
