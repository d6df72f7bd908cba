"""
The one JSON codec of the server: every frame's text is decoded and encoded
here, with orjson when it is installed and the standard library otherwise.

The wire does not depend on which one runs.  The standard library's output
is the reference (it was the only codec before, and clients and tests were
written against it); orjson is used only where its answer is provably the
same, and every input it would treat differently goes to the reference
path:

  - decoding: orjson refuses lone surrogate escapes (C{"\\ud800"}, which JSON
    allows and an id may hold) and nests at most 1,024 deep; any input it
    refuses is decoded again by the reference, which accepts or refuses it
    with its own error.  orjson reads an integer outside 64 bits as a
    float (the reference keeps it exact): a payload with a run of 19 or more
    digits goes to the reference first.
  - encoding: orjson writes NaN and infinity as C{null} (the reference
    refuses them), C{1e-07} as C{1e-7} and C{1e-05} as C{0.00001}: output
    holding C{null}, an exponent of one digit or C{0.0000} is encoded again
    by the reference.  It refuses integers outside 64 bits, lone
    surrogates and non-string keys, which the reference encodes: those go
    to the reference too.  Subclasses of C{str}, C{int}, C{dict} and
    C{list}, dataclasses and datetimes are passed to the reference as well
    (orjson would serialize some of them its own way).

A L{RawJSON} (JSON text this codec made, such as a stored notification) is
embedded as it is: orjson copies it (C{orjson.Fragment}), the reference
decodes it and encodes the value, which gives the same text back.  What
C{_reference_differs} looks for inside such a text was checked when the
text was made: only a match outside it sends a message to the reference.

One difference remains, outside JSON's types: orjson encodes a C{uuid.UUID}
and an C{enum.Enum} member that is not an C{int} or C{str}, which the
reference refuses.  Only an application method could return one; it now
gets the UUID's text or the member's value instead of -32603.

C{tests/test_jsoncodec.py} holds both codecs to the same bytes and values
over the contract's edge cases and generated values.  Measured on this
machine (C{bench/codec.py}, microseconds, reference -> here): decoding a
ping 1.0 -> 0.5, a join 1.3 -> 1.0; encoding a ping reply 1.7 -> 0.9, an
event 2.8 -> 1.3; a reply holding C{null} is encoded twice (2.2 -> 2.5).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, final

#: which codec runs: "orjson <version>" or "stdlib"
BACKEND = "stdlib"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


@final
class RawJSON:
    """
    JSON text that this codec made (L{text} or L{encode} of a value), to be
    embedded in a message as it is, without decoding it and encoding it
    again: a rejoin's replayed events are the notifications stored in Redis.

    Only text this codec made (or spliced from pieces it made, as the
    publish script does) may be wrapped: the reference path decodes it and
    encodes the value again, and the fast path copies it, and the two agree
    only because encoding what decoding that text gave gives the text back.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def value(self) -> Any:
        """The JSON value the text holds."""
        return decode(self.text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawJSON) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"RawJSON({self.text!r})"


def _raw_value(value: Any) -> Any:
    """The reference's hook for what it cannot encode: a L{RawJSON}'s value."""
    if value.__class__ is RawJSON:
        return decode(value.text)
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


# Built once: json.loads/dumps with options build a new coder per call (hot path).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_raw_value
)
_ASCII_ENCODER = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_raw_value
)


def reference_decode(payload: bytes | str) -> Any:
    """The standard library's strict decode (see L{decode})."""
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8")
    return _DECODER.decode(payload)


def reference_encode(value: Any) -> bytes:
    """The standard library's compact UTF-8 encoding (see L{encode})."""
    text = _ENCODER.encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _ASCII_ENCODER.encode(value).encode("ascii")


def reference_text(value: Any) -> str:
    """Compact JSON text with non-ASCII kept (not yet UTF-8)."""
    return _ENCODER.encode(value)


decode: Callable[[bytes | str], Any] = reference_decode
encode: Callable[[Any], bytes] = reference_encode
text: Callable[[Any], str] = reference_text

try:
    import orjson
except ImportError:  # the fallback is the reference itself: nothing to count
    orjson = None  # type: ignore[assignment]

