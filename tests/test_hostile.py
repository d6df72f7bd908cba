"""
Hostile input: whatever a client sends, the session neither breaks nor leaks.

The property tests drive the node's real session synchronously
(L{tests.helpers.session}: the real factory and protocol, a fake transport,
a L{task.Clock} reactor), so hypothesis can throw thousands of messages at it
in a few seconds: random bytes as text frames and as raw TCP data, random
JSON, and random JSON-RPC-shaped requests and batches aimed at the real
methods, authenticated or not.  Every frame the server writes must be a
well-formed JSON-RPC reply (or a close frame), no reply may carry exception
text, no exception may escape the session, and no handler may fail (trial
turns a logged failure into a test error).  A few nasty frames then go over
a real socket.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers.jsonvalues import any_text, json_scalars, json_values
from tests.helpers.node import mint_token, start_node
from tests.helpers.session import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    SyncSession,
    build_node,
    client_frame,
)
from unrealon.service import NodeService

PROFILE = settings(max_examples=150)  # on top of the suite's profile (tests/__init__.py)

#: what a leaked exception looks like
LEAK_TEXT = ("Traceback", "Error(", 'File "', "Exception(")
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Exit|Interrupt)\b")

CLIENT_METHODS = (
    "auth.authenticate", "auth.refresh", "system.ping", "system.info", "rpc.discover",
    "rooms.join", "rooms.leave", "rooms.list", "presence.list", "presence.count",
)
BACKEND_METHODS = ("publish", "connections.disconnect", "presence.online", "notification.send")

#: JSON number literals, some far beyond a float's range or Python's digit limit
number_literals = st.from_regex(
    r"\A-?(0|[1-9][0-9]{0,5000})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,6})?\Z"
)
room_names = st.sampled_from(["broadcast", "user:alice", "user:bob", "workspace:1", "session:9"]) | st.text(
    alphabet="abcxyz019:._@-", min_size=0, max_size=12
)
param_values = room_names | json_scalars | st.lists(json_scalars, max_size=3)
params = (
    st.dictionaries(
        st.sampled_from(["room", "since", "token", "x", "user_id"]) | st.text(max_size=5),
        param_values,
        max_size=4,
    )
    | st.lists(json_scalars, max_size=3)
    | json_scalars
)
ids = (
    st.none()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
    | st.booleans()
    | st.just({})
)
methods = st.sampled_from(CLIENT_METHODS + BACKEND_METHODS) | st.text(max_size=15)


@st.composite
def rpc_messages(draw: Any) -> Any:
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["jsonrpc"] = "2.0"
    else:
        message["jsonrpc"] = draw(json_scalars)
    if draw(st.integers(0, 9)):
        message["method"] = draw(methods)
    if draw(st.booleans()):
        message["id"] = draw(ids)
    if draw(st.integers(0, 3)):
        message["params"] = draw(params)
    return message


rpc_payloads = rpc_messages() | st.lists(rpc_messages() | json_scalars, min_size=0, max_size=6)


def check_reply(testcase: Any, reply: Any) -> None:
    """One JSON-RPC response object (or a server notification) that leaks nothing."""
    testcase.assertIsInstance(reply, dict, reply)
    testcase.assertEqual(reply.get("jsonrpc"), "2.0", reply)
    if "method" in reply and "id" not in reply:
        testcase.assertIsInstance(reply["method"], str)
        return
    testcase.assertIn("id", reply)
    testcase.assertTrue(reply["id"] is None or type(reply["id"]) in (str, int, float), reply)
    testcase.assertEqual(len({"result", "error"} & set(reply)), 1, reply)
    testcase.assertEqual(set(reply) - {"jsonrpc", "id", "result", "error"}, set(), reply)
    without_id = json.dumps({k: v for k, v in reply.items() if k != "id"})
    for leak in LEAK_TEXT:
        testcase.assertNotIn(leak, without_id, reply)
    if "error" in reply:
        error = reply["error"]
        testcase.assertIsInstance(error["code"], int)
        testcase.assertIsInstance(error["message"], str)
        testcase.assertEqual(set(error) - {"code", "message", "data"}, set())
        testcase.assertIsNone(EXCEPTION_NAME.search(json.dumps(error)), error)
        testcase.assertNotEqual(error["code"], -32603, reply)  # no handler failed


def check_frames(testcase: Any, frames: list[Frame]) -> bool:
    """Check every server frame; return whether the server closed."""
    closed = False
    for frame in frames:
        testcase.assertIn(frame.opcode, (OP_TEXT, OP_CLOSE, OP_PING, OP_PONG), frame)
        if frame.opcode == OP_CLOSE:
            closed = True
            continue
        if frame.opcode != OP_TEXT:
            continue
        testcase.assertFalse(closed, "data after the close frame")
        message = json.loads(frame.payload.decode("utf-8"))  # strict UTF-8, strict JSON
        if isinstance(message, list):
            testcase.assertTrue(message, "an empty array is never a reply")
            for reply in message:
                check_reply(testcase, reply)
        else:
            check_reply(testcase, message)
    return closed


class HostileSessionTests(SynchronousTestCase):
    """Random input through the node's real session, synchronously."""

    def setUp(self) -> None:
        self.service: NodeService = build_node(self, rate_limit=1e9)
        self.token = mint_token("alice", rooms=["workspace:*", "session:*", "x*"])

    def session(self, authenticated: bool) -> SyncSession:
        session = SyncSession(self.service, self.token if authenticated else None)
        self.addCleanup(session.lose)
        return session

    def finish(self, session: SyncSession) -> None:
        session.lose()
        self.assertEqual(self.service.node.hub.connection_count, 0)

    @PROFILE
    @given(st.lists(st.binary(max_size=200), min_size=1, max_size=4), st.booleans())
    def test_random_bytes_as_text(self, payloads: list[bytes], authenticated: bool) -> None:
        """
        Random bytes in text frames: valid UTF-8 gets JSON-RPC errors (or
        replies), invalid UTF-8 a close (1007); nothing escapes.
        """
        session = self.session(authenticated)
        for payload in payloads:
            frames = session.send(payload)
            if check_frames(self, frames):
                codes = [f.close_code for f in frames if f.opcode == OP_CLOSE]
                self.assertEqual(codes, [1007], payload)
                break
        self.finish(session)

    @PROFILE
    @given(st.binary(min_size=1, max_size=300), st.booleans())
    def test_random_bytes_as_frames(self, data: bytes, authenticated: bool) -> None:
        """Random bytes where frames should be (not framed, not masked) never raise out of the session."""
        session = self.session(authenticated)
        check_frames(self, session.feed(data))
        self.finish(session)

    @PROFILE
    @given(st.lists(json_values, min_size=1, max_size=4), st.booleans())
    def test_random_json(self, values: list[Any], authenticated: bool) -> None:
        """Random JSON values (any shape, unicode, big numbers) get well-formed replies only."""
        session = self.session(authenticated)
        for value in values:
            self.assertFalse(check_frames(self, session.send(json.dumps(value))))
        self.finish(session)

    @settings(PROFILE, max_examples=400)
    @given(st.lists(rpc_payloads, min_size=1, max_size=5), st.booleans())
    def test_random_requests(self, payloads: list[Any], authenticated: bool) -> None:
        """
        Random JSON-RPC-shaped requests, notifications and batches aimed at
        the real client and backend method names, with random params: every
        reply is well formed, none is an internal error, none leaks.
        """
        session = self.session(authenticated)
        for payload in payloads:
            frames = session.send(json.dumps(payload))
            self.assertFalse(check_frames(self, frames))
            texts = [f.json() for f in frames if f.opcode == OP_TEXT]
            if isinstance(payload, list) and payload and all(
                isinstance(p, dict) and "id" not in p and p.get("jsonrpc") == "2.0"
                and isinstance(p.get("method"), str) and p.get("method")
                and isinstance(p.get("params", {}), (dict, list))
                for p in payload
            ):
                # a batch of only notifications: no reply at all
                self.assertEqual([t for t in texts if "method" not in t], [], payload)
        self.finish(session)

    @PROFILE
    @given(
        st.lists(st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                 | any_text, min_size=1, max_size=8),
        st.sampled_from(["system.ping", "no.such.method", "rooms.join", "publish"]),
    )
    def test_ids_echoed(self, request_ids: list[Any], method: str) -> None:
        """Every valid id (surrogates, huge integers, floats, null) comes back exactly, once per request."""
        session = self.session(True)
        for request_id in request_ids:
            frames = session.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method}))
            self.assertFalse(check_frames(self, frames))
            replies = [f.json() for f in frames if f.opcode == OP_TEXT]
            self.assertEqual(len(replies), 1, ascii(request_id))
            # what the client sent, as JSON means it (a pair of surrogate
            # characters is one character once encoded)
            sent = json.loads(json.dumps(request_id))
            self.assertEqual(replies[0]["id"], sent)
            self.assertIs(type(replies[0]["id"]), type(sent))
        self.finish(session)

    @PROFILE
    @given(number_literals, st.sampled_from(["id", "params"]))
    def test_number_literals(self, literal: str, where: str) -> None:
        """
        Any JSON number literal as id or in params gets exactly one reply:
        finite ones are used (an id echoed as the same number), ones beyond
        a float's range or the digit limit are -32700.
        """
        session = self.session(True)
        if where == "id":
            payload = '{"jsonrpc":"2.0","method":"system.ping","id":' + literal + "}"
        else:
            payload = '{"jsonrpc":"2.0","method":"system.ping","id":1,"params":{"n":' + literal + "}}"
        frames = session.send(payload)
        self.assertFalse(check_frames(self, frames))
        replies = [f.json() for f in frames if f.opcode == OP_TEXT]
        self.assertEqual(len(replies), 1, literal[:50])
        reply = replies[0]
        if "error" in reply and reply["error"]["code"] == -32700:
            self.assertIsNone(reply["id"])
        elif where == "id":
            self.assertEqual(reply["id"], json.loads(literal))
        else:
            self.assertEqual(reply["error"]["code"], -32602)
        self.finish(session)

    @PROFILE
    @given(st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY, OP_PING, 0x3, 0xB]),
                              st.binary(max_size=50), st.booleans()), min_size=1, max_size=5))
    def test_random_frame_sequences(self, frames: list[tuple[int, bytes, bool]]) -> None:
        """Well-framed but arbitrary frames (reserved opcodes, binary, fragments) never raise."""
        session = self.session(True)
        for opcode, payload, fin in frames:
            if check_frames(self, session.feed(client_frame(payload, opcode, fin=fin))):
                break
        self.finish(session)


