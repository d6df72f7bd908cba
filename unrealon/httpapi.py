"""
The HTTP server API: C{POST /api/<method>} (PROTOCOL.md section 8).

For producers that do not write to Redis, and for publishing in development
on the memory engine.  Every backend method of section 6 -- the catalogue
events, C{publish}, C{presence.list}, C{presence.online},
C{connections.disconnect} and the application's backend methods -- is
dispatched through the registry exactly as an ingress entry is (a
L{BackendCall}): the same validation, history, cursors and delivery on every
node, and the same result the stream reply would carry.

The order of the checks, each answered with its own status and a JSON
C{{"error": {"code", "message"}}} body:

  1. the API is off (no C{UNREALON_API_KEY}): 404;
  2. not POST: 405 with C{Allow: POST} (C{GET /api/openapi.json} is the
     document, L{unrealon.openapi}; it needs no key: it holds no secret and
     tools fetch it before they have one);
  3. C{Authorization: apikey <key>} missing or wrong: 401 with
     C{WWW-Authenticate: apikey}.  Keys are compared in constant time, the
     SHA-256 of the given key against that of every configured key (equal
     lengths, so not even the length leaks; no early exit on a match);
  4. no such backend method (a client-only name included): 404;
  5. not C{application/json} (a C{charset} parameter must say UTF-8): 415;
  6. a body over 1 MiB (L{unrealon.httpbody.BoundedRequest}): 413;
  7. a body that is not a JSON object, or an C{Idempotency-Key} that is not
     1-128 printable ASCII characters: 400 C{invalid_params};
  8. the call: 200 C{{"result": ...}}, or 400 C{invalid_params} with
     C{errors} (at most 20), 503 C{backend_unavailable} with C{retryable}
     when Redis does not answer (every call has a deadline: the reply comes
     within L{DEADLINE} seconds whatever happens), 500 C{internal_error}
     without exception text.

An C{Idempotency-Key} makes a retried request safe (L{unrealon.idempotency}):
its repeat within five minutes, on any node, gets the first reply and is not
handled again; a publish also passes the key to the broker, so it publishes
once even if the reply could not be stored.

Nothing here logs a key, a header value or a body: the site writes no access
log (L{unrealon.http.QuietSite}) and the only log lines name the method.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any
from urllib.parse import unquote

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from unrealon import jsonrpc
from unrealon.backendapi import BackendCall
from unrealon.httpbody import MAX_BODY, TOO_LARGE_BODY
from unrealon.idempotency import (
    IReplyStore,
    MemoryReplyStore,
    StoredReply,
    claim_or_wait,
    scoped_key,
)
from unrealon.jsonrpc import RPCError
from unrealon.node import Node
from unrealon.openapi import openapi_document
from unrealon.rpc import Caller, MethodSpec

log = Logger(namespace="unrealon.httpapi")

#: every reply within this many seconds (PROTOCOL.md: 503 within 5 s)
DEADLINE = 4.0
#: what storing or releasing an idempotency record may add to the deadline
STORE_GRACE = 0.5
MAX_FIELD_ERRORS = 20
#: the shortest time between two "backend unavailable" warnings
WARNING_INTERVAL = 30.0
_IDEMPOTENCY_KEY_RE = re.compile(rb"^[\x20-\x7e]{1,128}$")
#: outcomes that mean "not handled": their idempotency record is released,
#: so a corrected or later retry is handled
_NOT_HANDLED = frozenset({400, 404, 503})


@attrs.frozen
class Reply:
    """A reply: status, JSON body bytes, extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


