"""
The client-side JSON-RPC dispatcher: one text message in, its replies out.

Transport-free: L{Dispatcher.message} takes the message's bytes and the
connection it came from (L{IClientSession}), and answers by calling the
connection's C{send_payload}; nothing here knows about frames or sockets,
so it is tested without either.  In order, for every message (PROTOCOL.md
section 3): the rate guard's verdict (every message counts, a batch's
entries one by one; a refusal is answered from a template without reading
more of the message than its id), parsing, the authentication gate, the
method lookup, params validation and the handler (L{unrealon.rpc}), then
the reply, with error replies kept within the message's size plus 1 KiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from unrealon import closecodes, jsonrpc
from unrealon.jsonrpc import RPCError
from unrealon.limits import RateGuard, Verdict
from unrealon.node import Node
from unrealon.rpc import Caller, MethodSpec

log = Logger(namespace="unrealon.dispatch")

#: an error reply is never larger than the message that caused it plus this
ERROR_REPLY_ALLOWANCE = 1024

#: what a connection may call before it is authenticated (PROTOCOL.md section 2)
_BEFORE_AUTHENTICATION = frozenset({"auth.authenticate", "system.ping"})


class IClientSession(Interface):
    """What the dispatcher and the client method handlers need from a connection."""

    conn_id = Attribute("the connection's id, unique on this node")
    identity = Attribute("the authenticated L{unrealon.auth.Identity}, or None")
    membership = Attribute("the connection's L{unrealon.membership.RoomMembership}")

    def send_payload(payload: bytes) -> None:
        """Send one encoded JSON text message."""

    def close_with(code: int, reason: str) -> None:
        """Close with an application close code."""

    def authenticate(identity: Any) -> None:
        """C{auth.authenticate} succeeded: the connection is now C{identity}'s."""

    def refresh(identity: Any) -> list[str]:
        """A newer token of the same user; returns the rooms it no longer grants."""


class ClientCall:
    """
    What a client method handler is given: the calling session, the node,
    and a way to act once the reply has been written (a join releases the
    live events it held back only after its reply, so nothing overtakes it).
    """

    __slots__ = ("_after", "node", "session")
    caller = Caller.CLIENT

    def __init__(self, session: IClientSession, node: Node) -> None:
        self.session = session
        self.node = node
        self._after: list[Callable[[], None]] | None = None

    def after_reply(self, action: Callable[[], None]) -> None:
        if self._after is None:
            self._after = []
        self._after.append(action)

    def run_after_reply(self) -> None:
        actions, self._after = self._after, None
        for action in actions or ():
            action()


