"""
Browser calls to backend methods, on one node: admission, the calls in
flight, progress, deadlines and cancel (PROTOCOL.md section 9.3).

The Redis side (appending calls, publishing cancels, reading the method
directory and this node's reply stream) is an L{IBackendLink}; this module
decides what a client sees.  Its one rule: every call with an id is answered
exactly once.  A call in flight is in C{_calls} until the first of its
result, its error, its deadline, its cancel (by the client, or because the
connection closed) or a failed append takes it out; whatever comes for it
afterwards (a late result, a retried worker's progress) finds nothing and is
dropped.  Progress items are numbered here, from 1 with no gap, so a worker
that was replaced mid-call (an idempotent method run again) cannot show the
client an item twice: only items past the highest worker C{seq} already
forwarded go on.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from unrealon import jsoncodec, jsonrpc
from unrealon.auth import Identity, room_pattern_matches
from unrealon.backenddecl import Declaration, DeclarationError, parse_declaration
from unrealon.engine.interfaces import BackendUnavailable, IBackendLink
from unrealon.jsonrpc import CANCELLED, DEADLINE_EXCEEDED, NO_WORKER, RPCError, invalid_params

log = Logger(namespace="unrealon.backendcalls")

#: a cancel key outlives the deadline by this long (a worker may still be starting it)
CANCEL_MARGIN_MS = 60_000
#: a call that cannot be appended in this many seconds is answered -32011
#: (PROTOCOL.md section 1: Redis away is answered within 5 s)
APPEND_DEADLINE = 4.5
#: seconds the last declarations are kept when the directory comes back empty
#: (Redis lost its data): the workers declare again within 3 s, and until then
#: a call is -32013 "no worker" (retryable), not -32601 "no such method"
EMPTY_DIRECTORY_GRACE = 10.0
#: an error message from a worker is cut to this many characters
MAX_ERROR_MESSAGE = 1024

@attrs.define(eq=False)
class _Call:
    call_id: str
    session: Any
    #: the request's id; None for a notification (no progress, no reply)
    request_id: jsonrpc.RequestId
    notification: bool
    method: str
    timeout_ms: int
    done: Deferred[Any]
    timer: IDelayedCall | None = None
    #: progress items sent to the client, and the highest worker seq forwarded
    sent: int = 0
    worker_seq: int = 0


def _id_key(request_id: jsonrpc.RequestId) -> tuple[str, Any]:
    """A request id as a dict key: "1" and 1 are different ids, 1 and 1.0 the same."""
    return ("string" if isinstance(request_id, str) else "number"), request_id


def _notification_key(call_id: str) -> tuple[str, Any]:
    """A notification's key: it has no id, and no client id can equal this one."""
    return "notification", call_id


