"""
The direct frame path (L{unrealon.frames}) against Autobahn's own.

The codec functions are checked against the RFC's definitions.  The session
tests are differential: the same client byte stream, cut into reads at
arbitrary points, goes to one session on the direct path and to one that
leaves every frame to Autobahn; the bytes each writes back (replies, pongs,
close frames with their codes) and whether each hangs up must be identical.
The streams mix what the direct path takes (complete masked text frames,
several per read, short and 16- and 64-bit lengths, both unmasking methods)
with everything it must hand over: partial frames, fragmented messages,
control frames, binary and reserved opcodes, RSV bits, unmasked frames,
non-minimal lengths, oversized frames and invalid UTF-8.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers.node import mint_token
from tests.helpers.session import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    SyncSession,
    build_node,
    client_frame,
    parse_server_frames,
)
from unrealon.frames import text_frame, unmask
from unrealon.service import NodeService

PROFILE = settings(max_examples=200)  # on top of the suite's profile (tests/__init__.py)

#: small enough that hypothesis reaches it, large enough for the 16-bit length
MAX_MESSAGE = 3000


def reference_unmask(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class CodecTests(SynchronousTestCase):
    def test_unmask_matches_the_rfc_on_both_sides_of_the_method_switch(self) -> None:
        """RFC 6455 5.3: octet i XOR mask octet i mod 4, whatever the length."""
        mask = b"\x01\x80\xfe\x37"
        for n in (0, 1, 3, 4, 5, 125, 1023, 1024, 1025, 4097, 70_000):
            payload = bytes((i * 7 + 3) % 256 for i in range(n))
            self.assertEqual(unmask(payload, mask), reference_unmask(payload, mask), n)
            self.assertIsInstance(unmask(payload, mask), bytes)

    def test_text_frame_uses_the_minimal_length_encoding(self) -> None:
        """7-bit lengths to 125, then 16-bit to 65535, then 64-bit (RFC 6455 5.2)."""
        for n, header_size, length_code in (
            (0, 2, 0), (125, 2, 125), (126, 4, 126), (65535, 4, 126), (65536, 10, 127),
        ):
            payload = b"x" * n
            frame = text_frame(payload)
            self.assertEqual(frame[0], 0x81, n)
            self.assertEqual(frame[1], length_code, n)
            self.assertEqual(len(frame), header_size + n)
            self.assertEqual(parse_server_frames(frame), [Frame(OP_TEXT, payload)])


def ping_request(request_id: int, padding: int) -> bytes:
    """A real call whose size the test chooses (the padding is an ignored id prefix)."""
    return json.dumps(
        {"jsonrpc": "2.0", "id": f"{'p' * padding}{request_id}", "method": "system.ping"}
    ).encode()


def raw_frame(first: int, payload: bytes, length_bytes: bytes = b"", masked: bool = True) -> bytes:
    """
    A frame built by hand: any first octet, the length in C{length_bytes}
    when given (so it may be non-minimal), unmasked if asked.  Without
    C{length_bytes} the payload must be under 126 bytes.
    """
    code = {0: len(payload), 2: 126, 8: 127}[len(length_bytes)]
    if not masked:
        return bytes([first, code]) + length_bytes + payload
    mask = b"\x11\x22\x33\x44"
    return bytes([first, 0x80 | code]) + length_bytes + mask + reference_unmask(payload, mask)


@st.composite
def client_streams(draw: Any) -> bytes:
    """A client byte stream: mostly calls, sometimes anything the direct path must refuse."""
    parts = []
    for i in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(
            ["call"] * 6 + ["fragmented", "ping", "pong", "binary", "text_bytes", "rsv",
                            "unmasked", "non_minimal", "oversized", "reserved", "lone_continuation"]
        ))
        mask = draw(st.binary(min_size=4, max_size=4))
        if kind == "call":
            padding = draw(st.sampled_from([0, 100, 200, 1100, 2500]))
            parts.append(client_frame(ping_request(i, padding), mask=mask))
        elif kind == "fragmented":
            body = ping_request(i, draw(st.sampled_from([0, 300])))
            cut = draw(st.integers(0, len(body)))
            parts.append(client_frame(body[:cut], OP_TEXT, fin=False, mask=mask))
            if draw(st.booleans()):
                parts.append(client_frame(b"", OP_PING, mask=mask))
            parts.append(client_frame(body[cut:], OP_CONTINUATION, mask=mask))
        elif kind == "ping":
            parts.append(client_frame(draw(st.binary(max_size=20)), OP_PING, mask=mask))
        elif kind == "pong":
            parts.append(client_frame(b"", OP_PONG, mask=mask))
        elif kind == "binary":
            parts.append(client_frame(b"\x00\x01", OP_BINARY, mask=mask))
        elif kind == "text_bytes":
            parts.append(client_frame(draw(st.binary(max_size=40)), OP_TEXT, mask=mask))
        elif kind == "rsv":
            parts.append(raw_frame(0x81 | draw(st.sampled_from([0x10, 0x20, 0x40])), ping_request(i, 0)))
        elif kind == "unmasked":
            parts.append(raw_frame(0x81, ping_request(i, 0), masked=False))
        elif kind == "non_minimal":
            body = ping_request(i, 0)
            wide = draw(st.booleans())
            length = struct.pack("!Q", len(body)) if wide else struct.pack("!H", len(body))
            parts.append(raw_frame(0x81, body, length))
        elif kind == "oversized":
            parts.append(client_frame(b'"' + b"x" * MAX_MESSAGE + b'"', mask=mask))
        elif kind == "reserved":
            parts.append(client_frame(b"", draw(st.sampled_from([0x3, 0xB])), mask=mask))
        else:
            parts.append(client_frame(b"x", OP_CONTINUATION, mask=mask))
    return b"".join(parts)


class DirectPathDifferentialTests(SynchronousTestCase):
    """Whatever a client sends, however TCP cuts it: the same bytes back as Autobahn's path."""

    def setUp(self) -> None:
        self.service: NodeService = build_node(
            self, rate_limit=1e9, max_message_size=MAX_MESSAGE
        )
        self.token = mint_token("alice")

    def answers(self, stream: bytes, cuts: list[int], direct: bool) -> tuple[bytes, bool]:
        session = SyncSession(self.service, self.token)
        self.addCleanup(session.lose)
        self.assertTrue(session.protocol._direct, "the direct path is on for a plain session")
        session.protocol._direct = direct
        written = b""
        start = 0
        for end in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
            if end > start:
                session.protocol.dataReceived(stream[start:end])
                session.clock.advance(0)  # the turn ends: what it wrote goes out
                written += session.transport.value()
                session.transport.clear()
                start = end
        hung_up = session.disconnecting
        session.lose()
        return written, hung_up

    @PROFILE
    @given(client_streams(), st.lists(st.integers(0, 12_000), max_size=6))
    def test_same_answers_as_autobahn(self, stream: bytes, cuts: list[int]) -> None:
        direct = self.answers(stream, cuts, True)
        autobahn = self.answers(stream, cuts, False)
        self.assertEqual(direct, autobahn)

    def test_pipelined_calls_in_one_read_are_all_answered_in_order(self) -> None:
        """The stream this path exists for: several calls per read, sizes across each encoding."""
        paddings = [0, 150, 1100, 2500, 0]
        stream = b"".join(client_frame(ping_request(i, p)) for i, p in enumerate(paddings))
        written, hung_up = self.answers(stream, [], True)
        self.assertFalse(hung_up)
        replies = [f.json() for f in parse_server_frames(written)]
        self.assertEqual([r["id"] for r in replies], [f"{'p' * p}{i}" for i, p in enumerate(paddings)])
        self.assertTrue(all(r["result"]["pong"] is True for r in replies))

    def test_traffic_on_the_direct_path_restarts_the_ping_timeout(self) -> None:
        """As in Autobahn: a peer that sends calls is alive even if its pong is late."""
        service = build_node(self, ping_interval=10, ping_timeout=5)
        for direct in (True, False):
            session = SyncSession(service, self.token)
            self.addCleanup(session.lose)
            session.protocol._direct = direct
            session.clock.advance(10.5)
            self.assertEqual([f.opcode for f in session.take()], [OP_PING], direct)
            replies = session.call({"jsonrpc": "2.0", "id": 1, "method": "system.ping"})
            self.assertEqual(replies[0]["result"]["pong"], True)
            session.clock.advance(6)
            self.assertFalse(session.disconnecting, f"direct={direct}")
            session.lose()
