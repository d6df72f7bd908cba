"""
JSON-RPC 2.0 messages: parse what arrives, build what leaves.

Pure functions and values, no I/O, so the codec can be driven by property
tests.  Everything that goes on the wire is built here, which is how we make
sure no traceback or exception text ever reaches a client: error objects carry
only the fixed messages below and caller-chosen C{data}.
"""

from __future__ import annotations

from typing import Any, Union

import attrs

from unrealon import jsoncodec

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
#: backend methods (PROTOCOL.md section 9.3)
DEADLINE_EXCEEDED = -32012
NO_WORKER = -32013
CANCELLED = -32014
WORKER_LOST = -32015
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
    DEADLINE_EXCEEDED: "Backend deadline exceeded",
    NO_WORKER: "No backend worker",
    CANCELLED: "Cancelled",
    WORKER_LOST: "Backend worker lost",
    RATE_LIMITED: "Rate limited",
}

MAX_BATCH = 100
#: entries of C{data.errors} at most (PROTOCOL.md section 3: errors stay small)
MAX_ERRORS = 20
#: characters of a field path shown in C{data.errors}; longer ones are cut
MAX_FIELD = 200

RequestId = Union[str, int, float, None]


class RPCError(Exception):
    """
    An error to be returned as a JSON-RPC error object.

    C{message} defaults to the fixed text for C{code}; handlers may give a
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
    """-32602 listing the first L{MAX_ERRORS} problems (field paths cut at L{MAX_FIELD})."""
    return RPCError(
        INVALID_PARAMS,
        data={
            "errors": [
                {"field": _cut(e.field), "message": e.message} for e in errors[:MAX_ERRORS]
            ]
        },
    )


def _cut(field: str) -> str:
    # a field path may hold a client's key: keep the reply small whatever it sent
    return field if len(field) <= MAX_FIELD else field[: MAX_FIELD - 3] + "..."


@attrs.frozen
class Request:
    """
    A well-formed request or notification.

    C{params} is a dict (absent params become C{{}}), or the list of
    positional params, which dispatch refuses with -32602 (PROTOCOL.md: params
    are by name).  They are not refused here: a request with positional
    params is still a request (it is rate limited, needs authentication, and
    as a notification gets no reply), and a name clients may not call must
    get -32601 whatever its params.
    """

    method: str
    params: dict[str, Any] | list[Any]
    id: RequestId = None
    is_notification: bool = False


@attrs.frozen
class Invalid:
    """An entry that could not be a request; answered with C{error}."""

    error: RPCError
    id: RequestId = None


Entry = Union[Request, Invalid]


@attrs.frozen
class Incoming:
    """
    One WebSocket message, parsed.

    C{entries} holds one entry for a single message and each entry of a
    batch in order; C{is_batch} says whether replies go back as an array.
    C{error} is set when the message as a whole is refused (not JSON, empty
    or oversized batch) and then C{entries} is empty.
    """

    entries: tuple[Entry, ...] = ()
    is_batch: bool = False
    error: RPCError | None = None


def valid_id(value: Any) -> bool:
    """Whether C{value} may be a JSON-RPC id (and so is echoed)."""
    # bool is an int subclass but not a valid JSON-RPC id.
    return value is None or (
        isinstance(value, (str, int, float)) and not isinstance(value, bool)
    )


def parse_entry(obj: Any) -> Entry:
    """Turn one decoded JSON value into a L{Request} or an L{Invalid}."""
    if not isinstance(obj, dict):
        return Invalid(RPCError(INVALID_REQUEST))
    raw_id = obj.get("id")
    echo_id = raw_id if valid_id(raw_id) else None
    if obj.get("jsonrpc") != JSONRPC:
        return Invalid(RPCError(INVALID_REQUEST), echo_id)
    if not valid_id(raw_id):
        return Invalid(RPCError(INVALID_REQUEST), None)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return Invalid(RPCError(INVALID_REQUEST), echo_id)
    params = obj.get("params", {})
    if not isinstance(params, (dict, list)):
        return Invalid(RPCError(INVALID_REQUEST), echo_id)
    return Request(
        method=method, params=params, id=echo_id, is_notification="id" not in obj
    )


#: strict decode, UTF-8 only, no NaN/Infinity or numbers beyond a float;
#: raises L{ValueError} (L{unrealon.jsoncodec.decode})
decode_json = jsoncodec.decode


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


_RATE_LIMITED_HEAD = b'{"jsonrpc":"2.0","id":'
_RATE_LIMITED_TAIL = b',"error":{"code":-32029,"message":"Rate limited","data":{"retry_after_ms":%d}}}'


def rate_limited_reply(request_id: RequestId, retry_after_ms: int) -> bytes:
    """
    The encoded -32029 reply, built from a template: refusing a message must
    cost far less than handling one (PROTOCOL.md section 3), and this is the
    reply a flood gets.
    """
    if type(request_id) is int:
        text = b"%d" % request_id
    elif request_id is None:
        text = b"null"
    else:
        text = encode(request_id)
    return _RATE_LIMITED_HEAD + text + _RATE_LIMITED_TAIL % retry_after_ms


def notification(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "method": method, "params": params}


#: compact UTF-8 JSON, the one encoding of every frame we send; raises
#: L{TypeError} or L{ValueError} for values JSON cannot carry
#: (L{unrealon.jsoncodec.encode})
encode = jsoncodec.encode