def error_reply(
    status: int,
    code: str,
    message: str,
    *,
    errors: list[dict[str, str]] | None = None,
    retryable: bool | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> Reply:
    """C{{"error": {"code", "message", ...}}} (PROTOCOL.md section 8)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if errors is not None:
        error["errors"] = [
            {"field": _clip(e.get("field")), "message": _clip(e.get("message"))}
            for e in errors[:MAX_FIELD_ERRORS]
        ]
    if retryable is not None:
        error["retryable"] = retryable
    return Reply(status, jsonrpc.encode({"error": error}), headers)


def _clip(value: Any, limit: int = 200) -> str:
    """A field name or message for a reply, bounded (names come from the body)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invalid(field: str, message: str) -> Reply:
    return error_reply(400, "invalid_params", f"Invalid params: {field} {message}",
                       errors=[{"field": field, "message": message}])


def rpc_error_reply(error: RPCError) -> Reply:
    """The HTTP reply of a method's JSON-RPC error."""
    code = error.code
    if code in (jsonrpc.INVALID_PARAMS, jsonrpc.INVALID_REQUEST):
        data = error.data if isinstance(error.data, dict) else {}
        raw = data.get("errors")
        errors = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
        details = "; ".join(f"{_clip(e.get('field'))}: {_clip(e.get('message'))}"
                            for e in errors[:5])
        message = f"Invalid params: {details}" if details else "Invalid params"
        return error_reply(400, "invalid_params", message, errors=errors)
    if code == jsonrpc.METHOD_NOT_FOUND:
        return error_reply(404, "method_not_found", "No such backend method")
    if code == jsonrpc.BACKEND_UNAVAILABLE:
        return _unavailable("Redis is unreachable; retry")
    if code in (jsonrpc.FORBIDDEN, jsonrpc.UNAUTHENTICATED):
        return error_reply(403, "forbidden", error.message)
    if code == jsonrpc.NOT_FOUND:
        return error_reply(404, "not_found", error.message)
    if code == jsonrpc.INTERNAL_ERROR:
        return error_reply(500, "internal_error", "Internal error")
    # an application's own code: its message is its own words, never exception text
    return error_reply(500, "internal_error", error.message)


def _unavailable(message: str) -> Reply:
    return error_reply(503, "backend_unavailable", message, retryable=True)


def _is_json(request: Request) -> bool:
    """Content-Type is application/json; a charset, if any, says UTF-8."""
    values = request.requestHeaders.getRawHeaders(b"content-type") or []
    if len(values) != 1:
        return False
    media, *parameters = values[0].split(b";")
    if media.strip().lower() != b"application/json":
        return False
    for parameter in parameters:
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"charset" and value.strip().strip(b'"').lower() not in (
            b"utf-8", b"utf8"
        ):
            return False
    return True


def too_large_reply() -> Reply:
    return Reply(413, TOO_LARGE_BODY)


def _key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiResource(Resource):
    """C{/api}: C{POST /api/<method>} and C{GET /api/openapi.json}."""

    isLeaf = True

    def __init__(self, node: Node, store: IReplyStore | None = None) -> None:
        super().__init__()
        self._node = node
        self._store: IReplyStore = store if store is not None else MemoryReplyStore(node.reactor)
        self._key_digests = tuple(_key_digest(k.encode()) for k in node.config.api_keys)
        self._openapi: bytes | None = None
        self._last_warning = float("-inf")
        self._unwarned = 0

    # -- twisted.web -----------------------------------------------------------------

    def render(self, request: Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = Deferred.fromCoroutine(self.answer(request))

        def write(outcome: tuple[str, Reply]) -> None:
            label, reply = outcome
            self._node.metrics.api_requests.labels(method=label, status=str(reply.status)).inc()
            if gone:
                return
            request.setResponseCode(reply.status)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            for name, value in reply.headers:
                request.setHeader(name, value)
            request.setHeader(b"content-length", b"%d" % len(reply.body))
            request.write(reply.body)
            request.finish()

        def failed(failure: Failure) -> None:
            # answer() catches everything it expects; this is a bug, and its
            # text stays in the log (which never holds a key or a body)
            log.failure("HTTP API request failed", failure)
            write(("other", error_reply(500, "internal_error", "Internal error")))

        d.addCallbacks(write, failed)
        return NOT_DONE_YET

    # -- the checks, in order ----------------------------------------------------------

    async def answer(self, request: Request) -> tuple[str, Reply]:
        """(metrics label, reply) of one request."""
        if not self._key_digests:
            return "other", error_reply(
                404, "method_not_found",
                "The HTTP API is off: the server has no UNREALON_API_KEY",
            )
        segments = request.postpath or []
        name = unquote(segments[0].decode("utf-8", "replace")) if len(segments) == 1 else ""
        if name == "openapi.json" and request.method in (b"GET", b"HEAD"):
            return "openapi.json", Reply(200, self.openapi())
        if request.method != b"POST":
            return "other", error_reply(
                405, "method_not_allowed", "Use POST /api/<method>",
                headers=((b"allow", b"POST"),),
            )
        if not self.authorized(request):
            return "other", error_reply(
                401, "unauthorized",
                "A valid API key is required: Authorization: apikey <key>",
                headers=((b"www-authenticate", b"apikey"),),
            )
        spec = self.backend_method(name)
        if spec is None:
            return "other", error_reply(404, "method_not_found", "No such backend method")
        if not _is_json(request):
            return spec.name, error_reply(
                415, "unsupported_media_type", "The body must be application/json"
            )
        if getattr(request, "too_large", False):
            return spec.name, too_large_reply()
        body = request.content.read() if request.content is not None else b""
        if len(body) > MAX_BODY:  # a request class that did not bound it
            return spec.name, too_large_reply()
        try:
            params = jsonrpc.decode_json(body)
        except (ValueError, RecursionError):
            params = None
        if not isinstance(params, dict):
            return spec.name, _invalid("body", "must be a JSON object (the method's params)")
        idempotency = request.requestHeaders.getRawHeaders(b"idempotency-key")
        if idempotency is not None and (
            len(idempotency) != 1 or not _IDEMPOTENCY_KEY_RE.match(idempotency[0])
        ):
            return spec.name, _invalid(
                "Idempotency-Key", "must be one header of 1-128 printable ASCII characters"
            )
        deadline = self._node.reactor.seconds() + DEADLINE
        if idempotency is None:
            return spec.name, await self.call(spec, params, None, deadline)
        key = scoped_key(spec.name, idempotency[0].decode("ascii"))
        return spec.name, await self.call_once(spec, params, key, deadline)

    def authorized(self, request: Request) -> bool:
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            return False
        scheme, _, given = values[0].strip().partition(b" ")
        if scheme.lower() != b"apikey":
            return False
        digest = _key_digest(given.strip())
        match = False
        for configured in self._key_digests:  # every one: no early exit
            match |= hmac.compare_digest(configured, digest)
        return match

    def backend_method(self, name: str) -> MethodSpec[Any] | None:
        try:
            return self._node.registry.lookup(name, Caller.BACKEND)
        except RPCError:
            return None

    def openapi(self) -> bytes:
        if self._openapi is None:
            self._openapi = jsonrpc.encode(
                openapi_document(self._node.registry, version=self._node.version)
            )
        return self._openapi

    # -- the call ------------------------------------------------------------------------

    async def call(
        self, spec: MethodSpec[Any], params: dict[str, Any], key: str | None, deadline: float
    ) -> Reply:
        """Run the method as the ingress would, bounded by C{deadline}."""
        node = self._node
        d = node.registry.dispatch(spec, BackendCall(node, request_key=key), params)
        d.addTimeout(max(0.001, deadline - node.reactor.seconds()), node.reactor)
        try:
            result = await d
        except RPCError as e:
            reply = rpc_error_reply(e)
        except TimeoutError:
            reply = _unavailable(f"No answer within {DEADLINE:g} s (is Redis reachable?); retry")
        except Exception:
            # the registry turns handler failures into RPCError; this is ours
            log.failure("HTTP API call of {method} failed", method=spec.name)
            reply = error_reply(500, "internal_error", "Internal error")
        else:
            return Reply(200, jsonrpc.encode({"result": result}))
        if reply.status == 503:
            self._warn_unavailable(spec.name, "backend unavailable")
        return reply

    def _warn_unavailable(self, method: str, what: str) -> None:
        """A warning at most every L{WARNING_INTERVAL} s: an outage must not flood the log."""
        now = self._node.reactor.seconds()
        if now - self._last_warning < WARNING_INTERVAL:
            self._unwarned += 1
            return
        log.warn("HTTP API call of {method}: {what} (and {more} more 503s since the last warning)",
                 method=method, what=what, more=self._unwarned)
        self._last_warning, self._unwarned = now, 0

    async def call_once(
        self, spec: MethodSpec[Any], params: dict[str, Any], key: str, deadline: float
    ) -> Reply:
        """L{call} under an idempotency key: handled once, its reply replayed."""
        clock = self._node.reactor
        token = secrets.token_hex(16)
        try:
            claim = await claim_or_wait(self._store, key, token, clock, deadline)
        except Exception as e:
            self._warn_unavailable(spec.name, f"idempotency record unavailable ({type(e).__name__})")
            return _unavailable("Redis is unreachable; retry")
        if claim.reply is not None:
            return Reply(claim.reply.status, claim.reply.body,
                         ((b"idempotent-replayed", b"true"),))
        if not claim.mine:
            return error_reply(
                409, "conflict",
                "A request with this Idempotency-Key is still being handled; retry",
                retryable=True,
            )
        reply = await self.call(spec, params, key, deadline)
        if reply.status in _NOT_HANDLED:
            d = self._store.release(key, token)
        else:
            d = self._store.finish(key, token, StoredReply(reply.status, reply.body))
        d.addTimeout(max(0.001, deadline + STORE_GRACE - clock.seconds()), clock)
        try:
            await d
        except Exception as e:
            # the reply stands; a retry may find the key still held until it expires
            log.warn("HTTP API call of {method}: idempotency record not updated ({error})",
                     method=spec.name, error=type(e).__name__)
        return reply
