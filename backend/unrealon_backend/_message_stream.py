"""
One AI answer streamed as numbered C{session.message} chunks (PROTOCOL.md
sections 5.1 and 6): the objects L{Publisher.stream_message} and
L{AsyncPublisher.stream_message} return.  They number the chunks (C{seq} 0,
1, 2, ...), mark the last one C{done}, and end the message in an error state
when the code producing it raises.

Private to the package: L{unrealon_backend.publisher} exports the classes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from unrealon_backend.catalogue import EVENTS, check_event

log = logging.getLogger("unrealon_backend.publisher")

#: the longest C{error} a chunk may carry: the catalogue's limit, which the server enforces
MAX_ERROR_LENGTH: int = next(
    int(field["max_length"]) for field in EVENTS["session.message"]["params"]
    if field["name"] == "error"
)

#: the params a stream sets itself on each chunk
_CHUNK_PARAMS = frozenset({"content", "seq", "done", "error"})


def error_text(error: BaseException) -> str:
    """C{"ClassName: message"} (the class name alone when the message is empty), capped."""
    detail = str(error)
    text = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return text[:MAX_ERROR_LENGTH]


class _MessageChunks:
    """What the sync and the async stream share: the message's fields and its numbering."""

    def __init__(self, session_id: str | int, message_id: str | int | None, role: Any,
                 extra: Mapping[str, Any]) -> None:
        clash = _CHUNK_PARAMS.intersection(extra)
        if clash:
            raise TypeError(f"stream_message sets {', '.join(sorted(clash))} itself")
        if message_id is None:
            message_id = uuid.uuid4().hex
        # checked now, before the caller starts its model: a bad id or role is a
        # TypeError/ValueError here rather than after the first token
        fields = check_event("session.message", {
            "session_id": session_id, "message_id": message_id, "role": role, "content": "",
            **extra,
        })
        del fields["content"]
        self.session_id: str = fields.pop("session_id")
        self.message_id: str = fields.pop("message_id")
        self.role: str = fields.pop("role")
        #: the extra fields, sent on every chunk: the server keeps those of the first
        #: chunk it receives, which need not be chunk 0 when several nodes share the work
        self.extra: dict[str, Any] = fields
        #: the C{seq} the next chunk gets (the number of chunks published so far)
        self.seq = 0
        #: true once the last chunk (C{done}) was published
        self.done = False
        #: the C{error} the last chunk carried, if any
        self.error: str | None = None
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """The text published so far (every chunk's C{content}, in order)."""
        return "".join(self._parts)

    def _chunk(self, content: str, done: bool, error: str | None) -> dict[str, Any]:
        if self.done:
            raise RuntimeError(f"message {self.message_id} is already done")
        if not isinstance(content, str):
            raise TypeError(f"text must be a string, got {type(content).__name__}")
        return {"content": content, "seq": self.seq, "done": done, "error": error}

    def _published(self, content: str, done: bool, error: str | None) -> None:
        # counted only once appended: after a failed append the next chunk reuses the
        # number, since a gap would hold the rest back on the server (section 5.1)
        self.seq += 1
        self._parts.append(content)
        if done:
            self.done = True
            self.error = error

    def __repr__(self) -> str:
        state = "done" if self.done else "streaming"
        return (f"<{type(self).__name__} session {self.session_id} message {self.message_id}"
                f" {state}, {self.seq} chunks>")


class MessageStream(_MessageChunks):
    """
    One streamed message, published from synchronous code: see
    L{Publisher.stream_message}.  Not thread-safe: one producer per message.

    @ivar session_id: the session (room C{session:<session_id>}), as a string.
    @ivar message_id: the message's id, as a string (generated when not given).
    @ivar seq: the number the next chunk gets (the chunks published so far).
    @ivar done: the last chunk was published; L{append} and L{finish} now raise
        C{RuntimeError}.
    @ivar error: the C{error} of the last chunk, when the message ended in one.
    """

    def __init__(self, send: Callable[..., str], session_id: str | int,
                 message_id: str | int | None, role: Any, extra: Mapping[str, Any]) -> None:
        super().__init__(session_id, message_id, role, extra)
        self._send = send

    def _publish(self, content: str, done: bool, error: str | None) -> str:
        params = self._chunk(content, done, error)
        entry_id = self._send(self.session_id, self.message_id, self.role, **params,
                              **self.extra)
        self._published(content, done, error)
        return entry_id

    def append(self, text: str) -> str | None:
        """
        Publish C{text} as the next chunk; return its stream entry id, or None
        when C{text} is empty (nothing is published: models often yield empty
        deltas).

        @raise RuntimeError: the message is done.
        @raise BackendUnavailable: Redis could not be reached (the chunk's
            number is used again by the next chunk).
        """
        if isinstance(text, str) and not text and not self.done:
            return None
        return self._publish(text, False, None)

    def finish(self, text: str = "", error: str | None = None) -> str:
        """
        Publish the last chunk (C{done}), with C{text} as its content; with
        C{error}, the message ends in that error state (at most 2000
        characters).  Leaving the C{with} block does this, with no text,
        when it was not done.
        """
        return self._publish(text, True, error)

    def __enter__(self) -> MessageStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.done:
            return
        if exc is None:
            self.finish()
            return
        # the message ends in an error state; the caller's exception goes on either way
        try:
            self._publish("", True, error_text(exc))
        except Exception:
            log.warning("could not end message %s with its error", self.message_id,
                        exc_info=True)


class AsyncMessageStream(_MessageChunks):
    """
    One streamed message, published from asyncio code: see
    L{AsyncPublisher.stream_message}.  The same as L{MessageStream}, with
    C{await stream.append(text)}, C{await stream.finish()} and
    C{async with}.
    """

    def __init__(self, send: Callable[..., Awaitable[str]], session_id: str | int,
                 message_id: str | int | None, role: Any, extra: Mapping[str, Any]) -> None:
        super().__init__(session_id, message_id, role, extra)
        self._send = send

    async def _publish(self, content: str, done: bool, error: str | None) -> str:
        params = self._chunk(content, done, error)
        entry_id = await self._send(self.session_id, self.message_id, self.role, **params,
                                    **self.extra)
        self._published(content, done, error)
        return entry_id

    async def append(self, text: str) -> str | None:
        """As L{MessageStream.append}."""
        if isinstance(text, str) and not text and not self.done:
            return None
        return await self._publish(text, False, None)

    async def finish(self, text: str = "", error: str | None = None) -> str:
        """As L{MessageStream.finish}."""
        return await self._publish(text, True, error)

    async def __aenter__(self) -> AsyncMessageStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.done:
            return
        if exc is None:
            await self.finish()
            return
        # also on CancelledError (the client went away, a timeout): the message must
        # not stay "streaming" in the browsers; the cancellation itself goes on
        try:
            await self._publish("", True, error_text(exc))
        except Exception:
            log.warning("could not end message %s with its error", self.message_id,
                        exc_info=True)
