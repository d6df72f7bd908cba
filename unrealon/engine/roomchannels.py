"""
Interest routing: a node hears only the rooms where it has members.

Every room has a Pub/Sub channel (L{unrealon.engine.rediskeys.room_channel});
the scripts that add to a room's history publish the event there, with the
history id it follows, and presence notifications go there too.  A node
subscribes to a room's channel when the room's first local member arrives
(the hub says so, L{RoomChannels.watch}) and unsubscribes L{GRACE} seconds
after its last one left, so a browser that reconnects at once finds it
still there.  A node with no member in a room never receives its events:
that is what lets a cluster grow by adding nodes (docs/cluster-design.md).

Guarantees (PROTOCOL.md sections 4 and 5), and how they are kept:

  - Nothing between a join's replay and live delivery is lost: the join
    reads the history only once the channel is live (L{RoomChannels.ready});
    what was published in between comes both ways, and the connection's
    membership drops what the reply already had (L{unrealon.membership}).
  - One order per room: Redis runs a room's scripts one at a time and sends
    one connection's messages in order.
  - No gap: each event carries the id of the history entry before it.  The
    node keeps the last id it delivered per room (its position); an event
    that does not follow it means messages were lost (the subscriber
    connection dropped, Redis failed over).  The node then repairs the gap
    itself: it reads what followed its position from the room's history
    (the same script a rejoin uses, so a streamed message comes compacted
    into one event) and delivers that, holding live events back meanwhile.
    Clients see nothing.  Only when the history no longer covers the gap
    are the room's clients sent down the contract's recovery path (they
    rejoin with their cursors: L{IDeliverySink.heard}); only those that
    were members before the gap: a member that arrived since read the
    history itself.
  - After the subscriber connection comes back, every room is subscribed
    again and then repaired from its position, which finds what was
    published while the node was away.

With rooms sharded over several Redis instances (L{unrealon.engine.roomshards})
there is one L{RoomChannels} per shard; the first one also listens to the
rooms of the other shards for their presence notifications only, which the
presence scripts publish there (C{watch(room, events=False)}): no position,
no repair.

The position of a room whose channel delivered nothing yet is the history's
last id when the subscription became live (read once, L{position_of}); a
room with neither (the connection dropped before that read returned) is
resynced, which is rare and always safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from unrealon.engine.interfaces import EphemeralEvent, IDeliverySink, RoomEvent
from unrealon.engine.pubsub import ISubscriptionListener, SubscriberConnection, SubscriberProtocol
from unrealon.engine.redisclient import stream_id_key
from unrealon.engine.rediskeys import room_channel
from unrealon.engine.supervision import ISupervised, RedisLink, redis_down

log = Logger(namespace="unrealon.engine.roomchannels")

#: seconds a room stays subscribed after its last local member left
GRACE = 5.0
#: seconds between attempts at a repair that failed (Redis unreachable)
REPAIR_RETRY = 0.5


@attrs.frozen
class Repair:
    """What a room's history says followed a position (L{RoomChannels} C{repair})."""

    #: the history's position at the time of the read
    cursor: str
    #: whether C{missed} is everything after the position
    recovered: bool
    #: (cursor, notification) of each event after the position, in order
    missed: tuple[tuple[str, bytes], ...] = ()


class _Room:
    """One room this node listens to."""

    __slots__ = ("baseline", "channel", "drop", "epoch", "events", "last", "live", "name",
                 "queued", "recheck", "repairing", "waiters", "wanted", "was_live")

    def __init__(self, name: str, channel: bytes, events: bool) -> None:
        self.name = name
        self.channel = channel
        #: the room's events come here (else only its presence notifications:
        #: the room is on another shard)
        self.events = events
        #: a local member is in the room (else it is in its grace period)
        self.wanted = True
        #: subscribed on the current connection
        self.live = False
        #: was live on an earlier connection (a reconnect must repair it)
        self.was_live = False
        #: the position: epoch and history id of the last event delivered
        self.epoch: str | None = None
        self.last = "0-0"
        #: the history's cursor when the subscription became live, until
        #: the channel delivers an event
        self.baseline: str | None = None
        self.repairing = False
        #: the subscription came back while a repair was reading: read again after it
        self.recheck = False
        #: events received during a repair: (previous id, cursor, notification)
        self.queued: list[tuple[str, str, bytes]] = []
        self.waiters: list[Deferred[None]] = []
        self.drop: IDelayedCall | None = None


