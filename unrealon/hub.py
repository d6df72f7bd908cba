"""
This node's connections, by user and by room, and delivery to them.

The hub is where the engine's fan-out ends: an event arrives once per node
as encoded bytes, is framed once (an Autobahn prepared message) and handed
to every local member of its room.  It knows nothing about Redis or the
engine; it sees members only through L{IMember}.  It tells the engine which
rooms have local members (L{IBroker.watch}), so that only their events come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from unrealon.engine.interfaces import EphemeralEvent, IBroker, IDeliverySink, RoomEvent

log = Logger(namespace="unrealon.hub")


class IMember(Interface):
    """What the hub needs from a connection."""

    user_id = Attribute("the authenticated user id, or None")

    def send_event(event: RoomEvent, prepared: Any, key: Any) -> None:
        """
        Send (or hold, while joining) one room event; C{key} is its cursor's
        order key (None if unreadable), computed once for all members.
        """

    def send_prepared(prepared: Any) -> None:
        """Send an already framed message."""

    def close_by_backend(reason: str) -> None:
        """Close with 4003 (connections.disconnect)."""

    def resync(room: str) -> None:
        """Live delivery of C{room} had a gap: make the client recover."""


@implementer(IDeliverySink)
class Hub:
    """Local membership and delivery."""

    def __init__(
        self, prepare: Callable[[bytes], Any], cursor_key: Callable[[str], Any]
    ) -> None:
        """
        @param prepare: frames a message once for many connections (an
            Autobahn C{PreparedMessage}).
        @param cursor_key: the engine's order of cursors (L{IBroker.cursor_key}).
        """
        self.prepare = prepare
        self.cursor_key = cursor_key
        #: told when a room gets its first local member and loses its last
        #: (the broker: interest routing); set once the broker exists
        self.interest: IBroker | None = None
        self.members: set[Any] = set()
        self._by_user: dict[str, set[Any]] = {}
        self._rooms: dict[str, set[Any]] = {}
        #: rooms not heard for a while -> their members at that moment
        self._unheard: dict[str, set[Any]] = {}
        self.delivered = 0

    # -- membership ------------------------------------------------------------

    def add(self, member: Any) -> None:
        self.members.add(member)

    def remove(self, member: Any) -> None:
        self.members.discard(member)
        user = member.user_id
        if user is not None:
            conns = self._by_user.get(user)
            if conns is not None:
                conns.discard(member)
                if not conns:
                    del self._by_user[user]
        for room in list(self._rooms):
            self.leave(room, member)

    def bind_user(self, member: Any, user_id: str) -> None:
        self._by_user.setdefault(user_id, set()).add(member)

    def user_connections(self, user_id: str) -> int:
        return len(self._by_user.get(user_id, ()))

    def join(self, room: str, member: Any) -> None:
        members = self._rooms.get(room)
        if members is None:
            members = self._rooms[room] = set()
            if self.interest is not None:
                self.interest.watch(room).addErrback(
                    lambda f: log.failure("listening to {room} failed", f, room=room)
                )
        members.add(member)

    def leave(self, room: str, member: Any) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.discard(member)
            if not members:
                del self._rooms[room]
                if self.interest is not None:
                    self.interest.unwatch(room)

    def ready(self, rooms: Iterable[str]) -> Deferred[Any] | None:
        """
        Fires once the live events of C{rooms} reach this node; None when
        they already do (nothing to wait for: the common case, a user's
        second connection or a room already heard).  A room with no local
        member yet (a handshake about to open a connection in it) is
        listened to for the engine's grace period, which its member's
        arrival turns into for good.
        """
        interest = self.interest
        if interest is None:
            return None
        waits = []
        for room in rooms:
            d = interest.watch(room)
            if room not in self._rooms:
                interest.unwatch(room)
            if not d.called:
                waits.append(d)
        return gatherResults(waits, consumeErrors=True) if waits else None

    def room_members(self, room: str) -> Sequence[Any]:
        return list(self._rooms.get(room, ()))

    @property
    def connection_count(self) -> int:
        return len(self.members)

    @property
    def user_count(self) -> int:
        return len(self._by_user)

    @property
    def room_count(self) -> int:
        return len(self._rooms)

    def rooms(self) -> Iterable[str]:
        return list(self._rooms)

    # -- IDeliverySink ---------------------------------------------------------

    def deliver(self, event: RoomEvent) -> None:
        members = self._rooms.get(event.room)
        if not members:
            return
        prepared = self.prepare(event.message)
        key = self.cursor_key(event.cursor)
        # a member may close (and leave) while we send: iterate a copy
        for member in list(members):
            member.send_event(event, prepared, key)
        self.delivered += len(members)

    def deliver_ephemeral(self, event: EphemeralEvent) -> None:
        members = self._rooms.get(event.room)
        if not members:
            return
        targets = [m for m in members if m.user_id != event.exclude_user]
        if not targets:
            return
        prepared = self.prepare(event.message)
        for member in targets:
            member.send_prepared(prepared)

    def disconnect_user(self, user_id: str, reason: str) -> None:
        for member in list(self._by_user.get(user_id, ())):
            member.close_by_backend(reason)

    def unheard(self, room: str) -> None:
        if room not in self._unheard:
            self._unheard[room] = set(self._rooms.get(room, ()))

    def heard(self, room: str, complete: bool) -> None:
        before = self._unheard.pop(room, None)
        if complete:
            return
        members = self._rooms.get(room, set())
        for member in list(members if before is None else members & before):
            member.resync(room)

    def resync(self, rooms: Sequence[str] | None) -> None:
        names = list(self._rooms) if rooms is None else rooms
        for room in names:
            for member in list(self._rooms.get(room, ())):
                member.resync(room)
