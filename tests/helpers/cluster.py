"""
A cluster of real node processes on one private redis-server, and what the
tests observe with.

L{start_cluster} starts several L{NodeProcess}es at once (in parallel: a
node takes about a second to import and start).  L{redis_broker} is a
broker of the Redis engine in the test process (to publish like a node, or
to watch what an engine hands to its node).  L{Tap} records what a real
client receives (events with the replays of its joins in place, presence,
barrier markers); L{FakeSink} records what an engine hands to its node.

Typical use::

    server = yield start_redis(self)
    n1, n2 = yield start_cluster(self, server.url, 2, UNREALON_PRESENCE_TTL="3")
    client = yield n1.connect(mint_token("alice"))
    yield n2.kill()
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.helpers.node import WSClient
from tests.helpers.process import NodeProcess
from tests.helpers.waiting import wait_until
from unrealon.engine.interfaces import EphemeralEvent, IDeliverySink, RoomEvent

#: the event name the cluster tests publish
EVENT = "test.event"
#: the event a barrier publishes (L{Tap.barrier})
BARRIER = "test.barrier"


def start_cluster(
    testcase: TestCase, redis_url: str, count: int, **env: str
) -> Deferred[list[NodeProcess]]:
    """Start C{count} nodes (n1, n2, ...) on one Redis, in parallel."""
    nodes = [NodeProcess(testcase, redis_url, f"n{i + 1}", env) for i in range(count)]
    d = gatherResults([n.start() for n in nodes], consumeErrors=True)
    return d.addCallback(lambda _: nodes)


def redis_broker(sink: IDeliverySink, redis: Any, reader: Any, url: str,
                 shards: Sequence[tuple[Any, str]] = (), **settings: Any) -> Any:
    """
    A L{RedisBroker} on C{url}: C{redis} for commands, C{reader} for the
    feed, and a subscriber connection of its own (heard once it is started).
    With C{shards} (a commands handler and the URL of each), rooms are
    sharded over those too, like a node's C{UNREALON_REDIS_SHARDS}.
    """
    from twisted.internet import reactor

    from unrealon.engine.pubsub import SubscriberConnection
    from unrealon.engine.redisbroker import RedisBroker
    from unrealon.engine.rediskeys import room_channel_prefix
    from unrealon.engine.roomshards import ShardConnections
    from unrealon.redisurl import parse_redis_url

    address = parse_redis_url(url)
    settings.setdefault("channel_prefix", room_channel_prefix(address.db))
    settings.setdefault("subscriber", SubscriberConnection(reactor, address))
    more = []
    for handler, shard_url in shards:
        shard_address = parse_redis_url(shard_url)
        more.append(ShardConnections(handler, SubscriberConnection(reactor, shard_address),
                                     room_channel_prefix(shard_address.db)))
    return RedisBroker(reactor, sink, redis, reader, shards=more, **settings)


@implementer(IDeliverySink)
class FakeSink:
    """Records what an engine hands to its node."""

    def __init__(self) -> None:
        self.events: list[RoomEvent] = []
        self.ephemeral: list[EphemeralEvent] = []
        self.disconnects: list[tuple[str, str]] = []
        self.resyncs: list[Sequence[str] | None] = []

    def deliver(self, event: RoomEvent) -> None:
        self.events.append(event)

    def deliver_ephemeral(self, event: EphemeralEvent) -> None:
        self.ephemeral.append(event)

    def disconnect_user(self, user_id: str, reason: str) -> None:
        self.disconnects.append((user_id, reason))

    def resync(self, rooms: Sequence[str] | None) -> None:
        self.resyncs.append(rooms)

    def unheard(self, room: str) -> None:
        pass

    def heard(self, room: str, complete: bool) -> None:
        if not complete:
            self.resyncs.append([room])

    def notifications(self, room: str | None = None) -> list[Any]:
        return [json.loads(e.message) for e in self.events if room is None or e.room == room]

    def presence(self) -> list[tuple[str, str, str, str | None]]:
        """(method, room, user_id, excluded user) of each presence notification."""
        out = []
        for e in self.ephemeral:
            message = json.loads(e.message)
            params = message["params"]
            out.append((message["method"], params["room"], params["user_id"], e.exclude_user))
        return out


class Tap:
    """
    One client's view of its rooms: every C{test.event} in arrival order
    (the replayed ones of a join's C{missed} in their place, just before the
    live ones that follow the reply) and every presence notification.
    """

    def __init__(self, client: WSClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.presence: list[dict[str, Any]] = []
        self.joins: list[dict[str, Any]] = []
        #: the tokens of the barriers (L{barrier}) received, in order
        self.barriers: list[str] = []
        self._join_ids: set[int] = set()
        original = client._received

        def received(payload: bytes, is_binary: bool) -> None:
            message = json.loads(payload)
            if isinstance(message, dict):
                method = message.get("method")
                if method == EVENT:
                    self.events.append(message["params"])
                    return
                if method == BARRIER:
                    self.barriers.append(message["params"]["data"]["token"])
                    return
                if isinstance(method, str) and method.startswith("presence."):
                    self.presence.append({"method": method, **message["params"]})
                    return
                if message.get("id") in self._join_ids and "result" in message:
                    # record the replay before anything that follows the reply
                    self.joins.append(message["result"])
                    self.events.extend(m["params"] for m in message["result"]["missed"])
            original(payload, is_binary)

        client._received = received  # type: ignore[method-assign]

    @inlineCallbacks
    def join(self, room: str, since: str | None = None) -> Any:
        params: dict[str, Any] = {"room": room}
        if since is not None:
            params["since"] = since
        self._join_ids.add(self.client._next_id + 1)
        result = yield self.client.call("rooms.join", params)
        return result

    def seqs(self, room: str | None = None) -> list[int]:
        return [e["data"]["seq"] for e in self.events if room is None or e["room"] == room]

    def cursor(self, room: str) -> str | None:
        for event in reversed(self.events):
            if event["room"] == room:
                return str(event["cursor"])
        return None


def kill_client(redis: Any, name: str) -> Deferred[Any]:
    """CLIENT KILL the connection named C{name} (CLIENT SETNAME) on C{redis}'s server."""

    async def kill() -> Any:
        # (a subscriber with no channel yet is not of TYPE pubsub: search them all)
        listing = await redis.execute_command("CLIENT", "LIST")
        for line in str(listing).splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("name") == name:
                return await redis.execute_command("CLIENT", "KILL", "ID", fields["id"])
        raise AssertionError(f"no connection named {name}")

    return Deferred.fromCoroutine(kill())


def barrier(
    publish: Callable[..., Deferred[Any]], room: str, taps: Sequence[Tap], timeout: float = 15.0
) -> Deferred[None]:
    """
    Publish a marker to C{room} (with C{publish}, a broker's) and fire once
    every tap has received it.  A room's events reach every node in one
    order and each connection in that order, so whatever was published to
    the room before the marker has reached every tap by then: what a tap
    has not received was never sent.  This is how the tests prove "no duplicate",
    "nothing more", without waiting an arbitrary time.
    """
    token = uuid.uuid4().hex

    async def go() -> None:
        await publish(room, BARRIER, {"token": token})
        await wait_until(lambda: all(token in t.barriers for t in taps), timeout=timeout,
                         what=f"the barrier in {room}")

    return Deferred.fromCoroutine(go())
