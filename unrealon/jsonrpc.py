"""
JSON-RPC 2.0 messages: parse what arrives, build what leaves.

Pure functions and values, no I/O, so the codec can be driven by property
tests.  Everything that goes on the wire is built here, which is how we make
sure no traceback or exception text ever reaches a client: error objects carry
only the fixed messages below and caller-chosen ``data``.
"""

from __future__ import annotations

import json
from typing import Any, Union

import attrs

JSONRPC = "2.0"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UNAUTHENTICATED = -32001
FORBIDDEN = -32003
NOT_FOUND = -32004
BACKEND_UNAVAILABLE = -32011
RATE_LIMITED = -32029

MESSAGES: dict[int, str] = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
    UNAUTHENTICATED: "Unauthenticated",
    FORBIDDEN: "Forbidden",
    NOT_FOUND: "Not found",
    BACKEND_UNAVAILABLE: "Backend unavailable",
    RATE_LIMITED: "Rate limited",
}

MAX_BATCH = 100

RequestId = Union[str, int, float, None]


class RPCError(Exception):
    """
    An error to be returned as a JSON-RPC error object.

    ``message`` defaults to the fixed text for ``code``; handlers may give a
    more precise message, which must be their own words, never exception text.
    """

    def __init__(
        self, code: int, message: str | None = None, data: Any = None
    ) -> None:
        self.code = code
        self.message = message if message is not None else MESSAGES.get(code, "Error")
        self.data = data
        super().__init__(code, self.message)

    def to_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@attrs.frozen
class FieldError:
    """One reason params were refused: which field, and why."""

    field: str
    message: str


def invalid_params(errors: list[FieldError]) -> RPCError:
    return RPCError(
        INVALID_PARAMS,
        data={"errors": [{"field": e.field, "message": e.message} for e in errors]},
    )


@attrs.frozen
class Request:
    """
    A well-formed request or notification.

    ``params`` is always a dict: absent params become ``{}``; positional
    params are refused during parsing (PROTOCOL.md: params are by name).
    """

    method: str
    params: dict[str, Any]
    id: RequestId = None
    is_notification: bool = False


@attrs.frozen
class Invalid:
    """An entry that could not be a request; answered with ``error``."""

    error: RPCError
    id: RequestId = None


Entry = Union[Request, Invalid]


@attrs.frozen
class Incoming:
    """
    One WebSocket message, parsed.

    ``entries`` holds one entry for a single message and each entry of a
    batch in order; ``is_batch`` says whether replies go back as an array.
    ``error`` is set when the message as a whole is refused (not JSON, empty
    or oversized batch) and then ``entries`` is empty.
    """

    entries: tuple[Entry, ...] = ()
    is_batch: bool = False
    error: RPCError | None = None


def _valid_id(value: Any) -> bool:
    # bool is an int subclass but not a valid JSON-RPC id.
    return value is None or (
        isinstance(value, (str, int, float)) and not isinstance(value, bool)
    )


def parse_entry(obj: Any) -> Entry:
    """Turn one decoded JSON value into a L{Request} or an L{Invalid}."""
    if not isinstance(obj, dict):
        return Invalid(RPCError(INVALID_REQUEST))
    raw_id = obj.get("id")
    echo_id = raw_id if _valid_id(raw_id) else None
    if obj.get("jsonrpc") != JSONRPC:
        return Invalid(RPCError(INVALID_REQUEST), echo_id)
    if not _valid_id(raw_id):
        return Invalid(RPCError(INVALID_REQUEST), None)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return Invalid(RPCError(INVALID_REQUEST), echo_id)
    params = obj.get("params", {})
    if isinstance(params, list):
        return Invalid(
            invalid_params([FieldError("params", "params must be given by name")]),
            echo_id,
        )
    if not isinstance(params, dict):
        return Invalid(RPCError(INVALID_REQUEST), echo_id)
    return Request(
        method=method, params=params, id=echo_id, is_notification="id" not in obj
    )


def decode_json(payload: bytes | str) -> Any:
    """
    Decode JSON text strictly: no NaN/Infinity, which are not JSON.

    Raises L{ValueError} (including L{UnicodeDecodeError}) on bad input.
    """
    return json.loads(payload, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_message(payload: bytes | str) -> Incoming:
    """Parse one WebSocket text message into entries to dispatch."""
    try:
        obj = decode_json(payload)
    except (ValueError, RecursionError):
        return Incoming(error=RPCError(PARSE_ERROR))
    if isinstance(obj, list):
        if not obj:
            return Incoming(error=RPCError(INVALID_REQUEST), is_batch=False)
        if len(obj) > MAX_BATCH:
            return Incoming(
                error=RPCError(
                    INVALID_REQUEST,
                    f"Invalid request: a batch holds at most {MAX_BATCH} entries",
                )
            )
        return Incoming(entries=tuple(parse_entry(o) for o in obj), is_batch=True)
    return Incoming(entries=(parse_entry(obj),))


def result_response(request_id: RequestId, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": request_id, "result": result}


def error_response(request_id: RequestId, error: RPCError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": request_id, "error": error.to_error()}


def notification(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "method": method, "params": params}


def encode(message: Any) -> bytes:
    """Compact UTF-8 JSON, the one encoding used for every frame we send."""
    return json.dumps(
        message, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")
