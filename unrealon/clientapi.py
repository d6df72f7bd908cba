"""
The methods browser clients may call (PROTOCOL.md section 4).

Each handler takes a L{unrealon.dispatch.ClientCall} and validated params,
and returns a typed result; the dispatcher does the JSON-RPC around it.
Calls that need the engine's store are bounded (L{unrealon.deadlines}) so a
client hears -32011 instead of waiting on a Redis that is gone.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from unrealon import closecodes, jsonrpc
from unrealon.auth import AuthError, may_join
from unrealon.backenddecl import openrpc_method
from unrealon.deadlines import within_deadline
from unrealon.dispatch import ClientCall
from unrealon.jsonrpc import RPCError
from unrealon.membership import (
    IMPLICIT,
    PATTERN,
    Admission,
    implicit_rooms,
    presence_tracked,
    room_token,
)
from unrealon.names import ROOM_NAME
from unrealon.node import PROTOCOL_VERSION
from unrealon.rpc import Caller, JSONValues, Registry, openrpc_document, param

log = Logger(namespace="unrealon.clientapi")

#: rooms no client may join (PROTOCOL.md section 4)
RESERVED_ROOM_PREFIX = "__"

# -- params and results -------------------------------------------------------


@attrs.frozen
class CancelParams:
    id: Any = param(description="the id of a backend call of this connection (a string or a number)")


@attrs.frozen
class CancelResult:
    id: Any
    cancelled: bool = param(description="false when no such call was in flight")


@attrs.frozen
class TokenParams:
    token: str = param(description="a JWT signed by a configured key", min_length=1)


@attrs.frozen
class AuthResult:
    user_id: str
    expires_at: float = param(description="the token's exp, epoch seconds")


@attrs.frozen
class RefreshResult:
    expires_at: float


@attrs.frozen
class PingResult:
    pong: bool
    server_time: int = param(description="epoch milliseconds")


@attrs.frozen
class InfoResult:
    version: str
    protocol: int
    node_id: str
    features: list[str]


@attrs.frozen
class JoinParams:
    room: str = param(pattern=ROOM_NAME)
    since: str | None = param(
        default=None, description="the last cursor seen; replays what came after it"
    )
    token: str | None = param(default=None, description="a room token for this room")


@attrs.frozen
class JoinResult:
    room: str
    cursor: str
    recovered: bool
    missed: list[dict[str, Any]] = param(
        description="the missed events, as the notifications live delivery sends"
    )
    streaming: list[dict[str, Any]] = param(
        description="the room's streamed messages still streaming, each as one event "
        "with all of it so far (unless recovered: missed covers them)"
    )


@attrs.frozen
class RoomParams:
    room: str = param(pattern=ROOM_NAME)


@attrs.frozen
class RoomResult:
    room: str


@attrs.frozen
class RoomsResult:
    rooms: list[str]


@attrs.frozen
class PresenceEntry:
    user_id: str
    info: dict[str, Any]
    connections: int


@attrs.frozen
class PresenceListResult:
    room: str
    users: list[PresenceEntry]


@attrs.frozen
class PresenceCountResult:
    room: str
    users: int
    connections: int


# -- handlers -----------------------------------------------------------------


def _verify(call: ClientCall, token: str) -> Any:
    verifier = call.node.verifier
    if verifier is None:
        raise RPCError(jsonrpc.UNAUTHENTICATED, "Unauthenticated: no key is configured")
    try:
        return verifier.verify_connection_token(token)
    except AuthError as e:
        raise RPCError(jsonrpc.UNAUTHENTICATED, f"Unauthenticated: {e.reason}") from None


async def auth_authenticate(call: ClientCall, params: TokenParams) -> AuthResult:
    """Authenticate this connection with a token (or refresh it if already authenticated)."""
    session = call.session
    if session.identity is not None:
        refreshed = auth_refresh(call, params)
        return AuthResult(user_id=session.identity.user_id, expires_at=refreshed.expires_at)
    identity = _verify(call, params.token)
    node = call.node
    if node.hub.user_connections(identity.user_id) >= node.config.max_connections_per_user:
        call.after_reply(
            lambda: session.close_with(
                closecodes.TOO_MANY_CONNECTIONS, "too many connections for this user"
            )
        )
        raise RPCError(jsonrpc.FORBIDDEN, "Forbidden: too many connections for this user")
    session.authenticate(identity)
    # the connection is in its implicit rooms "from the start" (section 4):
    # the reply waits until their events reach this node
    waiting = node.hub.ready(implicit_rooms(identity.user_id))
    try:
        if waiting is not None:
            await within_deadline(waiting, node.reactor)
    except RPCError:
        # Redis is away: nothing is published meanwhile, and the rooms are
        # listened to again as soon as it is back; the token was good
        log.info("replying to auth.authenticate before {user}'s rooms are listened to "
                 "(Redis unreachable)", user=identity.user_id)
    return AuthResult(user_id=identity.user_id, expires_at=identity.expires_at)


def auth_refresh(call: ClientCall, params: TokenParams) -> RefreshResult:
    """Swap in a newer token for the same user, moving the expiry."""
    session = call.session
    identity = _verify(call, params.token)
    assert session.identity is not None
    if identity.user_id != session.identity.user_id:
        raise RPCError(jsonrpc.FORBIDDEN, "Forbidden: the token is for another user")
    session.refresh(identity)
    return RefreshResult(expires_at=identity.expires_at)


def system_ping(call: ClientCall, params: object) -> PingResult:
    """Liveness check; also answers before authentication."""
    return PingResult(pong=True, server_time=int(call.node.reactor.seconds() * 1000))


def system_info(call: ClientCall, params: object) -> InfoResult:
    """Server version, protocol version, node id and features."""
    node = call.node
    return InfoResult(
        version=node.version,
        protocol=PROTOCOL_VERSION,
        node_id=node.node_id,
        features=list(node.features),
    )


def rpc_discover(call: ClientCall, params: object) -> dict[str, Any]:
    """The OpenRPC document of the client-callable API, with the backend methods this user may call."""
    node = call.node
    doc = client_openrpc(node.registry, node.version)
    identity = call.session.identity
    if node.backend is not None and identity is not None:
        config = node.config
        doc["methods"] = sorted(
            [*doc["methods"], *(
                openrpc_method(decl, config.backend_timeout, config.backend_max_timeout)
                for decl in node.backend.callable_by(identity)
            )],
            key=lambda method: str(method["name"]),
        )
    return doc


def rpc_cancel(call: ClientCall, params: CancelParams) -> CancelResult:
    """Cancel a backend call in flight (PROTOCOL.md section 9.3)."""
    request_id = params.id
    if request_id is None or isinstance(request_id, bool) or not isinstance(
            request_id, (str, int, float)):
        raise jsonrpc.invalid_params([jsonrpc.FieldError("id", "must be a string or a number")])
    backend = call.node.backend
    cancelled = backend is not None and backend.cancel(call.session, request_id)
    return CancelResult(id=request_id, cancelled=cancelled)


def client_openrpc(registry: Registry, version: str) -> dict[str, Any]:
    from unrealon.events import client_events

    return openrpc_document(
        registry, Caller.CLIENT, title="unrealon-ws", version=version, events=client_events()
    )


def _admission(call: ClientCall, room: str, token: str | None) -> Admission:
    """
    How this connection may join C{room}, else -32003.

    A pattern of the connection token or a valid room token admits: either one is
    enough (PROTOCOL.md section 4), so a bad room token shown next to a granting
    pattern is no refusal.  A connection already in the room may join it again
    (recovery), and keeps a room token's admission when it does so without one: that
    admission survives a refresh that drops the pattern (section 2).
    """
    session = call.session
    identity = session.identity
    assert identity is not None
    if room in implicit_rooms(identity.user_id):
        return IMPLICIT
    if room.startswith(RESERVED_ROOM_PREFIX):
        # the engine's own presence rooms (who is online anywhere) live there
        raise RPCError(jsonrpc.FORBIDDEN, "Forbidden: names starting with __ are reserved")
    refused = "this token does not grant the room"
    if token is not None:
        try:
            if call.node.verifier is None:
                raise AuthError("no key is configured")
            grant = call.node.verifier.verify_room_token(token, identity.user_id, room)
        except AuthError as e:
            refused = e.reason
        else:
            return room_token(grant.expires_at)
    current: Admission | None = session.membership.rooms.get(room)
    if current is not None and current.kind == "token":
        return current
    if may_join(identity.room_patterns, room):
        return PATTERN
    if current is not None:
        return current
    raise RPCError(jsonrpc.FORBIDDEN, f"Forbidden: {refused}")


async def rooms_join(call: ClientCall, params: JoinParams) -> JoinResult:
    """Join a room; with `since`, receive every event after that cursor first."""
    admission = _admission(call, params.room, params.token)
    recovery = await call.session.membership.join(
        params.room, admission, params.since, call.after_reply
    )
    return JoinResult(
        room=params.room,
        cursor=recovery.cursor,
        recovered=recovery.recovered if params.since is not None else False,
        # JSON values already (decoded, or the stored text as jsoncodec.RawJSON)
        missed=JSONValues(recovery.missed) if params.since is not None else [],
        streaming=JSONValues(recovery.streaming),
    )


def rooms_leave(call: ClientCall, params: RoomParams) -> RoomResult:
    """Leave a room (not the implicit user:<id> and broadcast rooms)."""
    membership = call.session.membership
    admission = membership.rooms.get(params.room)
    if admission is None:
        raise RPCError(jsonrpc.NOT_FOUND, "Not found: not in this room")
    if admission is IMPLICIT:
        raise RPCError(jsonrpc.FORBIDDEN, "Forbidden: implicit rooms cannot be left")
    membership.leave(params.room)
    return RoomResult(room=params.room)


def rooms_list(call: ClientCall, params: object) -> RoomsResult:
    """The rooms this connection is in, the implicit ones included."""
    return RoomsResult(rooms=sorted(call.session.membership.rooms))


def _member_of(call: ClientCall, room: str) -> None:
    if room not in call.session.membership.rooms:
        raise RPCError(jsonrpc.NOT_FOUND, "Not found: not in this room")


async def presence_list(call: ClientCall, params: RoomParams) -> PresenceListResult:
    """Who is in a room this connection is in."""
    _member_of(call, params.room)
    if not presence_tracked(params.room):
        return PresenceListResult(room=params.room, users=[])
    users = await within_deadline(call.node.presence.list(params.room), call.node.reactor)
    return PresenceListResult(
        room=params.room,
        users=[PresenceEntry(u.user_id, dict(u.info), u.connections) for u in users],
    )


async def presence_count(call: ClientCall, params: RoomParams) -> PresenceCountResult:
    """How many users and connections are in a room this connection is in."""
    _member_of(call, params.room)
    if not presence_tracked(params.room):
        return PresenceCountResult(room=params.room, users=0, connections=0)
    count = await within_deadline(call.node.presence.count(params.room), call.node.reactor)
    return PresenceCountResult(room=params.room, users=count.users, connections=count.connections)


def register_client_methods(registry: Registry) -> None:
    """Add the methods of PROTOCOL.md section 4."""
    add = registry.method
    add("auth.authenticate", params=TokenParams, result=AuthResult, requires_auth=False)(
        auth_authenticate
    )
    add("auth.refresh", params=TokenParams, result=RefreshResult)(auth_refresh)
    add("system.ping", result=PingResult, requires_auth=False)(system_ping)
    add("system.info", result=InfoResult)(system_info)
    add("rpc.discover", summary="The OpenRPC document of the client-callable API")(rpc_discover)
    add("rpc.cancel", params=CancelParams, result=CancelResult,
        summary="Cancel a backend call of this connection that is in flight")(rpc_cancel)
    add("rooms.join", params=JoinParams, result=JoinResult)(rooms_join)
    add("rooms.leave", params=RoomParams, result=RoomResult)(rooms_leave)
    add("rooms.list", result=RoomsResult)(rooms_list)
    add("presence.list", params=RoomParams, result=PresenceListResult, callers=Caller.CLIENT)(
        presence_list
    )
    add("presence.count", params=RoomParams, result=PresenceCountResult)(presence_count)

