"""
The backend ingress wire format (PROTOCOL.md section 6): what a producer
appends to the ingress stream, and the reply a handling node pushes to its
C{reply_to} list.  Pure functions and values: the consumer in
L{unrealon.ingress} reads and writes Redis, this module only reads and
builds payloads.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

import attrs

from unrealon import jsonrpc
from unrealon.jsonrpc import RPCError


class Malformed(Exception):
    """The payload is not a request we can read."""


@attrs.frozen
class IngressRequest:
    method: str
    params: dict[str, Any]
    correlation_id: str | None
    reply_to: str | None
    timeout: float | None


def parse_payload(fields: Mapping[str, str]) -> IngressRequest:
    """The request in an entry's C{payload} field, or L{Malformed}."""
    raw = fields.get("payload")
    if raw is None:
        raise Malformed("entry has no payload field")
    try:
        obj = jsonrpc.decode_json(raw)
    except (ValueError, RecursionError):
        raise Malformed("payload is not JSON") from None
    if not isinstance(obj, dict):
        raise Malformed("payload is not a JSON object")
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise Malformed("payload has no method")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise Malformed("params is not a JSON object")
    reply_to = obj.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not reply_to):
        raise Malformed("reply_to is not a string")
    correlation_id = obj.get("correlation_id")
    if correlation_id is not None and not isinstance(correlation_id, str):
        correlation_id = str(correlation_id) if isinstance(correlation_id, int) else None
    timeout = obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise Malformed("timeout is not a positive number")
    return IngressRequest(method, params, correlation_id, reply_to, timeout)


def describe(error: RPCError) -> str:
    """An error's message for a reply or a dead letter, naming the fields at fault."""
    data = error.data if isinstance(error.data, dict) else {}
    errors = data.get("errors")
    if error.code == jsonrpc.INVALID_PARAMS and isinstance(errors, list) and errors:
        details = "; ".join(
            f"{e.get('field')}: {e.get('message')}" for e in errors[:10] if isinstance(e, dict)
        )
        return f"{error.message}: {details}"
    return error.message


def readable_reply_to(fields: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(reply_to, correlation_id) of a payload we could not fully read."""
    try:
        obj = json.loads(fields.get("payload") or "")
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    reply_to = obj.get("reply_to")
    correlation_id = obj.get("correlation_id")
    return (
        reply_to if isinstance(reply_to, str) and reply_to else None,
        correlation_id if isinstance(correlation_id, str) else None,
    )


def reply_body(
    correlation_id: str | None,
    now: float,
    *,
    result: Any = None,
    error: str | None = None,
    error_code: str | None = None,
) -> bytes:
    """The reply layout django-ipc style producers read (PROTOCOL.md section 6)."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
    ok = error_code is None
    return jsonrpc.encode(
        {
            "type": "response" if ok else "error",
            "correlation_id": correlation_id,
            "success": ok,
            "result": result if ok else None,
            "error": error,
            "error_code": error_code,
            "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
        }
    )


def error_code_name(error: RPCError) -> str:
    """The reply's C{error_code} for a JSON-RPC error."""
    return {
        jsonrpc.METHOD_NOT_FOUND: "method_not_found",
        jsonrpc.INVALID_PARAMS: "invalid_params",
        jsonrpc.INVALID_REQUEST: "invalid_params",
        jsonrpc.FORBIDDEN: "forbidden",
    }.get(error.code, "internal_error")
