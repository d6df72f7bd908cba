"""
The in-memory engine: broker, history and presence inside one process.

Used when no Redis URL is configured, so a single node works with nothing
else running (development, tests, small installs).  It keeps the same
contract as the Redis engine -- bounded per-room history with an epoch,
idempotent publishing, presence joined/left per user -- and passes the same
conformance tests; it just cannot span nodes.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from unrealon import jsoncodec
from unrealon.engine.interfaces import (
    CHUNK_FIELDS,
    EphemeralEvent,
    IBroker,
    IDeliverySink,
    IPresence,
    MessageChunk,
    PresenceCount,
    PresenceUser,
    Recovery,
    RoomEvent,
)
from unrealon.engine.memorymessages import StreamedMessage
from unrealon.engine.supervision import SupervisedLoop
from unrealon.jsonrpc import encode, notification


def event_message(event: str, room: str, cursor: str, data: Mapping[str, Any]) -> bytes:
    """The notification every member of C{room} receives for one event."""
    return encode(notification(event, {"room": room, "cursor": cursor, "data": data}))


@attrs.define
class RoomHistory:
    """
    One room's retained events.  C{epoch} changes whenever the history is
    lost (expiry), so a cursor from before can never be mistaken for one
    from after.
    """

    epoch: str
    last_seq: int = 0
    last_publish: float = 0.0
    #: an event's notification, or the streamed message whose latest event
    #: stands at that position (its one entry, PROTOCOL.md section 5.1)
    entries: deque[tuple[int, bytes | StreamedMessage]] = attrs.field(factory=deque)
    #: the last position trimmed from the head: a replay from before it is incomplete
    trimmed: int = 0
    messages: dict[str, StreamedMessage] = attrs.field(factory=dict)

    def append(self, item: bytes | StreamedMessage, size: int) -> None:
        """Add the entry at position C{last_seq}, keeping C{size} entries."""
        self.entries.append((self.last_seq, item))
        while len(self.entries) > size:
            self.trimmed, gone = self.entries.popleft()
            # a message still streaming goes on (as in Redis, where its keys
            # outlive a trimmed marker); a finished one is forgotten
            if isinstance(gone, StreamedMessage) and gone.done:
                del self.messages[gone.message_id]

    def cursor(self, seq: int | None = None) -> str:
        return f"{self.epoch}-{self.last_seq if seq is None else seq}"


def cursor_key(cursor: str) -> tuple[str, int] | None:
    """The memory engine's order key of a cursor (None if it is not one of ours)."""
    epoch, sep, seq = cursor.rpartition("-")
    # isascii: str.isdigit() also accepts digits int() refuses ("²")
    if not sep or not epoch or not (seq.isascii() and seq.isdigit()) or len(seq) > 19:
        return None
    return epoch, int(seq)


