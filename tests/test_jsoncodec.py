"""
L{unrealon.jsoncodec}: the fast codec and the reference are one codec on the
wire.  Differential tests: every input, given to both, gets the same bytes
out (encoding) or the same value of the same types, or an error from both
(decoding).  The contract's edge cases one by one, then generated values.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers.jsonvalues import json_values
from unrealon import jsoncodec
from unrealon.jsoncodec import reference_decode, reference_encode, reference_text

PROFILE = settings(max_examples=300)

#: number literals of every shape JSON allows, long ones included
number_literals = st.from_regex(
    r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,24})?([eE][-+]?[0-9]{1,3})?", fullmatch=True
)


class Outcome:
    """What a decode gave: a value, or that it was refused."""

    def __init__(self, decode: Any, payload: bytes | str) -> None:
        try:
            self.value, self.refused = decode(payload), False
        except (ValueError, RecursionError):
            self.value, self.refused = None, True


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (-0.0 is not 0.0)."""
    pairs = [(a, b)]  # a stack, not recursion: some cases nest 1,100 deep
    while pairs:
        x, y = pairs.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if x.hex() != y.hex():
                return False
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            pairs.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if list(x) != list(y):
                return False
            pairs.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


#: without orjson both sides are the reference, and these tests could not fail
NO_FAST_PATH = "orjson is not installed (make install installs the 'fast' extra)"


class FastPathTests(SynchronousTestCase):
    """The fast path is the one that runs, for the messages the server sees most."""

    skip = NO_FAST_PATH if jsoncodec.BACKEND == "stdlib" else None

    def test_common_messages_never_reach_the_reference(self) -> None:
        def refuse(*args: Any) -> Any:
            raise AssertionError("the reference was used")

        for name in ("reference_decode", "reference_encode", "reference_text"):
            self.patch(jsoncodec, name, refuse)
        request = b'{"jsonrpc":"2.0","id":17,"method":"rooms.join","params":{"room":"w:1"}}'
        self.assertEqual(jsoncodec.decode(request)["params"], {"room": "w:1"})
        self.assertEqual(jsoncodec.decode(request.decode())["id"], 17)
        reply = {"jsonrpc": "2.0", "id": 17, "result": {"pong": True, "t": 1796490468075.5}}
        self.assertEqual(jsoncodec.encode(reply), json.dumps(reply, separators=(",", ":")).encode())
        self.assertEqual(jsoncodec.text({"é": [1, 2.5]}), '{"é":[1,2.5]}')


class DecodeTests(SynchronousTestCase):
    skip = NO_FAST_PATH if jsoncodec.BACKEND == "stdlib" else None

    def assertSameDecode(self, payload: bytes | str) -> None:
        fast, ref = Outcome(jsoncodec.decode, payload), Outcome(reference_decode, payload)
        self.assertEqual(fast.refused, ref.refused, payload)
        self.assertTrue(same(fast.value, ref.value), (payload, fast.value, ref.value))

    def test_edge_cases_of_the_contract(self) -> None:
        cases = [
            # lone surrogates: legal as escapes, not as raw UTF-8 bytes
            b'"\\ud800"', b'"\\udc00x"', b'{"id":"\\ud83d"}', b'"\\ud83d\\ude00"', b'"\xed\xa0\x80"',
            # integers beyond 64 bits, and at the edges
            b"18446744073709551615", b"18446744073709551616", b"-9223372036854775808",
            b"-9223372036854775809", b"123456789012345678901234567890", b"1" * 4301,
            b'{"id":99999999999999999999}', b"1234567890123456789.5",
            # not JSON: NaN, Infinity, numbers beyond a float
            b"NaN", b"-Infinity", b"[1,NaN]", b"1e999", b"-1e400", b"1e-400",
            # duplicate keys: the last one wins in both
            b'{"a":1,"a":2}', b'{"id":1,"method":"x","id":"2"}',
            # nesting past orjson's limit, and within it
            b"[" * 1100 + b"]" * 1100, b"[" * 500 + b"]" * 500, b"[" * 5000 + b"]" * 5000,
            # encodings and framing
            b"\xef\xbb\xbf{}", b"\xff", b"{}\x00", b'"\x01"', b" {} ", b"", b"  ", b"[1,]", b"{'a':1}",
            "\"é\"", "\"\ud800\"",
            # numbers of every shape, and what only looks like one
            b"-0", b"-0.0", b"0.1", b"1E2", b"1e+2", b"5e-324", b"1.7976931348623157e308",
            b"01", b"1.", b".5", b"+1", b"1e", b"-", b"1_000", b"0x10",
            # whitespace JSON has and has not, escapes, truncation
            b"\x0c{}", b"\xc2\xa0{}", b"\xe2\x80\xa8[]", b"[] []", b"[1,2", b"True",
            b'"\\u0000"', b'"\\/"', b'"\\x41"', b'"\\ud800\\u0041"', b'"\x7f"',
        ]
        for payload in cases:
            self.assertSameDecode(payload)

    @PROFILE
    @given(json_values)
    def test_what_we_encode_decodes_alike(self, value: Any) -> None:
        self.assertSameDecode(reference_encode(value))
        self.assertSameDecode(json.dumps(value))

    @PROFILE
    @given(st.lists(number_literals, min_size=1, max_size=5))
    def test_number_literals(self, numbers: list[str]) -> None:
        self.assertSameDecode(("[" + ",".join(numbers) + "]").encode())
        self.assertSameDecode(numbers[0].encode())

    @PROFILE
    @given(st.binary(max_size=200))
    def test_any_bytes(self, payload: bytes) -> None:
        self.assertSameDecode(payload)


