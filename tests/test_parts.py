"""
The session's parts on their own, without a socket: the JSON-RPC
dispatcher fed bytes for a fake connection, the authentication state
machine on a clock, and room membership's join buffer.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.helpers.node import mint_token
from tests.helpers.session import build_node
from unrealon.auth import Identity
from unrealon.authstate import (
    Authentication,
    AuthState,
    IAuthOwner,
    UnauthenticatedConnections,
    WrongState,
)
from unrealon.dispatch import Dispatcher, IClientSession
from unrealon.engine.interfaces import Recovery, RoomEvent
from unrealon.hub import Hub
from unrealon.limits import RateGuard
from unrealon.membership import IMPLICIT, PATTERN, IRoomConnection, RoomMembership


def identity(user: str = "alice", expires_at: float = 1000.0) -> Identity:
    return Identity(user_id=user, expires_at=expires_at, room_patterns=("workspace:*",), info={})


@implementer(IClientSession)
class FakeSession:
    """A connection as the dispatcher sees it: replies and closes are recorded."""

    def __init__(self, who: Identity | None = None) -> None:
        self.conn_id = "c1"
        self.identity = who
        self.membership = None
        self.sent: list[Any] = []
        self.closes: list[int] = []

    def send_payload(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))

    def close_with(self, code: int, reason: str) -> None:
        self.closes.append(code)

    def authenticate(self, who: Identity) -> None:
        self.identity = who

    def refresh(self, who: Identity) -> list[str]:
        self.identity = who
        return []


class DispatcherTests(SynchronousTestCase):
    """L{Dispatcher.message}: bytes in, replies out, no transport."""

    def setUp(self) -> None:
        self.node = build_node(self).node
        self.dispatcher = Dispatcher(self.node)
        self.clock = self.node.reactor

    def send(self, session: FakeSession, message: Any, guard: RateGuard | None = None) -> None:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.dispatcher.message(raw, session, guard or RateGuard(1000, self.clock))

    def test_fake_session_provides_the_interface(self) -> None:
        verifyObject(IClientSession, FakeSession())

    def test_gate_before_authentication(self) -> None:
        session = FakeSession()
        self.send(session, {"jsonrpc": "2.0", "id": 1, "method": "rooms.list"})
        self.send(session, {"jsonrpc": "2.0", "id": 2, "method": "system.ping"})
        self.assertEqual(session.sent[0]["error"]["code"], -32001)
        self.assertIs(session.sent[1]["result"]["pong"], True)

    def test_authenticate_through_the_dispatcher(self) -> None:
        session = FakeSession()
        token = mint_token("bob")
        self.send(session, {"jsonrpc": "2.0", "id": 1, "method": "auth.authenticate",
                            "params": {"token": token}})
        self.assertEqual(session.sent[0]["result"]["user_id"], "bob")
        self.assertEqual(session.identity.user_id, "bob")

    def test_batch_with_refusals_in_place(self) -> None:
        """A batch spends one token per entry; refused entries get -32029 where they stand."""
        session = FakeSession(identity())
        guard = RateGuard(1, self.clock)  # a burst of 2
        self.send(session, [{"jsonrpc": "2.0", "id": i, "method": "system.ping"}
                            for i in range(4)], guard)
        [replies] = session.sent
        self.assertEqual([r["id"] for r in replies], [0, 1, 2, 3])
        self.assertEqual(["result" in r for r in replies], [True, True, False, False])
        self.assertEqual(replies[2]["error"]["code"], -32029)

    def test_garbage_refused_without_parsing(self) -> None:
        session = FakeSession(identity())
        guard = RateGuard(1, self.clock)
        for _ in range(3):
            self.send(session, b"not json at all", guard)
        self.assertEqual([r["error"]["code"] for r in session.sent], [-32700, -32700, -32029])
        self.assertIsNone(session.sent[2]["id"])

    def test_abuse_closes_after_the_reply(self) -> None:
        session = FakeSession(identity())
        guard = RateGuard(1, self.clock)
        for i in range(11):
            self.send(session, {"jsonrpc": "2.0", "id": i, "method": "system.ping"}, guard)
        self.assertEqual(session.closes, [4029])
        self.assertEqual(session.sent[-1]["error"]["code"], -32029)


@implementer(IAuthOwner)
class Owner:
    def __init__(self) -> None:
        self.became_ids: list[str] = []
        self.closes: list[int] = []

    def became(self, who: Identity) -> None:
        self.became_ids.append(who.user_id)

    def close_with(self, code: int, reason: str) -> None:
        self.closes.append(code)


class AuthenticationTests(SynchronousTestCase):
    """The authentication state machine and its timers, on a clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.owner = Owner()
        self.count = UnauthenticatedConnections()
        self.auth = Authentication(self.owner, self.clock, self.count, auth_timeout=10, leeway=5)

    def test_without_a_token_it_waits_then_closes_4001(self) -> None:
        self.auth.open(None)
        self.assertIs(self.auth.state, AuthState.AWAITING)
        self.assertEqual(self.count.count, 1)
        self.clock.advance(9.9)
        self.assertEqual(self.owner.closes, [])
        self.clock.advance(0.2)
        self.assertEqual(self.owner.closes, [4001])
        self.auth.close()
        self.assertEqual(self.count.count, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_authenticate_in_time(self) -> None:
        self.auth.open(None)
        self.auth.authenticate(identity(expires_at=50))
        self.assertIs(self.auth.state, AuthState.AUTHENTICATED)
        self.assertEqual((self.count.count, self.owner.became_ids), (0, ["alice"]))
        self.clock.advance(20)
        self.assertEqual(self.owner.closes, [])  # the auth timer is gone
        self.clock.advance(35.1)  # exp 50 + leeway 5
        self.assertEqual(self.owner.closes, [4009])

    def test_refresh_moves_the_expiry(self) -> None:
        self.auth.open(identity(expires_at=10))
        self.auth.refresh(identity(expires_at=100))
        self.clock.advance(50)
        self.assertEqual(self.owner.closes, [])
        self.clock.advance(56)
        self.assertEqual(self.owner.closes, [4009])

    def test_wrong_inputs_are_bugs(self) -> None:
        self.assertRaises(WrongState, self.auth.refresh, identity())
        self.auth.open(identity())
        self.assertRaises(WrongState, self.auth.authenticate, identity())
        self.assertRaises(WrongState, self.auth.open, None)
        self.auth.close()
        self.auth.close()
        self.assertIs(self.auth.state, AuthState.CLOSED)


@implementer(IRoomConnection)
class Member:
    conn_id = "c9"

    def __init__(self) -> None:
        self.identity = identity()
        self.user_id = "alice"
        self.delivered: list[str] = []

    def deliver(self, event: RoomEvent, prepared: Any) -> None:
        self.delivered.append(event.cursor)


class FakeBroker:
    """A broker whose recoveries the test answers, with cursors "e:<n>"."""

    def __init__(self) -> None:
        self.recoveries: list[Deferred[Recovery]] = []

    def recover(self, room: str, since: str | None) -> Deferred[Recovery]:
        d: Deferred[Recovery] = Deferred()
        self.recoveries.append(d)
        return d

    def cursor_key(self, cursor: str) -> tuple[str, int]:
        epoch, _, n = cursor.partition(":")
        return epoch, int(n)


class FakePresence:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def join(self, room: str, user: str, conn: str, info: Any) -> Deferred[None]:
        self.calls.append(("join", room))
        return succeed(None)

    def leave(self, room: str, user: str, conn: str) -> Deferred[None]:
        self.calls.append(("leave", room))
        return succeed(None)


def event(cursor: str, room: str = "workspace:1") -> RoomEvent:
    return RoomEvent(room=room, cursor=cursor, message=b"{}")


class MembershipTests(SynchronousTestCase):
    """The join buffer: nothing before the reply, nothing twice, nothing lost."""

    def setUp(self) -> None:
        self.member = Member()
        self.broker = FakeBroker()
        self.hub = Hub(lambda payload: payload, self.broker.cursor_key)
        self.presence = FakePresence()
        self.membership = RoomMembership(self.member, self.hub, self.broker,  # type: ignore[arg-type]
                                         self.presence, Clock())  # type: ignore[arg-type]

    def route(self, cursor: str) -> None:
        self.membership.route(event(cursor), b"", self.broker.cursor_key(cursor))

    def test_events_held_until_the_reply_then_deduplicated(self) -> None:
        after: list[Any] = []
        d = Deferred.fromCoroutine(
            self.membership.join("workspace:1", PATTERN, "e:1", after.append))
        self.route("e:2")
        self.route("e:3")
        self.assertEqual(self.member.delivered, [])
        self.broker.recoveries[0].callback(Recovery(cursor="e:2", recovered=True))
        self.successResultOf(d)
        self.assertEqual(self.member.delivered, [])  # the reply is not written yet
        after[0]()
        self.assertEqual(self.member.delivered, ["e:3"])  # e:2 was in the reply
        self.route("e:4")
        self.assertEqual(self.member.delivered, ["e:3", "e:4"])

    def test_a_lagging_feed_repeats_nothing_the_reply_held(self) -> None:
        """The reply read history up to e:3; the node's feed delivers e:2, e:3 after it."""
        after: list[Any] = []
        d = Deferred.fromCoroutine(
            self.membership.join("workspace:1", PATTERN, "e:1", after.append))
        self.broker.recoveries[0].callback(Recovery(cursor="e:3", recovered=True))
        self.successResultOf(d)
        after[0]()
        for cursor in ("e:2", "e:3", "e:4"):
            self.route(cursor)
        self.assertEqual(self.member.delivered, ["e:4"])
        self.assertEqual(self.presence.calls, [("join", "workspace:1")])
        self.assertEqual(self.membership.rooms["workspace:1"], PATTERN)

    def test_failed_join_leaves_no_trace(self) -> None:
        d = Deferred.fromCoroutine(
            self.membership.join("workspace:1", PATTERN, None, lambda action: None))
        self.route("e:5")
        self.broker.recoveries[0].errback(ConnectionError("gone"))
        self.failureResultOf(d)
        self.assertNotIn("workspace:1", self.membership.rooms)
        self.assertEqual(self.hub.room_members("workspace:1"), [])
        self.assertEqual(self.member.delivered, [])

    def test_implicit_rooms_stay_implicit(self) -> None:
        self.membership.enter_implicit("alice")
        self.assertEqual(self.membership.rooms, {"user:alice": IMPLICIT, "broadcast": IMPLICIT})
        revoked = self.membership.revoke(identity(), leeway=0)
        self.assertEqual(revoked, [])