if orjson is not None:
    BACKEND = f"orjson {orjson.__version__}"
    _loads = orjson.loads
    _dumps = orjson.dumps
    _OPTIONS = (
        orjson.OPT_PASSTHROUGH_SUBCLASS
        | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_DATETIME
    )
    _JSONDecodeError = orjson.JSONDecodeError
    _JSONEncodeError = orjson.JSONEncodeError
    # An integer literal orjson might read as a float has 19 digits or more.
    # Finding such a run with a regex costs 8 ns a byte here; bytes.translate
    # and `in` run in C at well under 1 ns a byte: count the digits first
    # (most messages have fewer than 19 in all), then look for the run in
    # the payload mapped to 0 (other) and 1 (digit).
    _NOT_DIGITS = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)
    _DIGIT_MAP = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
    _DIGIT_RUN = b"1" * 19

    def _may_hold_a_long_integer(payload: bytes) -> bool:
        if len(payload.translate(None, _NOT_DIGITS)) < 19:
            return False
        return _DIGIT_RUN in payload.translate(_DIGIT_MAP)

    #: an exponent of one digit (orjson 1e-7, the reference 1e-07)
    _SHORT_EXPONENT_RE = rb"\de[-+]\d(?!\d)"
    _SHORT_EXPONENT = re.compile(_SHORT_EXPONENT_RE).search
    _SHORT_EXPONENTS = re.compile(_SHORT_EXPONENT_RE).findall
    _SHORT_EXPONENTS_TEXT = re.compile(_SHORT_EXPONENT_RE.decode()).findall
    _Fragment = orjson.Fragment
    #: how many L{RawJSON} orjson has embedded (see L{_orjson_bytes})
    _embedded = [0]

    def _fragment(value: Any) -> Any:
        """orjson's hook for what it cannot encode: a L{RawJSON} goes in as it is."""
        if value.__class__ is RawJSON:
            _embedded[0] += 1
            return _Fragment(value.text)
        raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")

    def _raw_texts(value: Any, into: list[str]) -> list[str]:
        """The texts of the L{RawJSON} in C{value}, where orjson looks for them."""
        cls = value.__class__
        if cls is RawJSON:
            into.append(value.text)
        elif cls is dict:
            for item in value.values():
                _raw_texts(item, into)
        elif cls is list or cls is tuple:
            for item in value:
                _raw_texts(item, into)
        return into

    def _differs_outside(out: bytes, raw: list[str]) -> bool:
        """
        Whether L{_reference_differs} finds what it looks for in C{out}
        outside the embedded texts C{raw}, which this codec made (a C{null}
        there is a None, not a NaN).  A text is a whole JSON value between
        delimiters, so no match runs across its edges, and a match counted
        in C{out} and not in the texts is outside them.
        """
        for needle in ("null", "0.0000"):
            found = out.count(needle.encode())
            if found and found != sum(t.count(needle) for t in raw):
                return True
        if b"e-" in out or b"e+" in out:
            found = len(_SHORT_EXPONENTS(out))
            if found and found != sum(len(_SHORT_EXPONENTS_TEXT(t)) for t in raw):
                return True
        return False

    def _reference_differs(out: bytes) -> bool:
        """
        Whether the reference may write C{out}'s value otherwise: C{null}
        (NaN or infinity, which it refuses), a float below 1e-4 (orjson
        0.00001, the reference 1e-05) or an exponent of one digit.  Plain
        substring tests first: they run in C, a regex runs per byte.
        """
        return (
            b"null" in out
            or b"0.0000" in out
            or ((b"e-" in out or b"e+" in out) and _SHORT_EXPONENT(out) is not None)
        )

    def _fast_decode(payload: bytes | str) -> Any:
        """
        Decode JSON text strictly: UTF-8 only, no NaN/Infinity, which are
        not JSON, and no number too large for a float (C{1e999} would become
        infinity, which no reply could echo).

        Raises L{ValueError} (including L{UnicodeDecodeError}) on bad input.
        """
        if isinstance(payload, str):
            # (an ingress entry's field): the checks below work on bytes
            try:
                data = payload.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: the reference decides
                return reference_decode(payload)
        else:
            data = payload
        if _may_hold_a_long_integer(data):
            return reference_decode(payload)
        try:
            return _loads(data)
        except _JSONDecodeError:
            # orjson refuses more than the reference (lone surrogate
            # escapes, deep nesting): the reference decides.
            return reference_decode(payload)

    def _orjson_bytes(value: Any) -> bytes | None:
        """orjson's encoding of C{value}, or None where the reference would differ."""
        embedded = _embedded[0]
        try:
            out: bytes = _dumps(value, default=_fragment, option=_OPTIONS)
        except _JSONEncodeError:
            return None
        if not _reference_differs(out):
            return out
        if _embedded[0] == embedded:  # (another thread's count only costs a look)
            return None
        raw = _raw_texts(value, [])
        return None if not raw or _differs_outside(out, raw) else out

    def _fast_encode(value: Any) -> bytes:
        """
        Compact UTF-8 JSON, the one encoding used for every frame we send.

        A string with a lone surrogate (JSON allows C{"\\ud800"}, and so an
        id may hold one) cannot be UTF-8: such a message is written with
        C{\\u} escapes instead, which still reads back as the very same
        string.  Raises L{TypeError} or L{ValueError} for values JSON cannot
        carry.
        """
        out = _orjson_bytes(value)
        return reference_encode(value) if out is None else out

    def _fast_text(value: Any) -> str:
        """Compact JSON text with non-ASCII kept, as L{reference_text}."""
        out = _orjson_bytes(value)
        return reference_text(value) if out is None else out.decode("utf-8")

    decode = _fast_decode
    encode = _fast_encode
    text = _fast_text
