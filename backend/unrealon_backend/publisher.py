"""
The backend's side of the ingress: append requests to the unrealon-ws
stream from Django (or any synchronous Python service) with redis-py.

This package needs only redis-py and the standard library; it never imports
Twisted, so it is safe in a Django process, a Celery worker or a script.
Install it from the repository (it is not on PyPI)::

    pip install ./backend                                    # from a clone
    pip install 'unrealon-backend @ git+https://<your git host>/unrealon-ws.git#subdirectory=backend'

Django
======

settings.py::

    UNREALON_REDIS_URL = env("UNREALON_REDIS_URL", default="redis://127.0.0.1:6379/0")
    UNREALON_INGRESS_STREAM = "stream:requests"   # the server's UNREALON_INGRESS_STREAM

a module of your project (one Publisher per process; it is thread-safe)::

    from django.conf import settings
    from unrealon_backend import Publisher

    publisher = Publisher(settings.UNREALON_REDIS_URL,
                          stream=settings.UNREALON_INGRESS_STREAM)

in a view or a service function -- publish only once the data is committed,
or a browser may reload a state the database does not have yet::

    from django.db import transaction

    def save_file(workspace, path, text):
        with transaction.atomic():
            File.objects.update_or_create(workspace=workspace, path=path,
                                          defaults={"text": text})
            transaction.on_commit(lambda: publisher.file_changed(
                workspace.id, path, "modified", size=len(text)))

Events are fire-and-forget: each helper appends one entry and returns its
stream id at once; the servers deliver it to the room's browsers.  While no
server runs, entries wait in the stream and are delivered when one starts
(unless they carry a C{timeout}, see L{Publisher}).  To wait for the
server's answer use L{Publisher.call}, always with a timeout::

    try:
        online = publisher.call("presence.online", {"user_ids": ["7", "9"]},
                                timeout=2.0)["online"]
    except CallTimeout:
        online = []   # no server answered in time
    except BackendCallError as e:
        log.warning("unrealon refused: %s (%s)", e, e.error_code)

Streaming an AI answer (PROTOCOL.md section 5.1): L{Publisher.stream_message}
numbers the chunks, ends the message with C{done} and, when the code in the
block raises, with C{error}::

    with publisher.stream_message(session.id, role="assistant") as stream:
        for token in llm.stream(prompt):
            stream.append(token)

From asyncio code (an async Django view, FastAPI) use L{AsyncPublisher}, the
same with redis.asyncio: C{async with publisher.stream_message(...)} and
C{await stream.append(token)}.

The wire format is PROTOCOL.md section 6: one entry per request, with one
field C{payload}, a JSON object C{{method, params, correlation_id?,
reply_to?, timeout?}}; replies are JSON objects LPUSHed on C{reply_to}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import redis
import redis.asyncio

from unrealon_backend._message_stream import (
    MAX_ERROR_LENGTH,
    AsyncMessageStream,
    MessageStream,
)
from unrealon_backend._streams import close_client
from unrealon_backend.catalogue import ENUMS, check_event

__all__ = [
    "CHANGES",
    "LEVELS",
    "ROLES",
    "TASK_STATUSES",
    "AsyncMessageStream",
    "AsyncPublisher",
    "BackendCallError",
    "BackendError",
    "BackendUnavailable",
    "CallTimeout",
    "DeadlineExceeded",
    "Forbidden",
    "InternalError",
    "InvalidParams",
    "MessageStream",
    "MethodNotFound",
    "Publisher",
]

DEFAULT_STREAM = "stream:requests"
REPLY_PREFIX = "list:response:"

#: the enum-like params of the event catalogue (PROTOCOL.md section 6)
CHANGES = ENUMS["Change"]
ROLES = ENUMS["Role"]
TASK_STATUSES = ENUMS["TaskState"]
LEVELS = ENUMS["Level"]


# -- errors ---------------------------------------------------------------------


class BackendError(Exception):
    """Base of everything this module raises on purpose."""


class BackendUnavailable(BackendError):
    """Redis could not be reached (the entry was not appended)."""


class CallTimeout(BackendError, TimeoutError):
    """L{Publisher.call} got no reply in time (no server running, or too busy)."""


class BackendCallError(BackendError):
    """
    The server answered L{Publisher.call} with an error.

    @ivar error_code: C{method_not_found}, C{invalid_params}, C{forbidden},
        C{deadline_exceeded} or C{internal_error} (or a code a newer server
        sends).
    @ivar reply: the whole reply object.
    """

    error_code: str = "internal_error"

    def __init__(self, message: str, error_code: str, correlation_id: str | None = None,
                 reply: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code
        self.correlation_id = correlation_id
        self.reply: Mapping[str, Any] = reply or {}


class MethodNotFound(BackendCallError):
    error_code = "method_not_found"


class InvalidParams(BackendCallError):
    error_code = "invalid_params"


class Forbidden(BackendCallError):
    error_code = "forbidden"


class DeadlineExceeded(BackendCallError):
    error_code = "deadline_exceeded"


class InternalError(BackendCallError):
    error_code = "internal_error"


_ERRORS: dict[str, type[BackendCallError]] = {
    cls.error_code: cls
    for cls in (MethodNotFound, InvalidParams, Forbidden, DeadlineExceeded, InternalError)
}


# -- argument checks ----------------------------------------------------------------


def _id(name: str, value: Any) -> str:
    """Ids are strings; an integer is taken as its decimal string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise ValueError(f"{name} must not be empty")
    return text


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (a JSON object)")
    return dict(value)