class _Colour(enum.IntEnum):
    RED = 1


class _Name(str):
    pass


class EncodeTests(SynchronousTestCase):
    skip = NO_FAST_PATH if jsoncodec.BACKEND == "stdlib" else None

    def assertSameEncode(self, value: Any) -> None:
        for fast, ref in ((jsoncodec.encode, reference_encode), (jsoncodec.text, reference_text)):
            try:
                expected: Any = ref(value)
            except (TypeError, ValueError) as e:
                self.assertRaises(type(e), fast, value)
            else:
                self.assertEqual(fast(value), expected, repr(value))

    def test_edge_cases_of_the_contract(self) -> None:
        cases: list[Any] = [
            "\ud800", {"id": "\ud83d", "result": "é\u2028"}, "\ud83d\ude00",
            2**64, -(2**63) - 1, 2**63, -(2**63), 10**40, [2**100, 1],
            math.nan, math.inf, -math.inf, [1.0, math.nan],
            1e-07, 1e-05, 1e-4, 0.0001, 1e16, 1e15, 1e22, 5e-324, -0.0, 1.0, 100.0,
            1.5e300, 123456789012345680.0, 12345678.9, [1e-9, "1e-9"],
            {"a": None}, [None, "null"], "null", True, False,
            {1: "a"}, {"a": {2: 3}}, (1, 2), _Colour.RED, _Name("x"), {_Name("k"): 1},
            datetime.datetime(2026, 12, 5), object(), b"bytes", {1.5: 2},
        ]
        for value in cases:
            self.assertSameEncode(value)

    @PROFILE
    @given(json_values)
    def test_any_json_value(self, value: Any) -> None:
        self.assertSameEncode(value)

    @PROFILE
    @given(st.floats(allow_nan=True, allow_infinity=True))
    def test_any_float(self, value: float) -> None:
        self.assertSameEncode(value)
        self.assertSameEncode({"x": [value]})

    def test_the_one_difference_is_outside_json(self) -> None:
        """UUIDs and plain enum members: orjson encodes them, the reference refuses (documented)."""
        import uuid

        class Mode(enum.Enum):
            FAST = "fast"

        value = {"id": uuid.UUID(int=1), "mode": Mode.FAST}
        self.assertRaises(TypeError, reference_encode, value)
        self.assertEqual(
            jsoncodec.encode(value),
            b'{"id":"00000000-0000-0000-0000-000000000001","mode":"fast"}',
        )


def _embedded(value: Any, picks: list[bool]) -> Any:
    """
    C{value} with some of its parts (C{picks}, in walk order, cycled) as
    L{jsoncodec.RawJSON} of their reference text: what a reply holding
    stored events looks like.
    """
    turn = [0]

    def walk(v: Any) -> Any:
        pick = picks[turn[0] % len(picks)]
        turn[0] += 1
        if pick:
            return jsoncodec.RawJSON(reference_text(v))
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value)


