"""
One connection's rooms: which it is in, how it was admitted, and its joins.

PROTOCOL.md section 4: no event of a room reaches a connection before the
reply to its C{rooms.join}, and live events follow the last replayed one
without gap or duplicate.  So while a join waits on the store, the room's
live events are held (L{_Joining}); once the reply is written, the held
events after the reply's cursor are sent and later arrivals at or before it
are dropped (a node's feed may lag behind the history the reply read).

L{RoomMembership.join} is the whole join: admission is decided by the
caller (the C{rooms.join} handler), the rest -- holding, replay, presence,
undoing a failed join, releasing after the reply -- happens here, so the
join's state lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from unrealon.auth import Identity, may_join
from unrealon.deadlines import within_deadline
from unrealon.engine.interfaces import IBroker, IPresence, Recovery, RoomEvent
from unrealon.hub import Hub

log = Logger(namespace="unrealon.membership")


def presence_tracked(room: str) -> bool:
    """Presence is not tracked for the implicit rooms (PROTOCOL.md section 4)."""
    return not (room.startswith("user:") or room == "broadcast")


def implicit_rooms(user_id: str) -> tuple[str, str]:
    """The rooms every authenticated connection is in from the start."""
    return f"user:{user_id}", "broadcast"


@attrs.frozen
class Admission:
    """
    How a connection was let into a room: implicitly (its own user room and
    C{broadcast}), by a pattern of its token's C{rooms}, or by a room token
    (valid until C{expires_at}, whatever later connection tokens grant).
    """

    kind: str
    expires_at: float | None = None

    def token_valid(self, now: float, leeway: float) -> bool:
        return self.kind == "token" and self.expires_at is not None and (
            self.expires_at + leeway >= now
        )


IMPLICIT = Admission("implicit")
PATTERN = Admission("pattern")


def room_token(expires_at: float) -> Admission:
    return Admission("token", expires_at)


class IRoomConnection(Interface):
    """What L{RoomMembership} needs from its connection."""

    conn_id = Attribute("the connection's id, unique on this node")
    identity = Attribute("the connection's L{Identity}, or None")

    def deliver(event: RoomEvent, prepared: Any) -> None:
        """Send a room event now (it passed the join's checks)."""


class _Joining:
    """The joins of one room in progress on one connection."""

    __slots__ = ("floor", "held", "pending", "succeeded", "was_member")

    def __init__(self, was_member: bool) -> None:
        #: whether the connection was in the room before the first of them
        self.was_member = was_member
        #: joins begun and not yet finished or aborted
        self.pending = 0
        #: whether one of them succeeded
        self.succeeded = False
        #: the highest cursor key their replies covered
        self.floor: Any = None
        #: live events held meanwhile: (event, prepared message, cursor key)
        self.held: list[tuple[RoomEvent, Any, Any]] = []

    def raise_floor(self, key: Any) -> None:
        self.succeeded = True
        if key is None:
            return
        # a later epoch replaces the floor; in one epoch the highest wins
        if self.floor is None or key[0] != self.floor[0] or key > self.floor:
            self.floor = key


class RoomMembership:
    """The rooms of one connection, as the hub and the presence store see them."""

    __slots__ = ("_broker", "_clock", "_connection", "_floors", "_hub", "_joining", "_presence",
                 "rooms")

    def __init__(
        self,
        connection: IRoomConnection,
        hub: Hub,
        broker: IBroker,
        presence: IPresence,
        clock: Any,
    ) -> None:
        self._connection = connection
        self._hub = hub
        self._broker = broker
        self._presence = presence
        self._clock = clock
        #: rooms this connection is in -> how it was admitted
        self.rooms: dict[str, Admission] = {}
        #: rooms being joined -> live events held until the join's reply (made when needed)
        self._joining: dict[str, _Joining] | None = None
        #: rooms joined -> cursor key of the join's reply: live events at or
        #: before it were already in the reply (made when needed)
        self._floors: dict[str, Any] | None = None

    def enter_implicit(self, user_id: str) -> None:
        for room in implicit_rooms(user_id):
            self.rooms[room] = IMPLICIT
            self._hub.join(room, self._connection)

    # -- joining -------------------------------------------------------------------

    async def join(
        self, room: str, admission: Admission, since: str | None,
        after_reply: Callable[[Callable[[], None]], None],
    ) -> Recovery:
        """
        Join C{room}: hold its live events, read what the client missed
        since C{since}, record presence; the held events are released by
        C{after_reply} once the join's reply is written.  A failed read
        leaves the connection as it was: an error reply means it is not in
        the room.

        The presence entry is written once the read succeeded (a join that
        a close or leave overtook while the read waited is then dropped by
        the presence engine, and announces nothing), and the reply does not
        wait for that write: one Redis round trip per join instead of two,
        which is what a reconnect storm's rejoins wait on.  The engine sends
        the write before anything this node asks later (its reads flush it
        first), and a write that fails is put back by the engine's next
        heartbeat (L{IPresence.join}).
        """
        connection = self._connection
        was_member = self._begin_join(room, admission)
        identity: Identity | None = connection.identity
        track = not was_member and presence_tracked(room) and identity is not None
        try:
            recovery: Recovery = await within_deadline(
                self._broker.recover(room, since), self._clock
            )
        except BaseException:
            self._end_join(room)
            raise
        if track:
            assert identity is not None
            _quietly(self._presence.join(room, identity.user_id, connection.conn_id,
                                         identity.info), "presence.join")
        after_reply(lambda: self._finish_join(room, recovery.cursor))
        return recovery

    def _begin_join(self, room: str, admission: Admission) -> bool:
        """Start holding C{room}'s live events; whether the connection was in it already."""
        current = self.rooms.get(room)
        if current is None or current is not IMPLICIT:
            self.rooms[room] = admission
        joins = self._joining
        if joins is None:
            joins = self._joining = {}
        joining = joins.get(room)
        if joining is None:
            # a join while another of the same room waits shares its buffer:
            # replacing it would lose the events held for the first
            joining = joins[room] = _Joining(was_member=current is not None)
        joining.pending += 1
        self._hub.join(room, self._connection)
        return current is not None

    def _finish_join(self, room: str, cursor: str) -> None:
        joining = (self._joining or {}).get(room)
        if joining is not None:
            joining.raise_floor(self._broker.cursor_key(cursor))
            self._end_join(room)

    def _end_join(self, room: str) -> None:
        """
        One join of C{room} is over.  While another is still waiting, keep
        holding (its reply must come first); after the last, release what
        was held: after the highest cursor the joins' replies covered if any
        succeeded, else as before the joins (member) or not at all.
        """
        joins = self._joining
        joining = joins.get(room) if joins is not None else None
        if joining is None:
            return
        joining.pending -= 1
        if joining.pending > 0:
            return
        del joins[room]  # type: ignore[union-attr]
        if joining.floor is not None:
            if self._floors is None:
                self._floors = {}
            self._floors[room] = joining.floor
        elif not (joining.succeeded or joining.was_member):
            self.rooms.pop(room, None)
            self._hub.leave(room, self._connection)
            return
        for event, prepared, key in joining.held:
            self.route(event, prepared, key)

    # -- leaving ---------------------------------------------------------------------

    def leave(self, room: str) -> None:
        """Leave C{room} (its presence entry too)."""
        self.rooms.pop(room, None)
        if self._joining:
            self._joining.pop(room, None)
        if self._floors:
            self._floors.pop(room, None)
        self._hub.leave(room, self._connection)
        identity = self._connection.identity
        if identity is not None and presence_tracked(room):
            _quietly(self._presence.leave(room, identity.user_id, self._connection.conn_id),
                     "presence.leave")

    def revoke(self, identity: Identity, leeway: float) -> list[str]:
        """
        A newer token is in force: leave the rooms it no longer grants (a
        room admitted by a room token that is still valid stays), and say
        which.
        """
        now = self._clock.seconds()
        revoked = []
        for room, admission in list(self.rooms.items()):
            if admission is IMPLICIT or admission.token_valid(now, leeway):
                continue
            if may_join(identity.room_patterns, room):
                self.rooms[room] = PATTERN
                continue
            self.leave(room)
            revoked.append(room)
        return revoked

    def close(self) -> None:
        """The connection is gone: forget its rooms and withdraw its presence."""
        identity = self._connection.identity
        if identity is not None:
            for room in self.rooms:
                if presence_tracked(room):
                    _quietly(
                        self._presence.leave(room, identity.user_id, self._connection.conn_id),
                        "presence.leave",
                    )
        self._joining = self._floors = None
        self.rooms.clear()

    # -- live events -------------------------------------------------------------------

    def route(self, event: RoomEvent, prepared: Any, key: Any) -> None:
        """A live event of one of our rooms: hold it, drop it as replayed, or send it."""
        joins = self._joining
        if joins:
            joining = joins.get(event.room)
            if joining is not None:
                joining.held.append((event, prepared, key))
                return
        floors = self._floors
        if floors:
            floor = floors.get(event.room)
            if floor is not None:
                if key is not None and key[0] == floor[0] and key <= floor:
                    return  # already sent in the join's reply
                # events arrive in cursor order: nothing older can follow
                del floors[event.room]
        self._connection.deliver(event, prepared)


def _quietly(d: Deferred[Any], what: str) -> None:
    d.addErrback(lambda f: log.failure("{what} failed", f, what=what))