@implementer(IBroker)
class MemoryBroker:
    """Rooms, history and fan-out for a single process."""

    def __init__(
        self,
        clock: IReactorTime,
        sink: IDeliverySink,
        *,
        history_size: int,
        history_ttl: float,
        gap_wait: float = 2.0,
        count_chunk: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.sink = sink
        self._count_chunk = count_chunk
        self._clock = clock
        self._size = history_size
        self._ttl = history_ttl
        self._rooms: dict[str, RoomHistory] = {}
        self._published: dict[str, tuple[str, float]] = {}
        self._gap_wait = gap_wait
        #: (room, message id) of the messages holding chunks back
        self._holding: set[tuple[str, str]] = set()
        self.loops = (
            SupervisedLoop("history expiry", clock, min(self._ttl, 60.0), self.sweep),
            SupervisedLoop("streamed message release", clock, 0.25, self.release_due),
        )

    def start(self) -> Deferred[None]:
        for loop in self.loops:
            loop.start()
        return succeed(None)

    def stop(self) -> Deferred[None]:
        for loop in self.loops:
            loop.stop()
        return succeed(None)

    def sweep(self) -> None:
        """Forget histories and idempotency keys older than the TTL."""
        cutoff = self._clock.seconds() - self._ttl
        for room in [r for r, h in self._rooms.items() if h.last_publish < cutoff]:
            del self._rooms[room]
        for key in [k for k, (_, t) in self._published.items() if t < cutoff]:
            del self._published[key]

    def _history(self, room: str) -> RoomHistory:
        history = self._rooms.get(room)
        now = self._clock.seconds()
        if history is None or history.last_publish < now - self._ttl:
            history = RoomHistory(epoch=secrets.token_hex(4), last_publish=now)
            self._rooms[room] = history
        return history

    def publish(
        self, room: str, event: str, data: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Deferred[str]:
        now = self._clock.seconds()
        if idempotency_key is not None:
            done = self._published.get(idempotency_key)
            if done is not None:
                return succeed(done[0])
        history = self._history(room)
        history.last_seq += 1
        history.last_publish = now
        cursor = history.cursor()
        message = event_message(event, room, cursor, data)
        history.append(message, self._size)
        if idempotency_key is not None:
            self._published[idempotency_key] = (cursor, now)
        self.sink.deliver(RoomEvent(room=room, cursor=cursor, message=message))
        return succeed(cursor)

    # -- streamed messages (PROTOCOL.md section 5.1) ------------------------------

    def append_chunk(self, room: str, event: str, chunk: MessageChunk) -> Deferred[str]:
        now = self._clock.seconds()
        history = self._history(room)
        history.last_publish = now
        message = history.messages.get(chunk.message_id)
        if message is None:
            fields = {k: v for k, v in chunk.fields.items() if k not in CHUNK_FIELDS}
            message = StreamedMessage(chunk.message_id, event, fields, now)
            history.messages[chunk.message_id] = message
        message.last_chunk_at = now
        run = message.accept(chunk, now, self._gap_wait)
        if message.due is not None:
            self._holding.add((room, chunk.message_id))
        if run:
            self._deliver(room, history, message, run, [])
            self._count_chunk("delivered")
        else:
            self._count_chunk("held" if message.held.get(chunk.seq) is chunk else "ignored")
        return succeed(history.cursor())

    def release_due(self) -> None:
        """Deliver the held chunks of messages whose gap wait is over."""
        now = self._clock.seconds()
        for room, message_id in list(self._holding):
            history = self._rooms.get(room)
            message = history.messages.get(message_id) if history else None
            if history is None or message is None or message.due is None:
                self._holding.discard((room, message_id))
            elif message.due <= now:
                self._holding.discard((room, message_id))
                run, gaps = message.release()
                self._deliver(room, history, message, run, gaps)
                self._count_chunk("released")

    def _deliver(self, room: str, history: RoomHistory, message: StreamedMessage,
                 run: list[MessageChunk], gaps: list[tuple[int, int]]) -> None:
        first, last = message.next_seq, run[-1].seq
        content = "".join(c.content for c in run)
        done = run[-1].done
        error = run[-1].error if done else None
        if message.deliveries and history.trimmed < message.position:
            history.entries.remove((message.position, message))
        history.last_seq += 1
        message.record(history.last_seq, first, last, content, done, error, gaps)
        history.append(message, self._size)
        cursor = history.cursor()
        data = message.event_data(first, last, content, done, error)
        self.sink.deliver(RoomEvent(
            room=room, cursor=cursor, message=event_message(message.event, room, cursor, data)
        ))

    def _streaming(self, room: str, history: RoomHistory) -> tuple[Any, ...]:
        alive = self._clock.seconds() - self._ttl
        return tuple(
            jsoncodec.decode(self._message_event(room, history, m, None))
            for m in history.messages.values()
            if m.deliveries and not m.done and m.last_chunk_at >= alive
        )

    def _message_event(self, room: str, history: RoomHistory, message: StreamedMessage,
                       after: int | None) -> bytes:
        cursor = history.cursor(message.position)
        return event_message(message.event, room, cursor, message.data(after))

    def watch(self, room: str) -> Deferred[None]:
        return succeed(None)  # one node: every room's events are here

    def unwatch(self, room: str) -> None:
        pass

    def recover(self, room: str, since: str | None) -> Deferred[Recovery]:
        history = self._history(room)
        current = history.cursor()
        parsed = cursor_key(since) if since is not None else None
        if (
            parsed is None or parsed[0] != history.epoch or parsed[1] > history.last_seq
            # entries after `since` were trimmed
            or parsed[1] < history.trimmed
        ):
            return succeed(Recovery(
                cursor=current, recovered=False, streaming=self._streaming(room, history)
            ))
        since_seq = parsed[1]
        missed = tuple(
            jsoncodec.decode(
                self._message_event(room, history, item, since_seq)
                if isinstance(item, StreamedMessage) else item
            )
            for seq, item in history.entries if seq > since_seq
        )
        return succeed(Recovery(cursor=current, recovered=True, missed=missed))

    def cursor_key(self, cursor: str) -> tuple[Any, ...] | None:
        parsed = cursor_key(cursor)
        return None if parsed is None else (parsed[0], parsed[1])

    def publish_ephemeral(self, event: EphemeralEvent) -> Deferred[None]:
        self.sink.deliver_ephemeral(event)
        return succeed(None)

    def disconnect_user(self, user_id: str, reason: str) -> Deferred[None]:
        self.sink.disconnect_user(user_id, reason)
        return succeed(None)

    def healthy(self) -> Deferred[Mapping[str, Any] | None]:
        return succeed(None)


def presence_message(method: str, params: Mapping[str, Any]) -> bytes:
    return encode(notification(method, params))


@implementer(IPresence)
class MemoryPresence:
    """Presence for a single process; events go out through the broker."""

    def __init__(self, publish: Callable[[EphemeralEvent], Deferred[None]]) -> None:
        self._publish = publish
        # room -> user -> conn -> info
        self._rooms: dict[str, dict[str, dict[str, Mapping[str, Any]]]] = {}
        self._online: dict[str, set[str]] = {}
        #: (room, user, conn) that left before joining: that join is dropped
        self._cancelled: dict[tuple[str, str, str], bool] = {}

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def join(
        self, room: str, user_id: str, conn_id: str, info: Mapping[str, Any]
    ) -> Deferred[None]:
        if self._cancelled.pop((room, user_id, conn_id), False):
            return succeed(None)
        users = self._rooms.setdefault(room, {})
        first = user_id not in users
        users.setdefault(user_id, {})[conn_id] = info
        if first:
            return self._publish(
                EphemeralEvent(
                    room,
                    presence_message(
                        "presence.joined", {"room": room, "user_id": user_id, "info": info}
                    ),
                    exclude_user=user_id,
                )
            )
        return succeed(None)

    def leave(self, room: str, user_id: str, conn_id: str) -> Deferred[None]:
        users = self._rooms.get(room)
        conns = users.get(user_id) if users else None
        if users is None or conns is None or conn_id not in conns:
            self._cancelled[(room, user_id, conn_id)] = True
            while len(self._cancelled) > 10_000:
                del self._cancelled[next(iter(self._cancelled))]
            return succeed(None)
        del conns[conn_id]
        if conns:
            return succeed(None)
        del users[user_id]
        if not users:
            del self._rooms[room]
        return self._publish(
            EphemeralEvent(
                room,
                presence_message("presence.left", {"room": room, "user_id": user_id}),
                exclude_user=user_id,
            )
        )

    def list(self, room: str) -> Deferred[Sequence[PresenceUser]]:
        users = self._rooms.get(room, {})
        return succeed(
            [
                PresenceUser(
                    user_id=user,
                    info=next(iter(conns.values())),
                    connections=len(conns),
                )
                for user, conns in sorted(users.items())
            ]
        )

    def count(self, room: str) -> Deferred[PresenceCount]:
        users = self._rooms.get(room, {})
        return succeed(
            PresenceCount(
                users=len(users), connections=sum(len(c) for c in users.values())
            )
        )

    def online(self, user_ids: Sequence[str]) -> Deferred[Sequence[str]]:
        return succeed([u for u in user_ids if self._online.get(u)])

    def connect(self, user_id: str, conn_id: str) -> Deferred[None]:
        self._online.setdefault(user_id, set()).add(conn_id)
        return succeed(None)

    def disconnect(self, user_id: str, conn_id: str) -> Deferred[None]:
        conns = self._online.get(user_id)
        if conns is not None:
            conns.discard(conn_id)
            if not conns:
                del self._online[user_id]
        return succeed(None)