class RawJSONTests(SynchronousTestCase):
    """
    L{jsoncodec.RawJSON}: text the codec made goes into a message as it
    is, and the message is byte for byte the one holding the value.
    """

    def assertSameAsValue(self, value: Any, embedded: Any) -> None:
        for fast, ref in ((jsoncodec.encode, reference_encode), (jsoncodec.text, reference_text)):
            try:
                expected: Any = ref(value)
            except (TypeError, ValueError) as e:
                self.assertRaises(type(e), fast, embedded)
                self.assertRaises(type(e), ref, embedded)
            else:
                self.assertEqual(fast(embedded), expected, repr(embedded))
                self.assertEqual(ref(embedded), expected, repr(embedded))

    @PROFILE
    @given(json_values, st.lists(st.booleans(), min_size=1, max_size=8))
    def test_any_json_value_with_raw_parts(self, value: Any, picks: list[bool]) -> None:
        self.assertSameAsValue(value, _embedded(value, picks))

    def test_edge_cases(self) -> None:
        raw = jsoncodec.RawJSON
        cases: list[tuple[Any, Any]] = [
            # what the fast path's check looks for, inside the text and outside it
            ({"a": None}, {"a": raw("null")}),
            ([{"x": None}, None], [raw('{"x":null}'), None]),
            ([1e-07, [0.00001]], [raw("1e-07"), [raw("1e-05")]]),
            ([1e-07, 1e-05], [raw("1e-07"), 1e-05]),
            (["null", 1e-9], [raw('"null"'), 1e-9]),
            # what the reference refuses, outside the text
            ([{"x": None}, math.nan], [raw('{"x":null}'), math.nan]),
            ([None, math.inf], [raw("null"), math.inf]),
            # what only the reference encodes, outside the text and inside it
            ([2**64, {"a": None}], [2**64, raw('{"a":null}')]),
            ([{"k": "\ud800"}], [raw('{"k":"\ud800"}')]),
            (["é", "\u2028"], [raw('"é"'), "\u2028"]),
            # a raw value that is no JSON value of ours: both refuse it alike
            ([object()], [object(), raw("1")]),
        ]
        for value, embedded in cases:
            self.assertSameAsValue(value, embedded)

    def test_raw_only_as_a_value(self) -> None:
        """As a key it is refused by both (as any object)."""
        self.assertRaises(TypeError, jsoncodec.encode, {jsoncodec.RawJSON('"k"'): 1})
        self.assertRaises(TypeError, reference_encode, {jsoncodec.RawJSON('"k"'): 1})

    def test_value_and_equality(self) -> None:
        raw = jsoncodec.RawJSON('{"a":[1,null]}')
        self.assertEqual(raw.value(), {"a": [1, None]})
        self.assertEqual(raw, jsoncodec.RawJSON('{"a":[1,null]}'))
        self.assertNotEqual(raw, {"a": [1, None]})
        self.assertEqual(len({raw, jsoncodec.RawJSON(raw.text)}), 1)


class RawJSONFastPathTests(SynchronousTestCase):
    """A reply of stored events never reaches the reference, whatever the events hold."""

    skip = NO_FAST_PATH if jsoncodec.BACKEND == "stdlib" else None

    def test_a_join_reply_with_nulls_in_its_events(self) -> None:
        def refuse(*args: Any) -> Any:
            raise AssertionError("the reference was used")

        events = [
            '{"jsonrpc":"2.0","method":"chat.message","params":{"room":"w:1",'
            f'"cursor":"e:1-{i}","data":{{"text":null,"t":1e-07,"x":[null]}}}}}}'
            for i in range(3)
        ]
        reply = {"jsonrpc": "2.0", "id": 3, "result": {
            "room": "w:1", "cursor": "e:1-2", "recovered": True,
            "missed": [jsoncodec.RawJSON(e) for e in events], "streaming": [],
        }}
        expected = reference_encode({**reply, "result": {
            **reply["result"], "missed": [json.loads(e) for e in events]}})
        for name in ("reference_decode", "reference_encode", "reference_text"):
            self.patch(jsoncodec, name, refuse)
        self.assertEqual(jsoncodec.encode(reply), expected)