@implementer(ISubscriptionListener, ISupervised)
class RoomChannels:
    """The room channels this node is subscribed to, and their positions."""

    def __init__(
        self,
        reactor: IReactorTime,
        sink: IDeliverySink,
        connection: SubscriberConnection,
        prefix: str,
        *,
        repair: Callable[[str, str], Deferred[Repair]],
        position_of: Callable[[str], Deferred[str]],
        link: RedisLink | None = None,
        grace: float = GRACE,
        name: str = "room channels",
    ) -> None:
        """
        @param repair: reads what followed a cursor in a room's history.
        @param position_of: the cursor of a room's latest event.
        @param prefix: L{unrealon.engine.rediskeys.room_channel_prefix}.
        @param name: for logs and /health (which shard, when rooms are sharded).
        """
        self.name = name
        self._reactor = reactor
        self._sink = sink
        self._connection = connection
        self._prefix = prefix
        self._repair_from = repair
        self._position_of = position_of
        self._link = link
        self._grace = grace
        self._rooms: dict[str, _Room] = {}
        self._by_channel: dict[bytes, _Room] = {}
        self._protocol: SubscriberProtocol | None = None
        self._to_subscribe: list[bytes] = []
        self._flush: IDelayedCall | None = None
        #: messages received on room channels (the foreign-event bench reads it)
        self.received = 0
        #: gaps repaired from history, and gaps it could not repair
        self.repaired = 0
        self.resynced = 0

    # -- the hub's interest --------------------------------------------------------

    def watch(self, room: str, events: bool = True) -> Deferred[None]:
        """
        A room has a local member: listen to it; fires once its channel is
        live.  C{events=False}: the room's events are on another shard, only
        its presence notifications come here.
        """
        state = self._rooms.get(room)
        if state is None:
            channel = room_channel(self._prefix, room).encode()
            state = self._rooms[room] = self._by_channel[channel] = _Room(room, channel, events)
            self._subscribe(state)
        else:
            state.wanted = True
            if state.drop is not None and state.drop.active():
                state.drop.cancel()
            state.drop = None
        return self.ready(room)

    def unwatch(self, room: str) -> None:
        """A room's last local member left: stop listening after the grace period."""
        state = self._rooms.get(room)
        if state is None or not state.wanted:
            return
        state.wanted = False
        state.drop = self._reactor.callLater(self._grace, self._drop, state)

    def ready(self, room: str) -> Deferred[None]:
        """Fires once the room's channel is live (at once if it is, or not watched)."""
        state = self._rooms.get(room)
        if state is None or state.live:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: state.waiters.remove(d))
        state.waiters.append(waiter)
        return waiter

    @property
    def room_count(self) -> int:
        """Rooms subscribed to (or being): with local members, or in their grace period."""
        return len(self._rooms)

    def _drop(self, state: _Room) -> None:
        state.drop = None
        if state.wanted:
            return
        del self._rooms[state.name]
        del self._by_channel[state.channel]
        if state.live and self._protocol is not None:
            self._protocol.unsubscribe([state.channel])

    def _subscribe(self, state: _Room) -> None:
        """Subscribe at the end of this reactor turn, with the turn's other rooms."""
        if self._protocol is None:
            return  # subscribed when the connection comes (connected)
        self._to_subscribe.append(state.channel)
        if self._flush is None:
            self._flush = self._reactor.callLater(0, self._send_subscribes)

    def _send_subscribes(self) -> None:
        self._flush = None
        channels, self._to_subscribe = self._to_subscribe, []
        if self._protocol is not None and channels:
            self._protocol.subscribe(channels)

    # -- the subscriber connection (ISubscriptionListener) ------------------------------

    def start(self) -> None:
        self._connection.start(self)

    def stop(self) -> Deferred[None]:
        for state in self._rooms.values():
            if state.drop is not None and state.drop.active():
                state.drop.cancel()
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        return self._connection.stop()

    def working(self) -> bool:
        return self._protocol is not None

    def connected(self, protocol: SubscriberProtocol) -> None:
        self._protocol = protocol
        if self._link is not None:
            self._link.succeeded()
        self._to_subscribe = [state.channel for state in self._rooms.values()]
        self._send_subscribes()

    def disconnected(self) -> None:
        self._protocol = None
        if self._link is not None:
            self._link.failed(ConnectionError("the subscriber connection was lost"),
                              "room channels")
        for state in self._rooms.values():
            if state.live:
                state.live = False
                if state.events:
                    state.was_live = True
                    self._sink.unheard(state.name)

    def subscribed(self, channel: bytes) -> None:
        state = self._by_channel.get(channel)
        if state is None or state.live:
            return
        state.live = True
        waiters, state.waiters = state.waiters, []
        if not state.events:
            pass  # presence only: nothing to repair
        elif state.repairing:
            state.recheck = True
        elif state.was_live:
            # anything published while we were away is in the history
            since = self._cursor(state) or state.baseline
            if since is None:
                self._resync(state, "no position known when the subscription came back")
                self._sink.heard(state.name, False)
            else:
                self._repair(state, since)
        elif state.epoch is None and state.baseline is None:
            self._read_baseline(state)
        for waiter in waiters:
            waiter.callback(None)

    def message(self, channel: bytes, payload: bytes) -> None:
        self.received += 1
        state = self._by_channel.get(channel)
        if state is None or not state.live:
            return  # published before our subscription: the join's replay has it
        # the notification stays the bytes Redis sent (it is framed as is);
        # only the short position fields are decoded
        try:
            kind = payload[:1]
            if kind == b"e" and not state.events:
                log.warn("an event of {room} came on a shard that does not hold the room: "
                         "do all nodes have the same UNREALON_REDIS_SHARDS?", room=state.name)
            elif kind == b"e":
                raw_previous, raw_cursor, notification = payload[1:].split(b"\n", 2)
                previous, cursor = raw_previous.decode(), raw_cursor.decode()
                if state.repairing:
                    state.queued.append((previous, cursor, notification))
                else:
                    self._accept(state, previous, cursor, notification)
            elif kind == b"p":
                user, _, notification = payload[1:].partition(b"\n")
                self._sink.deliver_ephemeral(EphemeralEvent(
                    room=state.name, message=notification, exclude_user=user.decode() or None,
                ))
            else:
                log.warn("unknown message on {room}'s channel", room=state.name)
        except ValueError:
            log.warn("malformed message on {room}'s channel", room=state.name)

    # -- positions and repair --------------------------------------------------------

    @staticmethod
    def _cursor(state: _Room) -> str | None:
        return None if state.epoch is None else f"{state.epoch}:{state.last}"

    def _accept(self, state: _Room, previous: str, cursor: str, notification: bytes) -> None:
        """An event off the channel: deliver it, drop it (seen), or repair a gap first."""
        epoch, _, last = cursor.partition(":")
        if state.epoch is not None:
            if epoch == state.epoch:
                if stream_id_key(last) <= stream_id_key(state.last):
                    return  # already delivered by a repair
                follows = previous == state.last
            else:
                # a new history (the old one expired): it starts from nothing
                follows = previous == "0-0"
            if not follows:
                log.info("events of {room} were lost after {position}; repairing from history",
                         room=state.name, position=self._cursor(state))
                state.queued.append((previous, cursor, notification))
                self._sink.unheard(state.name)
                self._repair(state, f"{state.epoch}:{state.last}")
                return
        state.epoch, state.last = epoch, last
        self._sink.deliver(RoomEvent(room=state.name, cursor=cursor, message=notification))

    def _repair(self, state: _Room, since: str) -> None:
        state.repairing = True
        d = self._repair_from(state.name, since)
        d.addCallbacks(self._repaired, self._repair_failed,
                       callbackArgs=(state,), errbackArgs=(state, since))

    def _repaired(self, repair: Repair, state: _Room) -> None:
        if self._rooms.get(state.name) is not state:
            return  # dropped meanwhile
        if repair.recovered:
            for cursor, message in repair.missed:
                self._sink.deliver(RoomEvent(room=state.name, cursor=cursor, message=message))
            self.repaired += 1
            if repair.missed:
                log.info("repaired {room}: {count} events delivered from history",
                         room=state.name, count=len(repair.missed))
        else:
            self._resync(state, "the history no longer covers the gap")
        self._sink.heard(state.name, repair.recovered)
        state.epoch, _, state.last = repair.cursor.partition(":")
        state.baseline = None
        state.repairing = False
        queued, state.queued = state.queued, []
        for index, (previous, cursor, notification) in enumerate(queued):
            self._accept(state, previous, cursor, notification)
            if state.repairing:  # another gap: the rest waits for that repair
                state.queued = queued[index + 1 :] + state.queued
                return
        if state.recheck:
            state.recheck = False
            self._repair(state, f"{state.epoch}:{state.last}")

    def _repair_failed(self, failure: Any, state: _Room, since: str) -> None:
        if self._rooms.get(state.name) is not state:
            return
        if not (failure.value is not None and redis_down(failure.value)):
            log.failure("repairing {room} failed", failure, room=state.name)
        self._reactor.callLater(REPAIR_RETRY, self._retry_repair, state, since)

    def _retry_repair(self, state: _Room, since: str) -> None:
        if self._rooms.get(state.name) is state:
            self._repair(state, since)

    def _resync(self, state: _Room, why: str) -> None:
        log.warn("the clients of {room} must recover: {why}", room=state.name, why=why)
        self.resynced += 1

    def _read_baseline(self, state: _Room) -> None:
        def known(cursor: str) -> None:
            if state.epoch is None:
                state.baseline = cursor

        d = self._position_of(state.name)
        d.addCallbacks(known, lambda f: log.info(
            "reading {room}'s position failed ({error}); a reconnect before its first "
            "event will resync it", room=state.name, error=f.getErrorMessage()))
