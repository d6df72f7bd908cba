"""
The engine seams: what the rest of the server needs from a broker and from
presence, independent of where the state lives.

Two engines provide them: L{unrealon.engine.memory} (one process, the default
when no Redis URL is set) and L{unrealon.engine.redis} (a cluster of nodes on
one Redis).  The same conformance tests run against both.

Data flows one way: engines deliver what the cluster publishes to one
L{IDeliverySink} per node (the hub), which knows nothing about engines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@attrs.frozen
class RoomEvent:
    """
    A room event as every member receives it.

    C{message} is the encoded JSON-RPC notification, built once where the
    event was published; nodes pass the bytes on without re-encoding.
    """

    room: str
    cursor: str
    message: bytes


@attrs.frozen
class EphemeralEvent:
    """
    A notification for a room's members that is never stored or replayed
    (presence.joined / presence.left); C{exclude_user}'s own connections do
    not receive it.
    """

    room: str
    message: bytes
    exclude_user: str | None = None


@attrs.frozen
class Recovery:
    """
    The answer to "what did I miss in this room since C{since}".

    C{cursor} is the position of the latest event covered (the last of
    C{missed}, else the room's current position).  C{missed} holds the
    notifications, in order; it is empty unless C{recovered}.
    C{missed} and C{streaming} hold JSON values only: decoded ones, or
    L{unrealon.jsoncodec.RawJSON} (the Redis engine's stored text, which is
    what the codec makes of the notification); a reply sends them as they
    are.  L{unrealon.jsoncodec.RawJSON.value} decodes one.
    """

    cursor: str
    recovered: bool
    missed: tuple[Any, ...] = ()
    #: the room's streamed messages still streaming, each as one event with
    #: all of it so far (PROTOCOL.md section 4); empty when C{recovered}
    streaming: tuple[Any, ...] = ()


#: fields of a chunk's data that belong to the event, not to the message
CHUNK_FIELDS = frozenset({"content", "seq", "last_seq", "done", "error", "gaps"})


@attrs.frozen
class MessageChunk:
    """
    One chunk of a streamed message (PROTOCOL.md section 5.1): the
    C{seq}-th piece of message C{message_id} of a room.  C{fields} are the
    message's other fields (C{session_id}, C{role}, extras): delivered with
    every event of the message, as the first chunk received carried them.
    """

    message_id: str
    seq: int
    content: str
    done: bool = False
    error: str | None = None
    fields: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class PresenceUser:
    user_id: str
    info: Mapping[str, Any]
    connections: int


@attrs.frozen
class PresenceCount:
    users: int
    connections: int


class BackendUnavailable(Exception):
    """The engine cannot reach its store (Redis) in time; callers may retry."""


class IDeliverySink(Interface):
    """Where an engine hands what must reach this node's connections."""

    def deliver(event: RoomEvent) -> None:
        """A room event for the room's local members."""

    def deliver_ephemeral(event: EphemeralEvent) -> None:
        """A presence notification for the room's local members."""

    def disconnect_user(user_id: str, reason: str) -> None:
        """Close the user's local connections with 4003."""

    def resync(rooms: Sequence[str] | None) -> None:
        """
        Live delivery had a gap this engine could not fill (e.g. a long Redis
        outage): make the members of C{rooms} (None: all rooms) recover.
        """

    def unheard(room: str) -> None:
        """
        C{room}'s live events may have stopped reaching this node (its
        channel dropped, or a gap showed): its members now may lack some.
        """

    def heard(room: str, complete: bool) -> None:
        """
        C{room} is heard again after L{unheard}: C{complete} if what was
        missed meanwhile was delivered, else the members it found there make
        their clients recover (members that arrived since read the history
        themselves and lack nothing).
        """


class IBroker(Interface):
    """Publish room events, keep their history, fan them out to nodes."""

    sink = Attribute("the L{IDeliverySink} this node's events go to")

    def start() -> Deferred[None]:
        """Begin receiving the cluster's events."""

    def stop() -> Deferred[None]:
        """Stop receiving; release connections."""

    def publish(
        room: str, event: str, data: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Deferred[str]:
        """
        Append an event to the room's history and deliver it to every member
        on every node, atomically.  A second publish with the same
        C{idempotency_key} does nothing and gives the first one's cursor.
        Fires with the event's cursor.
        """

    def append_chunk(room: str, event: str, chunk: MessageChunk) -> Deferred[str]:
        """
        Add one chunk to a streamed message of C{room} (PROTOCOL.md section
        5.1): delivered in C{seq} order with the chunks before it, held
        back while an earlier one is missing (at most the gap wait, then
        reported in C{gaps}), ignored when repeated or after C{done}.  The
        message keeps one history entry.  Fires with the room's latest
        cursor.
        """

    def watch(room: str) -> Deferred[None]:
        """
        C{room} has a member on this node: deliver its events here from now
        on.  Fires once they are delivered (before that, L{recover} waits).
        """

    def unwatch(room: str) -> None:
        """C{room} has no member on this node any more: its events may stop."""

    def recover(room: str, since: str | None) -> Deferred[Recovery]:
        """
        The events after C{since} (None: none, just the current cursor),
        a streamed message as one event; and, unless recovered, the
        messages still streaming.  Read once the room's live events reach
        this node (L{watch}), so none published after the read is missed.
        """

    def cursor_key(cursor: str) -> tuple[Any, ...] | None:
        """
        An orderable key for a cursor of this engine, used by the hub to drop
        duplicates between a replay and buffered live events (clients never
        compare cursors; the server may).  None for a cursor it cannot read.
        """

    def publish_ephemeral(event: EphemeralEvent) -> Deferred[None]:
        """Deliver a never-stored notification to the room's members everywhere."""

    def disconnect_user(user_id: str, reason: str) -> Deferred[None]:
        """Close the user's connections on every node."""

    def healthy() -> Deferred[Mapping[str, Any] | None]:
        """The store's state for /health: None without a store, else {ok, latency_ms}."""


class IPresence(Interface):
    """Who is in which room, across the cluster."""

    def start() -> Deferred[None]:
        """Begin heartbeats / expiry sweeps."""

    def stop() -> Deferred[None]:
        """Remove this node's entries and stop."""

    def join(room: str, user_id: str, conn_id: str, info: Mapping[str, Any]) -> Deferred[None]:
        """
        Record a connection in a room; emit presence.joined for a user's
        first.  Callers need not wait for it: what this node asks the engine
        afterwards (a list, a leave) comes after it, and an entry whose write
        failed (the store away) is written again once the store is back.
        """

    def leave(room: str, user_id: str, conn_id: str) -> Deferred[None]:
        """
        Forget a connection; emit presence.left for a user's last.  A leave
        that comes before the connection's join (the connection closed or left
        while its rooms.join still waited on the store) cancels that join, so
        a connection that is gone never stays present.
        """

    def list(room: str) -> Deferred[Sequence[PresenceUser]]:
        """Users present in the room, with their connection counts."""

    def count(room: str) -> Deferred[PresenceCount]:
        """How many users and connections are in the room."""

    def online(user_ids: Sequence[str]) -> Deferred[Sequence[str]]:
        """Which of these users have at least one connection anywhere."""

    def connect(user_id: str, conn_id: str) -> Deferred[None]:
        """Record an authenticated connection (for C{online})."""

    def disconnect(user_id: str, conn_id: str) -> Deferred[None]:
        """Forget a connection (for C{online})."""


class IBackendLink(Interface):
    """
    How a node reaches backend workers (PROTOCOL.md section 9.3): calls
    and cancels out, the method directory and the replies in.
    """

    reply_to = Attribute("the stream workers answer this node's calls on")
    on_directory = Attribute(
        "called with (declarations by name as raw JSON, frozenset of the served names)"
    )
    on_reply = Attribute("called with each reply object (a decoded JSON object)")

    def append_call(payload_prefix: str, timeout_ms: int) -> Deferred[Any]:
        """Append a call; its JSON without the closing brace (the deadline goes there)."""

    def cancel(call_id: str, reason: str, lifetime_ms: int) -> Deferred[Any]:
        """Publish that a call is cancelled."""
