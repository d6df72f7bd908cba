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
from typing import Any

#: which codec runs: "orjson <version>" or "stdlib"
BACKEND = "stdlib"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


# Built once: json.loads/dumps with options build a new coder per call (hot path).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


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
    _SHORT_EXPONENT = re.compile(rb"\de[-+]\d(?!\d)").search

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
        try:
            out: bytes = _dumps(value, option=_OPTIONS)
        except _JSONEncodeError:
            return None
        return None if _reference_differs(out) else out

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