class NastyFramesTests(TestCase):
    """A handful of nasty messages over a real socket."""

    @inlineCallbacks
    def test_nasty_messages(self) -> Any:
        """
        Nesting 100 000 deep, numbers beyond float range or beyond Python's
        digit limit, NaN/Infinity literals, raw control characters, lone
        surrogates in method, id and params: each gets a well-formed
        JSON-RPC reply and the connection keeps working.
        """
        running = yield start_node(self, max_message_size=400_000, rate_limit=1000)
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.close)
        cases: list[tuple[str, int, Any]] = [
            ("[" * 100_000, -32700, None),
            ("[" * 100_000 + "]" * 100_000, -32700, None),
            ('{"a":' * 60_000 + "1" + "}" * 60_000, -32700, None),
            ('{"jsonrpc":"2.0","id":1,"method":"system.ping","params":{"x":1e99999}}', -32700, None),
            ('{"jsonrpc":"2.0","id":1e400,"method":"system.ping"}', -32700, None),
            ('{"jsonrpc":"2.0","id":1,"method":"system.ping","params":{"x":' + "9" * 5000 + "}}", -32700, None),
            ('{"jsonrpc":"2.0","id":' + "9" * 4000 + ',"method":"system.pong"}', -32601, int("9" * 4000)),
            ('{"jsonrpc":"2.0","id":NaN,"method":"system.ping"}', -32700, None),
            ('{"jsonrpc":"2.0","id":2,"method":"system.ping","params":{"x":Infinity}}', -32700, None),
            ('{"jsonrpc":"2.0","id":3,"method":"system.ping","params":{"x":-Infinity}}', -32700, None),
            ('{"jsonrpc":"2.0","id":"a\x00b","method":"system.ping"}', -32700, None),
            ('{"jsonrpc":"2.0","id":"\\ud800","method":"\\udc00"}', -32601, "\ud800"),
            ('{"jsonrpc":"2.0","id":"\\udfff\\ud800","method":"system.ping","params":{"\\ud800":"\\udbff"}}',
             -32602, "\udfff\ud800"),
            ('{"jsonrpc":"2.0","id":4,"method":"rooms.join","params":{"room":"\\ud800"}}', -32602, 4),
            ('\ufeff{"jsonrpc":"2.0","id":5,"method":"system.ping"}', -32700, None),
        ]
        for payload, code, request_id in cases:
            client.send_raw(payload.encode("utf-8", "surrogatepass"))
            reply = yield client.next(timeout=10)
            self.assertEqual(reply["error"]["code"], code, payload[:80])
            self.assertEqual(reply["id"], request_id, payload[:80])
            check_reply(self, reply)
        self.assertIs((yield client.call("system.ping"))["pong"], True)

    @inlineCallbacks
    def test_invalid_utf8_text(self) -> Any:
        """A text frame that is not UTF-8 is closed by the WebSocket layer with 1007."""
        running = yield start_node(self)
        for payload in (b"\xff\xfe", b'{"jsonrpc":"2.0","id":1,"method":"\xc3\x28"}', b"\xed\xa0\x80"):
            client = yield running.connect(mint_token("alice"))
            client.send_raw(payload)
            code, _ = yield client.closed
            self.assertEqual(code, 1007)