class Dispatcher:
    """Runs the client methods of one node for the messages its connections send."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._registry = node.registry
        self._metrics = node.metrics

    def message(self, payload: bytes, session: IClientSession, guard: RateGuard) -> None:
        """Handle one text message of C{session}; its replies go to C{session.send_payload}."""
        # the message's own token (a batch's first entry: the others take theirs)
        verdict = guard.admit()
        if verdict is not Verdict.HANDLE and self._refused_cheaply(payload, session, guard,
                                                                   verdict):
            return
        limit = len(payload) + ERROR_REPLY_ALLOWANCE
        incoming = jsonrpc.parse_message(payload)
        if incoming.error is not None:
            # not JSON, or not a usable batch: one message
            if verdict is Verdict.HANDLE:
                session.send_payload(jsonrpc.encode(jsonrpc.error_response(None, incoming.error)))
            else:
                self._refuse(session, guard, None, False, verdict)
            return
        if incoming.is_batch:
            self._batch(incoming.entries, session, guard, verdict, limit)
            return
        # the common case, and synchronous handlers answer without a Deferred
        call = ClientCall(session, self._node)
        reply = self._handle(incoming.entries[0], call, limit)
        if isinstance(reply, Deferred):
            reply.addCallback(self._send_single, call)
            reply.addErrback(_reply_failed)
        else:
            self._send_single(reply, call)

    # -- refusals -------------------------------------------------------------------

    def _refused_cheaply(
        self, payload: bytes, session: IClientSession, guard: RateGuard, verdict: Verdict
    ) -> bool:
        """
        Refuse a single message over the rate limit, reading no more of it
        than its id: no entry objects, no lookup, no params.  A batch is
        not refused here (each entry counts and is answered on its own):
        returns False for one.
        """
        start = payload[:1]
        if start.isspace():
            start = payload.lstrip()[:1]
        if start == b"[":
            return False
        request_id: jsonrpc.RequestId = None
        if start == b"{":
            try:
                message = jsonrpc.decode_json(payload)
            except (ValueError, RecursionError):
                message = None
            if isinstance(message, dict):
                if "id" in message:
                    raw = message["id"]
                    request_id = raw if jsonrpc.valid_id(raw) else None
                elif message.get("jsonrpc") == "2.0" and isinstance(message.get("method"), str):
                    self._refuse(session, guard, None, True, verdict)  # a notification: dropped
                    return True
        self._refuse(session, guard, request_id, False, verdict)
        return True

    def _refuse(
        self,
        session: IClientSession,
        guard: RateGuard,
        request_id: jsonrpc.RequestId,
        notification: bool,
        verdict: Verdict,
    ) -> None:
        """
        A message over the rate limit: -32029 unless it is a notification,
        then 4029 if the guard says so.  Nothing else is done for it: this
        is the path a flood takes, and it must stay cheap.
        """
        self._metrics.rate_limited.inc()
        if not notification:
            session.send_payload(jsonrpc.rate_limited_reply(request_id, guard.retry_after_ms()))
        if verdict is Verdict.CLOSE:
            _close_for_abuse(session)

    # -- batches ---------------------------------------------------------------------

    def _batch(
        self,
        entries: tuple[jsonrpc.Entry, ...],
        session: IClientSession,
        guard: RateGuard,
        first: Verdict,
        limit: int,
    ) -> None:
        """A batch: each entry counts on its own; refused ones are answered -32029 in place."""
        calls: list[ClientCall] = []
        replies: list[Any] = []
        abuse = False
        for i, entry in enumerate(entries):
            verdict = guard.admit() if i else first
            if verdict is Verdict.HANDLE:
                call = ClientCall(session, self._node)
                calls.append(call)
                replies.append(self._handle(entry, call, limit))
                continue
            self._metrics.rate_limited.inc()
            abuse = abuse or verdict is Verdict.CLOSE
            if not _is_notification(entry):
                error = RPCError(
                    jsonrpc.RATE_LIMITED, data={"retry_after_ms": guard.retry_after_ms()}
                )
                replies.append(jsonrpc.error_response(entry.id, error))
        if abuse:
            calls.append(ClientCall(session, self._node))
            calls[-1].after_reply(lambda: _close_for_abuse(session))
        if any(isinstance(r, Deferred) for r in replies):
            d = gatherResults(
                [r if isinstance(r, Deferred) else succeed(r) for r in replies],
                consumeErrors=True,
            )
            d.addCallback(self._send_batch, calls)
            d.addErrback(_reply_failed)
        else:
            self._send_batch(replies, calls)

    # -- one entry ----------------------------------------------------------------------

    def _handle(self, entry: jsonrpc.Entry, call: ClientCall, limit: int) -> Any:
        """One entry: its reply object (None for a notification), or a Deferred of it."""
        if isinstance(entry, jsonrpc.Invalid):
            return jsonrpc.error_response(entry.id, entry.error)
        try:
            spec = self._admit(entry, call.session)
        except RPCError as e:
            if e.code == jsonrpc.METHOD_NOT_FOUND and self._node.backend is not None:
                return self._backend_call(entry, call, limit)
            self._metrics.call_outcome("-", str(e.code))
            return None if entry.is_notification else jsonrpc.error_response(entry.id, e)
        reply = _Reply(self._metrics, entry, spec.name, limit)
        try:
            result = self._registry.invoke(spec, call, entry.params)
        except RPCError as e:
            return reply.refused(e)
        if isinstance(result, Deferred):
            return result.addCallbacks(reply.done, reply.failed)
        return reply.done(result)

    def _backend_call(self, entry: jsonrpc.Request, call: ClientCall, limit: int) -> Any:
        """
        A name the server does not register, from an authenticated
        connection: perhaps a backend method (PROTOCOL.md section 9.3).
        Its reply, or a Deferred of it; the backend's own refusals as errors.
        """
        assert self._node.backend is not None
        reply = _Reply(self._metrics, entry, entry.method, limit)
        try:
            d = self._node.backend.call(
                call.session, entry.method, entry.params, entry.id, entry.is_notification
            )
        except RPCError as e:
            if e.code == jsonrpc.METHOD_NOT_FOUND:
                # counted as "-": clients choose these names, and labels must stay few
                reply = _Reply(self._metrics, entry, "-", limit)
            return reply.refused(e)
        return d.addCallbacks(reply.done, reply.failed)

    def _admit(self, entry: jsonrpc.Request, session: IClientSession) -> MethodSpec[Any]:
        """The authentication gate, then the lookup (-32001, -32601)."""
        if session.identity is None:
            if entry.method not in _BEFORE_AUTHENTICATION:
                raise RPCError(jsonrpc.UNAUTHENTICATED)
            spec = self._registry.lookup(entry.method, Caller.CLIENT)
            if spec.requires_auth:
                raise RPCError(jsonrpc.UNAUTHENTICATED)
            return spec
        return self._registry.lookup(entry.method, Caller.CLIENT)

    # -- replies ---------------------------------------------------------------------------

    def _send_single(self, reply: Any, call: ClientCall) -> None:
        if reply is not None:
            call.session.send_payload(encode_reply(reply))
        call.run_after_reply()

    def _send_batch(self, replies: list[Any], calls: list[ClientCall]) -> None:
        answered = [r for r in replies if r is not None]
        if answered and calls:
            calls[0].session.send_payload(encode_reply(answered))
        for call in calls:
            call.run_after_reply()


class _Reply:
    """
    What the outcome of one handled entry becomes: its reply object (None
    for a notification, errors kept within C{limit} bytes) and its count
    in the call metrics, under C{name}.
    """

    __slots__ = ("_entry", "_limit", "_metrics", "_name", "_started")

    def __init__(self, metrics: Any, entry: jsonrpc.Request, name: str, limit: int) -> None:
        self._metrics = metrics
        self._entry = entry
        self._name = name
        self._limit = limit
        self._started = time.perf_counter()

    def done(self, result: Any) -> Any:
        self._metrics.call_outcome(self._name, "ok")
        self._metrics.call_seconds.observe(time.perf_counter() - self._started)
        entry = self._entry
        return None if entry.is_notification else jsonrpc.result_response(entry.id, result)

    def refused(self, error: RPCError) -> Any:
        self._metrics.call_outcome(self._name, str(error.code))
        entry = self._entry
        if entry.is_notification:
            return None
        return fit(jsonrpc.error_response(entry.id, error), self._limit)

    def failed(self, failure: Failure) -> Any:
        error = failure.value
        if not isinstance(error, RPCError):
            # the registry turns a handler's exception into -32603 itself (and logs
            # it); anything else reaching here is a bug of ours
            log.failure("call {method} failed", failure, method=self._name)
            error = RPCError(jsonrpc.INTERNAL_ERROR)
        return self.refused(error)


def _is_notification(entry: jsonrpc.Entry) -> bool:
    return isinstance(entry, jsonrpc.Request) and entry.is_notification


def _close_for_abuse(session: IClientSession) -> None:
    log.info("closing {conn_id}: rate limit abuse", conn_id=session.conn_id)
    session.close_with(closecodes.RATE_ABUSE, "rate limit exceeded")


def _reply_failed(failure: Failure) -> None:
    log.failure("sending a reply failed", failure)


def fit(reply: dict[str, Any], limit: int) -> dict[str, Any]:
    """
    An error reply within C{limit} bytes (PROTOCOL.md section 3): entries of
    C{data.errors} are dropped from the end until it fits.  Only
    C{data.errors} grows with what the client sent; the rest is the echoed
    id and fixed text.
    """
    error = reply.get("error")
    data = error.get("data") if isinstance(error, dict) else None
    errors = data.get("errors") if isinstance(data, dict) else None
    if not errors:
        return reply
    while errors and len(encode_reply(reply)) > limit:
        del errors[len(errors) // 2 if len(errors) > 1 else 0 :]
    return reply


def encode_reply(reply: Any) -> bytes:
    """
    Encode a reply object or a batch's array of them.  A result JSON cannot
    carry (a handler returned an object, NaN, a cycle) is a handler's bug:
    that reply becomes a bare -32603, the rest of its batch goes as it is.
    """
    try:
        return jsonrpc.encode(reply)
    except (TypeError, ValueError, RecursionError):
        if isinstance(reply, list):
            return b"[" + b",".join(encode_reply(r) for r in reply) + b"]"
        log.failure("a result could not be encoded as JSON")
        error = RPCError(jsonrpc.INTERNAL_ERROR)
        return jsonrpc.encode(jsonrpc.error_response(reply.get("id"), error))