def _entry(method: str, params: Mapping[str, Any] | None, timeout: float | None,
           correlation_id: str | None, reply_to: str | None,
           json_default: Callable[[Any], Any] | None) -> str:
    """The C{payload} field of one ingress entry (PROTOCOL.md section 6), as JSON text."""
    if not isinstance(method, str) or not method:
        raise ValueError("method must be a non-empty string")
    payload: dict[str, Any] = {
        "method": method,
        "params": _object("params", params if params is not None else {}),
    }
    if correlation_id is not None:
        payload["correlation_id"] = correlation_id
    if reply_to is not None:
        payload["reply_to"] = reply_to
    if timeout is not None:
        if isinstance(timeout, bool) or not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        payload["timeout"] = timeout
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False, default=json_default)


def _entry_id(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def _session_message(session_id: str | int, message_id: str | int, role: Any, content: str,
                     seq: int | None, done: bool | None, error: str | None,
                     extra: Mapping[str, Any]) -> dict[str, Any]:
    """The checked params of one C{session.message} (one chunk when C{seq} is given)."""
    params = check_event("session.message", {
        "session_id": session_id, "message_id": message_id, "role": role, "content": content,
        "seq": seq, "done": done, "error": error, **extra,
    })
    # the catalogue caps error; the server would refuse a longer one with nobody to read why
    if len(params.get("error", "")) > MAX_ERROR_LENGTH:
        raise ValueError(f"error must have at most {MAX_ERROR_LENGTH} characters")
    return params


# -- the publisher --------------------------------------------------------------------


class Publisher:
    """
    Appends requests to the ingress stream and, for L{call}, waits for replies.

    @param client: a C{redis.Redis} (any C{decode_responses}), or a URL for
        C{redis.Redis.from_url} (C{redis://host:port/db},
        C{unix:///path/redis.sock?db=0}).
    @param stream: the server's C{UNREALON_INGRESS_STREAM}.
    @param maxlen: cap the stream at about this many entries (XADD MAXLEN ~):
        the servers acknowledge entries but do not delete them.  If the
        servers are down long enough for more than this many entries to
        queue up, the oldest unread ones are lost.  None: never trim.
    @param event_timeout: seconds after which a fire-and-forget entry is no
        longer worth delivering (the server answers it C{deadline_exceeded}
        and drops it); None (the default): deliver however late.
    @param json_default: C{default} for C{json.dumps}, for values JSON does
        not know (e.g. C{django.core.serializers.json.DjangoJSONEncoder().default}).
    """

    def __init__(
        self,
        client: redis.Redis[Any] | str,
        stream: str = DEFAULT_STREAM,
        *,
        maxlen: int | None = 100_000,
        event_timeout: float | None = None,
        reply_prefix: str = REPLY_PREFIX,
        json_default: Callable[[Any], Any] | None = None,
    ) -> None:
        if isinstance(client, str):
            client = redis.Redis.from_url(client)
        self.redis: redis.Redis[Any] = client
        self.stream = stream
        self.maxlen = maxlen
        self.event_timeout = event_timeout
        self.reply_prefix = reply_prefix
        self._json_default = json_default

    # -- low level ----------------------------------------------------------------

    def send(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> str:
        """
        Append one request; return its stream entry id.  Nothing waits for
        the server: see L{call} for that.
        """
        body = _entry(method, params, timeout, correlation_id, reply_to, self._json_default)
        try:
            entry_id = self.redis.xadd(
                self.stream, {"payload": body},
                maxlen=self.maxlen, approximate=True,
            )
        except redis.RedisError as e:
            raise BackendUnavailable(f"cannot append to {self.stream}: {e}") from e
        return _entry_id(entry_id)

    def _event(self, method: str, params: dict[str, Any]) -> str:
        return self.send(method, params, timeout=self.event_timeout)

    def event(self, method: str, **params: Any) -> str:
        """
        Any catalogue event by name, its params checked against the catalogue
        (the same file the server checks with): C{publisher.event(
        "workspace.file_changed", workspace_id=42, path="a.py", change="modified")}.
        """
        return self._event(method, check_event(method, params))

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, timeout: float = 5.0
    ) -> Any:
        """
        Send a request and wait (blocking) for its reply; return its C{result}.

        The entry carries the same C{timeout}, so a server that reads it too
        late answers C{deadline_exceeded} instead of acting on it.

        @raise CallTimeout: no reply within C{timeout} seconds.
        @raise BackendCallError: the server refused or failed (a subclass per
            C{error_code}: L{MethodNotFound}, L{InvalidParams}, ...).
        @raise BackendUnavailable: Redis could not be reached.
        """
        if isinstance(timeout, bool) or not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        correlation_id = str(uuid.uuid4())
        reply_to = self.reply_prefix + correlation_id
        deadline = time.monotonic() + timeout
        self.send(method, params, timeout=timeout,
                  correlation_id=correlation_id, reply_to=reply_to)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CallTimeout(f"no reply to {method} within {timeout} s")
                # BRPOP takes fractional seconds (Redis >= 6); 0 would mean "for ever"
                popped = self.redis.brpop([reply_to], timeout=max(0.01, left))
                if popped is None:
                    continue
                raw = popped[1]
                reply = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                if not isinstance(reply, dict):
                    continue
                if reply.get("correlation_id") not in (None, correlation_id):
                    continue
                break
        except redis.RedisError as e:
            raise BackendUnavailable(f"waiting for the reply to {method}: {e}") from e
        finally:
            try:
                self.redis.delete(reply_to)  # a duplicate reply (entry handled twice)
            except redis.RedisError:
                pass
        if reply.get("success"):
            return reply.get("result")
        code = str(reply.get("error_code") or "internal_error")
        cls = _ERRORS.get(code, BackendCallError)
        raise cls(str(reply.get("error") or code), code, correlation_id, reply)

    # -- the event catalogue ------------------------------------------------------------

    def file_changed(self, workspace_id: str | int, path: str, change: str,
                     old_path: str | None = None, **extra: Any) -> str:
        """C{workspace.file_changed} to room C{workspace:<workspace_id>}."""
        return self.event("workspace.file_changed", workspace_id=workspace_id, path=path,
                          change=change, old_path=old_path, **extra)

    def snapshot_created(self, workspace_id: str | int, snapshot_id: str | int,
                         **extra: Any) -> str:
        """C{workspace.snapshot_created} to room C{workspace:<workspace_id>}."""
        return self.event("workspace.snapshot_created", workspace_id=workspace_id,
                          snapshot_id=snapshot_id, **extra)

    def state_changed(self, workspace_id: str | int, state: str, **extra: Any) -> str:
        """C{workspace.state_changed} to room C{workspace:<workspace_id>}."""
        return self.event("workspace.state_changed", workspace_id=workspace_id, state=state,
                          **extra)

    def session_message(self, session_id: str | int, message_id: str | int, role: str,
                        content: str, seq: int | None = None, done: bool | None = None,
                        error: str | None = None, **extra: Any) -> str:
        """
        C{session.message} to room C{session:<session_id>}: a whole message,
        or, with C{seq}, one chunk of a streamed one.  To stream an answer
        use L{stream_message}, which numbers the chunks and ends the message
        for you.  By hand: C{seq} 0, 1, 2, ... in the message, C{done=True}
        on the last chunk, and C{error} (at most 2000 characters) on it when
        the message ended in an error state; the server delivers the chunks
        in C{seq} order, whatever order the nodes handle them in
        (PROTOCOL.md section 5.1).
        """
        return self._event("session.message", _session_message(
            session_id, message_id, role, content, seq, done, error, extra))

    def stream_message(self, session_id: str | int, message_id: str | int | None = None,
                       role: str = "assistant", **extra: Any) -> MessageStream:
        """
        Stream one message in chunks (PROTOCOL.md section 5.1), as a context
        manager::

            with publisher.stream_message(session.id) as stream:
                for token in llm.stream(prompt):
                    stream.append(token)          # seq 0, 1, 2, ..., done false
            # leaving the block: a last chunk, content "", done true

        C{stream.finish(text)} inside the block makes C{text} the last chunk
        instead.  An exception leaving the block publishes a last chunk with
        C{done} and C{error} (the exception's class name and message, cut to
        2000 characters), then propagates; if Redis is down then too, that
        failure is logged (logger C{unrealon_backend.publisher}) and the
        original exception still propagates.  After the last chunk,
        C{append} and C{finish} raise C{RuntimeError}.

        @param message_id: the message's id; a new one (uuid4 hex) when
            omitted, in C{stream.message_id}.
        @param extra: more fields for the event's C{data} (e.g. C{model}),
            sent on every chunk.
        @return: a L{MessageStream}: C{append(text)}, C{finish(text="",
            error=None)}, C{message_id}, C{seq} (chunks published so far),
            C{text} (their text), C{done}, C{error}.
        """
        return MessageStream(self.session_message, session_id, message_id, role, extra)

    def task_status(self, session_id: str | int, task_id: str | int, status: str,
                    progress: float | None = None, **extra: Any) -> str:
        """C{session.task_status} to room C{session:<session_id>}; C{progress} in 0..1."""
        return self.event("session.task_status", session_id=session_id, task_id=task_id,
                          status=status, progress=progress, **extra)

    def context_updated(self, session_id: str | int, **extra: Any) -> str:
        """C{session.context_updated} to room C{session:<session_id>}."""
        return self.event("session.context_updated", session_id=session_id, **extra)

    def notify(self, user_id: str | int, title: str, message: str, level: str = "info",
               data: Mapping[str, Any] | None = None, **extra: Any) -> str:
        """C{notification.send} to every connection of one user (room C{user:<user_id>})."""
        return self.event("notification.send", user_id=user_id, title=title, message=message,
                          level=level, data=data, **extra)

    def broadcast(self, title: str, message: str, level: str = "info",
                  data: Mapping[str, Any] | None = None, **extra: Any) -> str:
        """C{notification.broadcast} to every connection (room C{broadcast})."""
        return self.event("notification.broadcast", title=title, message=message,
                          level=level, data=data, **extra)

    def publish(self, room: str, event: str, data: Mapping[str, Any] | None = None) -> str:
        """Any event C{event} with C{data} to any room (C{publish})."""
        return self._event("publish", {
            "room": _text("room", room), "event": _text("event", event),
            "data": _object("data", data if data is not None else {}),
        })

    def disconnect(self, user_id: str | int, reason: str | None = None) -> str:
        """Close every connection of a user, on every node, with 4003."""
        params: dict[str, Any] = {"user_id": _id("user_id", user_id)}
        if reason is not None:
            params["reason"] = _text("reason", reason)
        return self._event("connections.disconnect", params)

    # -- queries (they wait for the reply) --------------------------------------------------

    def presence_online(self, user_ids: Iterable[str | int], timeout: float = 5.0) -> list[str]:
        """Which of these users have a connection anywhere in the cluster."""
        ids = [_id("user_ids[]", u) for u in user_ids]
        result = self.call("presence.online", {"user_ids": ids}, timeout=timeout)
        return list(result["online"])

    def presence_list(self, room: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Who is in a room: [{user_id, info, connections}, ...]."""
        result = self.call("presence.list", {"room": _text("room", room)}, timeout=timeout)
        return list(result["users"])


# -- the asyncio publisher --------------------------------------------------------------


class AsyncPublisher:
    """
    L{Publisher} for asyncio code (async Django views, FastAPI, an asyncio
    worker): the same entries, appended with redis.asyncio, so nothing blocks
    the event loop.  It publishes; for other events than C{session.message}
    use C{await publisher.event(name, **params)}, and for L{Publisher.call}
    the sync L{Publisher}.

    A redis.asyncio client belongs to the event loop it first ran on.  Under
    an ASGI server (one loop per process) a module-level instance is fine;
    where each request gets a loop of its own (async views under WSGI), make
    one per request: C{async with AsyncPublisher(url) as publisher: ...}.

    @param client: a C{redis.asyncio.Redis}, or a URL for
        C{redis.asyncio.Redis.from_url}; L{aclose} closes only a client this
        object made from a URL.
    @param stream, maxlen, event_timeout, json_default: as for L{Publisher}.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis[Any] | str,
        stream: str = DEFAULT_STREAM,
        *,
        maxlen: int | None = 100_000,
        event_timeout: float | None = None,
        json_default: Callable[[Any], Any] | None = None,
    ) -> None:
        self._owned = isinstance(client, str)
        if isinstance(client, str):
            client = redis.asyncio.Redis.from_url(client)
        self.redis: redis.asyncio.Redis[Any] = client
        self.stream = stream
        self.maxlen = maxlen
        self.event_timeout = event_timeout
        self._json_default = json_default

    async def send(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> str:
        """As L{Publisher.send}: append one request, return its stream entry id."""
        body = _entry(method, params, timeout, correlation_id, reply_to, self._json_default)
        try:
            entry_id = await self.redis.xadd(
                self.stream, {"payload": body},
                maxlen=self.maxlen, approximate=True,
            )
        except redis.RedisError as e:
            raise BackendUnavailable(f"cannot append to {self.stream}: {e}") from e
        return _entry_id(entry_id)

    async def event(self, method: str, **params: Any) -> str:
        """As L{Publisher.event}: any catalogue event by name, its params checked."""
        return await self.send(method, check_event(method, params), timeout=self.event_timeout)

    async def session_message(self, session_id: str | int, message_id: str | int, role: str,
                              content: str, seq: int | None = None, done: bool | None = None,
                              error: str | None = None, **extra: Any) -> str:
        """As L{Publisher.session_message}."""
        params = _session_message(session_id, message_id, role, content, seq, done, error,
                                  extra)
        return await self.send("session.message", params, timeout=self.event_timeout)

    def stream_message(self, session_id: str | int, message_id: str | int | None = None,
                       role: str = "assistant", **extra: Any) -> AsyncMessageStream:
        """
        As L{Publisher.stream_message}, with C{async with} and
        C{await stream.append(text)} / C{await stream.finish(...)}::

            async with publisher.stream_message(session_id) as stream:
                async for token in llm.astream(prompt):
                    await stream.append(token)

        A cancellation (C{asyncio.CancelledError}: the client went away, a
        timeout) ends the message with C{error} C{"CancelledError"} too, then
        goes on.
        """
        return AsyncMessageStream(self.session_message, session_id, message_id, role, extra)

    async def aclose(self) -> None:
        """Close the Redis client if this object made it from a URL."""
        if self._owned:
            await close_client(self.redis)

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