class BackendCalls:
    """The backend methods this node knows of and the calls its connections have in flight."""

    def __init__(
        self,
        reactor: Any,
        link: IBackendLink,
        *,
        node_id: str,
        incarnation: str,
        is_server_method: Callable[[str], bool],
        default_timeout: float,
        max_timeout: float,
        max_calls: int,
    ) -> None:
        self._reactor = reactor
        self._link = link
        self._node_id = node_id
        #: ids of this start of the node, never those of an earlier one: a worker
        #: still running a call of the last start must not answer one of this
        self._incarnation = incarnation
        self._is_server_method = is_server_method
        self._default_timeout = default_timeout
        self._max_timeout = max_timeout
        self._max_calls = max_calls
        self._counter = itertools.count(1)
        self._declarations: dict[str, Declaration] = {}
        self._served: frozenset[str] = frozenset()
        #: raw declarations already refused (logged once each)
        self._refused: set[str] = set()
        #: when the directory was first seen empty while declarations were known
        self._emptied_at: float | None = None
        self._calls: dict[str, _Call] = {}
        #: per connection: request id key -> call in flight
        self._by_session: dict[Any, dict[tuple[str, Any], _Call]] = {}
        #: replies that found no call in flight (late, or for another process)
        self.dropped = 0
        link.on_directory = self.directory_changed
        link.on_reply = self.reply_received

    # -- the directory ----------------------------------------------------------------

    def directory_changed(self, raw: Mapping[str, str], served: frozenset[str]) -> None:
        """The declarations and served names as Redis has them now."""
        # both hashes empty: Redis lost its data (a worker never deletes declarations,
        # and live workers keep their heartbeat); anything else is taken as it is
        if not raw and not served and self._declarations:
            now = self._reactor.seconds()
            if self._emptied_at is None:
                self._emptied_at = now
                log.warn("the backend method directory is empty (Redis lost its data?): "
                         "keeping the last declarations, not served, until workers declare "
                         "again")
            if now - self._emptied_at < EMPTY_DIRECTORY_GRACE:
                self._served = served
                return
        self._emptied_at = None
        declarations: dict[str, Declaration] = {}
        for name, text in raw.items():
            known = self._declarations.get(name)
            if known is not None and known.raw == text:
                declarations[name] = known
                continue
            try:
                decl = parse_declaration(text, self._is_server_method)
                if decl.name != name:
                    raise DeclarationError(f"declared under {name!r} but named {decl.name!r}")
            except DeclarationError as e:
                if text not in self._refused:
                    self._refused.add(text)
                    log.warn("backend method {name} ignored: {why}", name=name[:200], why=str(e))
                continue
            if known is None:
                log.info("backend method {name} declared", name=name)
            declarations[name] = decl
        self._declarations = declarations
        self._served = served

    def callable_by(self, identity: Identity) -> list[Declaration]:
        """The declared methods C{identity} may call, by name."""
        return [
            decl for name, decl in sorted(self._declarations.items())
            if _allowed(identity.method_patterns, name)
        ]

    # -- calls ------------------------------------------------------------------------

    def call(
        self,
        session: Any,
        method: str,
        params: Any,
        request_id: jsonrpc.RequestId,
        notification: bool,
    ) -> Deferred[Any]:
        """
        Make a call for C{session} (authenticated); fires with its result or
        fails with its L{RPCError}.  Refusals (section 9.3's order) raise
        L{RPCError} at once.
        """
        decl = self._declarations.get(method)
        if decl is None:
            raise RPCError(jsonrpc.METHOD_NOT_FOUND)
        identity: Identity = session.identity
        if not _allowed(identity.method_patterns, method):
            raise RPCError(jsonrpc.FORBIDDEN)
        if not isinstance(params, dict):
            raise invalid_params([jsonrpc.FieldError("params", "params must be given by name")])
        errors = decl.check_params(params)
        if errors:
            raise invalid_params(errors)
        calls = self._by_session.get(session)
        key = _id_key(request_id)
        if not notification:
            if request_id is None:
                raise RPCError(jsonrpc.INVALID_REQUEST, "a backend call needs an id")
            if calls is not None and key in calls:
                raise RPCError(jsonrpc.INVALID_REQUEST, "this id is in use by a call in flight")
        if calls is not None and len(calls) >= self._max_calls:
            raise RPCError(jsonrpc.RATE_LIMITED, "too many backend calls in flight",
                           data={"in_flight": len(calls)})
        if method not in self._served:
            raise RPCError(NO_WORKER, data={"retryable": True})
        call_id = f"{self._node_id}/{self._incarnation}.{next(self._counter)}"
        timeout = decl.deadline_seconds(self._default_timeout, self._max_timeout)
        call = _Call(call_id=call_id, session=session, request_id=request_id,
                     notification=notification, method=method,
                     timeout_ms=max(1, round(timeout * 1000)), done=Deferred())
        if calls is None:
            calls = self._by_session[session] = {}
        # a notification has no id: it is kept under its call id (cancelled with the connection)
        calls[key if not notification else _notification_key(call_id)] = call
        self._calls[call_id] = call
        call.timer = self._reactor.callLater(timeout, self._deadline_passed, call_id)
        appended = self._link.append_call(
            self._payload(call, decl, session, identity, params), call.timeout_ms
        )
        appended.addTimeout(APPEND_DEADLINE, self._reactor)
        appended.addErrback(self._not_appended, call_id)
        return call.done

    def _payload(
        self, call: _Call, decl: Declaration, session: Any, identity: Identity, params: Any
    ) -> str:
        claims = identity.claims
        entry = {
            "call_id": call.call_id,
            "method": call.method,
            "params": params,
            "user_id": identity.user_id,
            "connection_id": f"{self._node_id}/{session.conn_id}@{self._incarnation}",
            "node_id": self._node_id,
            "claims": {name: claims[name] for name in decl.pass_claims if name in claims},
            "idempotent": decl.idempotent,
            "reply_to": self._link.reply_to,
        }
        text = jsoncodec.text(entry)
        return text[:-1]  # the closing brace: the script appends the deadline

    def _not_appended(self, failure: Failure, call_id: str) -> None:
        if not failure.check(BackendUnavailable, ConnectionError, TimeoutError, CancelledError):
            log.failure("appending backend call {call_id} failed", failure, call_id=call_id)
        self._finish(call_id, RPCError(jsonrpc.BACKEND_UNAVAILABLE, data={"retryable": True}))

    # -- ends of a call ---------------------------------------------------------------

    def cancel(self, session: Any, request_id: jsonrpc.RequestId) -> bool:
        """C{rpc.cancel}: True when that call was in flight (it is answered -32014 now)."""
        call = self._by_session.get(session, {}).get(_id_key(request_id))
        if call is None:
            return False
        self._publish_cancel(call, "client")
        self._finish(call.call_id, RPCError(CANCELLED))
        return True

    def connection_closed(self, session: Any) -> None:
        """The connection is gone: its calls are cancelled (nobody is left to answer)."""
        for call in list(self._by_session.pop(session, {}).values()):
            self._publish_cancel(call, "disconnect")
            self._finish(call.call_id, RPCError(CANCELLED))

    def _deadline_passed(self, call_id: str) -> None:
        call = self._calls.get(call_id)
        if call is None:
            return
        call.timer = None
        self._publish_cancel(call, "deadline")
        self._finish(call_id, RPCError(DEADLINE_EXCEEDED, data={"timeout_ms": call.timeout_ms}))

    def _publish_cancel(self, call: _Call, reason: str) -> None:
        d = self._link.cancel(call.call_id, reason, call.timeout_ms + CANCEL_MARGIN_MS)
        d.addErrback(lambda f: log.warn(
            "could not publish the cancel of {call_id} ({error}); its deadline still ends it",
            call_id=call.call_id, error=f.getErrorMessage()))

    def _finish(self, call_id: str, outcome: Any) -> None:
        """Take a call out and answer it: a result, or an L{RPCError}."""
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        calls = self._by_session.get(call.session)
        if calls is not None:
            key = (_id_key(call.request_id) if not call.notification
                   else _notification_key(call_id))
            calls.pop(key, None)
            if not calls:
                del self._by_session[call.session]
        if isinstance(outcome, RPCError):
            call.done.errback(outcome)
        else:
            call.done.callback(outcome)

    # -- replies from workers ---------------------------------------------------------

    def reply_received(self, reply: Any) -> None:
        """One entry of this node's reply stream (a JSON object)."""
        call = self._calls.get(str(reply.get("call_id")))
        if call is None:
            self.dropped += 1
            return
        kind = reply.get("type")
        if kind == "progress":
            self._progress(call, reply)
        elif kind == "result":
            self._finish(call.call_id, reply.get("result"))
        elif kind == "error":
            self._finish(call.call_id, _worker_error(reply.get("error")))
        else:
            log.warn("backend reply of unknown type for {call_id}: dropped", call_id=call.call_id)

    def _progress(self, call: _Call, reply: Mapping[str, Any]) -> None:
        seq = reply.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= call.worker_seq:
            return  # a replaced worker's item the client already has
        call.worker_seq = seq
        if call.notification:
            return
        call.sent += 1
        call.session.send_payload(jsonrpc.encode({
            "jsonrpc": "2.0", "method": "rpc.progress",
            "params": {"id": call.request_id, "seq": call.sent, "data": reply.get("data")},
        }))

    def in_flight(self) -> int:
        return len(self._calls)

    def served(self) -> int:
        """How many declared methods a live worker serves now."""
        return len(self._served.intersection(self._declarations))


@functools.lru_cache(maxsize=4096)
def _allowed(patterns: tuple[str, ...], method: str) -> bool:
    # cached: a connection calls the same few methods with the same claim
    return any(room_pattern_matches(pattern, method) for pattern in patterns)


def _worker_error(error: Any) -> RPCError:
    """A worker's error object as the client's error (a malformed one: -32603)."""
    if not isinstance(error, dict):
        return RPCError(jsonrpc.INTERNAL_ERROR)
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return RPCError(jsonrpc.INTERNAL_ERROR)
    message = error.get("message")
    if not isinstance(message, str):
        message = None
    elif len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE]
    return RPCError(code, message, error.get("data"))
