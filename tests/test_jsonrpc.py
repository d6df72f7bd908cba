"""
The JSON-RPC 2.0 codec (L{unrealon.jsonrpc}): pure functions, so tested
directly, with hypothesis for the properties that must hold for any input.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers.jsonvalues import any_text, json_values
from unrealon.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_BATCH,
    PARSE_ERROR,
    FieldError,
    Incoming,
    Invalid,
    Request,
    RPCError,
    decode_json,
    encode,
    error_response,
    invalid_params,
    notification,
    parse_entry,
    parse_message,
    result_response,
)

PROFILE = settings(max_examples=100)  # on top of the suite's profile (tests/__init__.py)

valid_ids = st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | any_text


def request(method: str = "m", **fields: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, **fields}


class ParseEntryTests(SynchronousTestCase):
    """One decoded value -> a Request or an Invalid."""

    def test_request_and_notification(self) -> None:
        """An id (even null) makes a request; no id makes a notification; absent params are {}."""
        entry = parse_entry(request(id=1, params={"a": 1}))
        self.assertEqual(entry, Request("m", {"a": 1}, 1, False))
        entry = parse_entry(request(id=None))
        self.assertEqual(entry, Request("m", {}, None, False))
        entry = parse_entry(request())
        self.assertEqual(entry, Request("m", {}, None, True))

    def test_positional_params_kept(self) -> None:
        """Positional params stay a list (dispatch answers -32602), notification or not."""
        self.assertEqual(parse_entry(request(id=2, params=[1, 2])), Request("m", [1, 2], 2, False))
        self.assertEqual(parse_entry(request(params=[])), Request("m", [], None, True))

    def test_invalid(self) -> None:
        """Each malformed entry is -32600, echoing the id only when it is a valid id."""
        cases: list[tuple[Any, Any]] = [
            (1, None),
            ([], None),
            ("x", None),
            (None, None),
            ({"id": 1, "method": "m"}, 1),
            (request(id=1) | {"jsonrpc": "1.0"}, 1),
            (request(id=True), None),
            (request(id=False), None),
            (request(id={}), None),
            (request(id=[1]), None),
            ({"jsonrpc": "2.0", "id": 3}, 3),
            (request(id=3) | {"method": ""}, 3),
            (request(id=3) | {"method": 7}, 3),
            (request(id=4, params="x"), 4),
            (request(id=4, params=None), 4),
            (request(id=4, params=1.5), 4),
        ]
        for value, echoed in cases:
            entry = parse_entry(value)
            self.assertIsInstance(entry, Invalid, value)
            assert isinstance(entry, Invalid)
            self.assertEqual(entry.error.code, INVALID_REQUEST, value)
            self.assertEqual(entry.id, echoed, value)

    @PROFILE
    @given(method=st.text(min_size=1), request_id=valid_ids,
           params=st.dictionaries(st.text(), json_values, max_size=5))
    def test_valid_requests_round_trip(self, method: str, request_id: Any, params: Any) -> None:
        """Any well-formed request parses to its method, params and exact id."""
        entry = parse_entry(request(method, id=request_id, params=params))
        self.assertEqual(entry, Request(method, params, request_id, False))

    @PROFILE
    @given(st.dictionaries(st.text(), json_values, max_size=6))
    def test_any_object_parses(self, value: dict[str, Any]) -> None:
        """Any JSON object gives a Request or an Invalid whose id is a valid id."""
        entry = parse_entry(value)
        self.assertIsInstance(entry, (Request, Invalid))
        self.assertTrue(entry.id is None or type(entry.id) in (str, int, float))


class ParseMessageTests(SynchronousTestCase):
    """A whole WebSocket message."""

    def test_parse_errors(self) -> None:
        """Not JSON, NaN/Infinity, numbers too large for a float, and non-UTF-8 are -32700."""
        for payload in (
            b"", b"{", b"nul", b"[1,]", b"{'a': 1}",
            b"NaN", b"[Infinity]", b'{"id": -Infinity}',
            b'{"jsonrpc": "2.0", "id": 1e999, "method": "m"}', b"[1e400]",
            b"\xff\xfe{\x00}\x00", b'"\xc3\x28"', b"\x00{\x00}",
            "{}".encode("utf-16"), "[1]".encode("utf-32"),
            b"[" * 100_000, b"{\"a\":" * 50_000,
            b"1" * 5000,  # beyond Python's int digit limit
        ):
            incoming = parse_message(payload)
            self.assertIsNotNone(incoming.error, payload[:40])
            assert incoming.error is not None
            self.assertEqual(incoming.error.code, PARSE_ERROR)
            self.assertEqual(incoming.entries, ())

    def test_str_and_bytes(self) -> None:
        """Text and UTF-8 bytes parse the same."""
        text = json.dumps(request(id="ü", params={"x": "✓"}), ensure_ascii=False)
        self.assertEqual(parse_message(text), parse_message(text.encode("utf-8")))

    def test_large_but_finite_numbers(self) -> None:
        """Big integers are exact; large finite floats are kept."""
        incoming = parse_message(b'{"jsonrpc":"2.0","id":123456789012345678901234567890,"method":"m","params":{"f":1e308}}')
        entry = incoming.entries[0]
        assert isinstance(entry, Request)
        self.assertEqual(entry.id, 123456789012345678901234567890)
        self.assertEqual(entry.params, {"f": 1e308})

    def test_batches(self) -> None:
        """Empty batch: one -32600; up to 100 entries: one entry each, in order; 101: -32600."""
        empty = parse_message(b"[]")
        assert empty.error is not None
        self.assertEqual(empty.error.code, INVALID_REQUEST)
        self.assertFalse(empty.is_batch)
        full = parse_message(json.dumps([request(id=i) for i in range(MAX_BATCH)]))
        self.assertIsNone(full.error)
        self.assertTrue(full.is_batch)
        self.assertEqual([e.id for e in full.entries], list(range(MAX_BATCH)))
        over = parse_message(json.dumps([request(id=i) for i in range(MAX_BATCH + 1)]))
        assert over.error is not None
        self.assertEqual(over.error.code, INVALID_REQUEST)
        self.assertEqual(over.entries, ())
        self.assertEqual(MAX_BATCH, 100)

    def test_single_is_not_batch(self) -> None:
        """A single object is one entry, not a batch; a batch of one is a batch."""
        self.assertFalse(parse_message(json.dumps(request(id=1))).is_batch)
        self.assertTrue(parse_message(json.dumps([request(id=1)])).is_batch)

    @PROFILE
    @given(st.binary(max_size=300))
    def test_any_bytes(self, payload: bytes) -> None:
        """Random bytes never raise, and give either an error or entries, never both."""
        incoming = parse_message(payload)
        self.assertIsInstance(incoming, Incoming)
        if incoming.error is not None:
            self.assertEqual(incoming.entries, ())
            self.assertIn(incoming.error.code, (PARSE_ERROR, INVALID_REQUEST))
        else:
            self.assertTrue(incoming.entries)

    @PROFILE
    @given(json_values)
    def test_any_json(self, value: Any) -> None:
        """Random JSON never raises; every entry answers with an encodable reply."""
        incoming = parse_message(json.dumps(value))
        if incoming.error is not None:
            encode(error_response(None, incoming.error))
            return
        for entry in incoming.entries:
            if isinstance(entry, Invalid):
                reply = error_response(entry.id, entry.error)
            else:
                reply = result_response(entry.id, None)
            self.assertEqual(json.loads(encode(reply))["id"], reply["id"])


class EncodeTests(SynchronousTestCase):
    """What goes on the wire."""

    def test_compact_utf8(self) -> None:
        """Compact separators, UTF-8 (not \\u escapes) for non-ASCII text."""
        self.assertEqual(encode({"a": [1, "ü"]}), '{"a":[1,"ü"]}'.encode())

    def test_lone_surrogates(self) -> None:
        """A lone surrogate (legal in JSON) is escaped, so the bytes are valid UTF-8 and read back equal."""
        message = result_response("\ud800x", {"s": "a\udfffb", "t": "ü"})
        data = encode(message)
        data.decode("utf-8")  # strict: valid UTF-8
        self.assertEqual(json.loads(data), message)

    def test_refuses_non_json(self) -> None:
        """NaN, infinity and non-JSON objects raise (the session turns that into -32603)."""
        for value in (float("nan"), float("inf"), object(), {1: {2}}):
            self.assertRaises((TypeError, ValueError), encode, {"v": value})

    @PROFILE
    @given(json_values)
    def test_round_trip(self, value: Any) -> None:
        """
        Any JSON value, lone surrogates included, encodes to valid UTF-8 that
        decodes to the same JSON value.  (Two Python characters forming a
        surrogate pair are one character in JSON, as C{json.dumps} has it.)
        """
        data = encode(value)
        data.decode("utf-8")
        self.assertEqual(decode_json(data), json.loads(json.dumps(value)))


class ShapeTests(SynchronousTestCase):
    """Response and error objects."""

    def test_error_object(self) -> None:
        """Errors carry code and message, and data only when given."""
        self.assertEqual(
            error_response(1, RPCError(INVALID_REQUEST)),
            {"jsonrpc": "2.0", "id": 1, "error": {"code": -32600, "message": "Invalid request"}},
        )
        error = RPCError(-32029, data={"retry_after_ms": 5})
        self.assertEqual(error.to_error(), {"code": -32029, "message": "Rate limited", "data": {"retry_after_ms": 5}})

    def test_fixed_messages(self) -> None:
        """Every code of PROTOCOL.md section 3 has its fixed message."""
        for code in (-32700, -32600, -32601, -32602, -32603, -32001, -32003, -32004, -32029, -32011):
            self.assertTrue(RPCError(code).message)
            self.assertNotEqual(RPCError(code).message, "Error")

    def test_invalid_params(self) -> None:
        """data.errors is a list of {field, message}."""
        error = invalid_params([FieldError("room", "is required"), FieldError("x", "unknown parameter")])
        self.assertEqual(error.code, INVALID_PARAMS)
        self.assertEqual(
            error.data,
            {"errors": [{"field": "room", "message": "is required"},
                        {"field": "x", "message": "unknown parameter"}]},
        )

    def test_notification(self) -> None:
        """A notification has no id."""
        self.assertEqual(notification("m", {"a": 1}), {"jsonrpc": "2.0", "method": "m", "params": {"a": 1}})
        self.assertNotIn("id", notification("m", {}))
