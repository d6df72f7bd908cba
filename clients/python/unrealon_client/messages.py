"""
Streamed messages (PROTOCOL.md section 5.1): the text of each AI answer of a
room, kept by ``message_id`` and grown by the ``session.message`` events that
carry ``seq``.  Hand-written runtime; the client (runtime.py) feeds it every
``session.message`` it receives: live events, a join's ``missed`` replay and a
join's ``streaming`` list.  What ``client.messages(room, handler)`` returns::

    async with client.messages("session:7") as feed:
        async for message in feed:          # MessageSnapshot, after each change
            render(message.message_id, message.text)
            if message.done: ...

The client rules of section 5.1, applied to each event (``seq``..``last_seq``)
of a message the client holds up to ``last_seq`` = n (nothing held: n = -1):

- ``last_seq`` <= n: ignored (a repeat, or older than what is held);
- ``seq`` = 0: replaces what is held (the whole message so far);
- ``seq`` = n + 1: appended.

The server orders the chunks (the client keeps no reorder buffer).  Anything
else breaks the contract and is reported on the client's ``error`` event:
``seq`` > n + 1 is appended with the chunks in between listed in ``gaps``, an
event overlapping what is held is ignored.  One exception is not an error: the
first event of a message the client never held may start past 0 (a join with
a ``since`` the application kept, from the middle of the message); the chunks
before it are listed in ``gaps``.

A ``session.message`` without ``seq`` is a whole message: one snapshot, done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, TypeGuard

Json = dict[str, Any]
#: an inclusive range of chunk numbers, (first, last)
GapRange = tuple[int, int]
#: called with a snapshot after every change of a message (a coroutine function is run as a task)
MessageHandler = Callable[["MessageSnapshot"], object]

#: data fields of an event that describe the event, not the message
EVENT_FIELDS = frozenset({"content", "seq", "last_seq", "done", "gaps", "error"})
#: messages in progress the client keeps at most (the least recently updated is dropped, as lost)
MAX_IN_PROGRESS = 1000
#: finished messages remembered, so that a repeat of their events is recognised
MAX_FINISHED = 1000


@dataclass(frozen=True)
class MessageSnapshot:
    """A message of a room as the client holds it after an event (a new object each time)."""

    room: str
    message_id: str
    session_id: str
    role: str
    #: the text so far: the chunks' ``content`` concatenated in ``seq`` order
    text: str
    #: the last chunk held; None for a whole message (published without ``seq``)
    last_seq: int | None
    #: True once the message's last chunk is held (always True for a whole message)
    done: bool
    #: the error the message ended with (``done`` is then True), else None
    error: str | None = None
    #: chunks whose text is not in ``text``: reported missing by the server, or before the first held
    gaps: tuple[GapRange, ...] = ()
    #: True when the client lost track of the message: after a reconnect whose
    #: recovery failed (``recovered=False``) it was no longer streaming, or its
    #: room was left or forgotten.  Final: ``text`` is what arrived before;
    #: reload it from the application's own history.
    lost: bool = False
    #: False for a whole message (published without ``seq``)
    streamed: bool = True
    #: the message's fields as the server delivers them (session_id, message_id, role, extras)
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(eq=False)
class _State:
    room: str
    message_id: str
    fields: Json
    text: str
    last_seq: int
    gaps: list[GapRange]

    def snapshot(self, *, done: bool = False, lost: bool = False,
                 error: str | None = None) -> MessageSnapshot:
        return MessageSnapshot(
            room=self.room, message_id=self.message_id,
            session_id=str(self.fields.get("session_id", "")), role=str(self.fields.get("role", "")),
            text=self.text, last_seq=self.last_seq, done=done, error=error, gaps=tuple(self.gaps),
            lost=lost, streamed=True, fields=MappingProxyType(dict(self.fields)),
        )


class MessageFeed:
    """
    The messages of one room, as snapshots: a handler, an async iterator, or
    both.  Made by ``client.messages(room, handler=None)``.  The iterator gives
    the latest snapshot of each message that changed since the previous step
    (a slow reader skips intermediate snapshots of a message, never a
    message), and ends when the feed or the client is closed.  ``async with``
    closes it on the way out.
    """

    def __init__(self, room: str, handler: MessageHandler | None,
                 invoke: Callable[[MessageHandler, MessageSnapshot], None],
                 detach: Callable[[MessageFeed], None]) -> None:
        self.room = room
        self._handler = handler
        self._invoke = invoke
        self._detach = detach
        #: snapshots not yet taken by the iterator, the latest one per message, in order of first change
        self._queued: dict[str, MessageSnapshot] = {}
        self._wake = asyncio.Event()
        self._closed = False
        #: True once iterated: only then does a feed with a handler queue snapshots
        self._iterating = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop: no more snapshots; an iteration in progress ends."""
        if self._closed:
            return
        self._closed = True
        self._detach(self)
        self._queued.clear()
        self._wake.set()

    def _deliver(self, snapshot: MessageSnapshot) -> None:
        """A message changed (called by the tracker)."""
        if self._closed:
            return
        if self._handler is None or self._iterating:
            # a feed with a handler that nobody iterates keeps no queue (nobody would read it)
            self._queued[snapshot.message_id] = snapshot  # replaces an older one, in its place
            self._wake.set()
        if self._handler is not None:
            self._invoke(self._handler, snapshot)  # closing the feed there empties the queue

    def __aiter__(self) -> MessageFeed:
        self._iterating = True
        return self

    async def __anext__(self) -> MessageSnapshot:
        self._iterating = True
        while not self._queued:
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        message_id = next(iter(self._queued))
        return self._queued.pop(message_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> MessageFeed:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class MessageStreamError(Exception):
    """An event of a streamed message that breaks PROTOCOL.md section 5.1 (reported, not raised)."""

    def __init__(self, room: str, message_id: str, what: str) -> None:
        super().__init__(f"session.message {message_id} in {room} breaks PROTOCOL.md 5.1: {what}")
        self.room = room
        self.message_id = message_id


class MessageTracker:
    """
    The messages in progress of every room, and the feeds listening to them.
    One per client; runtime.py calls L{apply} for each ``session.message`` event.
    """

    def __init__(self, report: Callable[[Exception], None],
                 invoke: Callable[[MessageHandler, MessageSnapshot], None]) -> None:
        self._report = report
        self._invoke = invoke
        #: in progress, by (room, message id); least recently updated first
        self._in_progress: dict[tuple[str, str], _State] = {}
        #: finished, by (room, message id): their last seq
        self._finished: dict[tuple[str, str], int] = {}
        self._feeds: dict[str, list[MessageFeed]] = {}

    def subscribe(self, room: str, handler: MessageHandler | None) -> MessageFeed:
        """A feed of the messages of ``room``; it gets each message in progress at once."""

        def detach(feed: MessageFeed) -> None:
            feeds = self._feeds.get(room, [])
            if feed in feeds:
                feeds.remove(feed)

        feed = MessageFeed(room, handler, self._invoke, detach)
        self._feeds.setdefault(room, []).append(feed)
        for state in list(self._in_progress.values()):
            if state.room == room:
                feed._deliver(state.snapshot())
        return feed

    def apply(self, room: str, data: Mapping[str, Any]) -> None:
        """One ``session.message`` event's ``data``, of ``room``: the rules of section 5.1."""
        raw_id = data.get("message_id")
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            return  # not a message of the catalogue
        message_id = str(raw_id)
        seq = data.get("seq")
        raw_content, raw_error = data.get("content"), data.get("error")
        content = raw_content if isinstance(raw_content, str) else ""
        error = raw_error if isinstance(raw_error, str) else None
        if seq is None:
            fields = _fields_of(data)
            self._emit(room, MessageSnapshot(
                room=room, message_id=message_id, session_id=str(fields.get("session_id", "")),
                role=str(fields.get("role", "")), text=content, last_seq=None, done=True, error=error,
                streamed=False, fields=MappingProxyType(fields),
            ))
            return
        last_seq = seq if data.get("last_seq") is None else data.get("last_seq")
        if not _is_seq(seq) or not _is_seq(last_seq) or last_seq < seq:
            self._violation(room, message_id,
                            f"seq {seq!r}, last_seq {data.get('last_seq')!r}: not a chunk range")
            return
        key = (room, message_id)
        finished_at = self._finished.get(key)
        if finished_at is not None:
            if last_seq > finished_at:
                self._violation(room, message_id,
                                f"chunks {seq}..{last_seq} after its last one ({finished_at}, done): ignored")
            return
        state = self._in_progress.get(key)
        held = state.last_seq if state is not None else -1
        if last_seq <= held:
            return  # a repeat, or older than what is held
        gaps = _gaps_of(data.get("gaps"))
        if seq == 0 or state is None:
            state = _State(room, message_id, _fields_of(data), content, last_seq,
                           gaps if seq == 0 else [(0, seq - 1), *gaps])
        elif seq == held + 1:
            state.text += content
            state.last_seq = last_seq
            state.gaps += gaps
        elif seq > held + 1:
            self._violation(room, message_id, f"seq {seq} follows last_seq {held}: "
                                              f"chunks {held + 1}..{seq - 1} are listed as missing")
            state.text += content
            state.last_seq = last_seq
            state.gaps += [(held + 1, seq - 1), *gaps]
        else:
            self._violation(room, message_id, f"chunks {seq}..{last_seq} overlap the ones held "
                                              f"(to {held}): ignored")
            return
        self._in_progress.pop(key, None)  # re-inserted last: the most recently updated
        done = data.get("done") is True
        if done:
            self._finished[key] = last_seq
            if len(self._finished) > MAX_FINISHED:
                del self._finished[next(iter(self._finished))]
        else:
            self._in_progress[key] = state
            if len(self._in_progress) > MAX_IN_PROGRESS:
                oldest_key = next(iter(self._in_progress))
                oldest = self._in_progress.pop(oldest_key)
                self._emit(oldest.room, oldest.snapshot(lost=True))
        self._emit(room, state.snapshot(done=done, error=error))

    def lose(self, room: str, streaming: set[str]) -> None:
        """
        A join with ``since`` came back with ``recovered: false``: the messages
        of ``room`` held in progress that are not in its ``streaming`` list
        ended (or expired) while the connection was down.  They are reported lost.
        """
        for key, state in list(self._in_progress.items()):
            if state.room == room and state.message_id not in streaming:
                del self._in_progress[key]
                self._emit(room, state.snapshot(lost=True))

    def forget(self, room: str) -> None:
        """The client no longer is in ``room`` (left, revoked, refused): its messages in progress are lost."""
        self.lose(room, set())

    def close(self) -> None:
        """The client closed for good: every feed ends."""
        for feeds in list(self._feeds.values()):
            for feed in list(feeds):
                feed.close()
        self._feeds.clear()

    def _emit(self, room: str, snapshot: MessageSnapshot) -> None:
        for feed in list(self._feeds.get(room, ())):
            feed._deliver(snapshot)

    def _violation(self, room: str, message_id: str, what: str) -> None:
        self._report(MessageStreamError(room, message_id, what))


def _is_seq(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fields_of(data: Mapping[str, Any]) -> Json:
    return {name: value for name, value in data.items() if name not in EVENT_FIELDS}


def _gaps_of(value: object) -> list[GapRange]:
    if not isinstance(value, list):
        return []
    return [(g[0], g[1]) for g in value
            if isinstance(g, list) and len(g) == 2 and _is_seq(g[0]) and _is_seq(g[1])]
