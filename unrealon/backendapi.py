"""
The methods the backend calls through the ingress stream (PROTOCOL.md
section 6): the event catalogue, C{publish}, presence queries and
C{connections.disconnect}.

None of them is callable by a browser: they are registered for
L{Caller.BACKEND} only, so a client asking for one gets -32601 as for a name
that does not exist.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs

from unrealon import jsonrpc
from unrealon.engine.interfaces import BackendUnavailable, MessageChunk
from unrealon.events import CATALOGUE, CatalogueEvent, event_data
from unrealon.jsonrpc import FieldError, RPCError, invalid_params
from unrealon.names import EVENT_NAME, ROOM_NAME, ROOM_NAME_RE
from unrealon.node import Node
from unrealon.rpc import Caller, Registry, param

R = TypeVar("R")
P = TypeVar("P")


def store_errors(
    handler: Callable[[BackendCall, P], Awaitable[R]],
) -> Callable[[BackendCall, P], Awaitable[R]]:
    """
    Redis unreachable is -32011 (the ingress retries the entry), not an
    internal error logged with a traceback.
    """

    @functools.wraps(handler)
    async def wrapper(call: BackendCall, params: P) -> R:
        try:
            return await handler(call, params)
        except (BackendUnavailable, ConnectionError):
            raise RPCError(jsonrpc.BACKEND_UNAVAILABLE, data={"retryable": True}) from None

    return wrapper


@attrs.define
class BackendCall:
    """
    What a backend method handler is given.  C{entry_id} is the ingress
    entry being handled: the idempotency key of what it publishes, so an
    entry handled twice (a crash before its ack) publishes once.
    C{request_key} does the same for an HTTP API request with an
    C{Idempotency-Key} header (the hashed, scoped key of
    L{unrealon.idempotency}), so a retried request publishes once.
    """

    node: Node
    entry_id: str | None = None
    request_key: str | None = None
    caller = Caller.BACKEND

    def idempotency_key(self) -> str | None:
        if self.entry_id is not None:
            return f"ingress:{self.entry_id}"
        if self.request_key is not None:
            return f"api:{self.request_key}"
        return None


@attrs.frozen
class Published:
    room: str
    cursor: str


@attrs.frozen
class PublishParams:
    room: str = param(pattern=ROOM_NAME)
    event: str = param(pattern=EVENT_NAME)
    data: dict[str, Any] = param(factory=dict)


@attrs.frozen
class PresenceListParams:
    room: str = param(pattern=ROOM_NAME)


@attrs.frozen
class OnlineParams:
    user_ids: list[str] = param(max_length=10000)


@attrs.frozen
class OnlineResult:
    online: list[str]


@attrs.frozen
class DisconnectParams:
    user_id: str = param(identifier=True, min_length=1, max_length=128)
    reason: str = param(default="disconnected by the backend", max_length=120)


@attrs.frozen
class DisconnectResult:
    user_id: str


def _chunk(data: dict[str, Any]) -> MessageChunk:
    """
    A chunk of a streamed message from C{session.message}'s data: repeated
    chunks are dropped by C{seq}, so no idempotency key is needed.
    """
    error = data.get("error")
    return MessageChunk(
        message_id=str(data["message_id"]), seq=int(data["seq"]),
        content=str(data.get("content", "")), done=bool(data.get("done")),
        error=None if error is None else str(error), fields=data,
    )


def _catalogue_handler(event: CatalogueEvent) -> Any:
    async def handle(call: BackendCall, params_and_extras: tuple[Any, dict[str, Any]]) -> Published:
        params, extras = params_and_extras
        missing = event.missing(params)
        if missing:
            rules = event.required_when
            raise invalid_params([
                FieldError(name, "is required when " + ", ".join(
                    f"{k} is {v}" for k, v in rules[name].items()))
                for name in missing
            ])
        room = event.room(params)
        if not ROOM_NAME_RE.match(room):
            raise invalid_params([FieldError("room", "the id makes an invalid room name")])
        data = event_data(params, extras)
        if event.streamed and data.get("seq") is not None:
            cursor = await call.node.broker.append_chunk(room, event.name, _chunk(data))
        else:
            cursor = await call.node.broker.publish(
                room, event.name, data, call.idempotency_key()
            )
        return Published(room=room, cursor=cursor)

    handle.__doc__ = event.summary
    return store_errors(handle)


@store_errors
async def publish(call: BackendCall, params_and_extras: tuple[PublishParams, dict[str, Any]]) -> Published:
    """Publish any event to any room."""
    params, _ = params_and_extras  # other params are ignored (PROTOCOL.md)
    cursor = await call.node.broker.publish(
        params.room, params.event, params.data, call.idempotency_key()
    )
    return Published(room=params.room, cursor=cursor)


@store_errors
async def presence_list(call: BackendCall, params: PresenceListParams) -> dict[str, Any]:
    """Who is in a room, across the cluster."""
    users = await call.node.presence.list(params.room)
    return {
        "room": params.room,
        "users": [
            {"user_id": u.user_id, "info": dict(u.info), "connections": u.connections}
            for u in users
        ],
    }


@store_errors
async def presence_online(call: BackendCall, params: OnlineParams) -> OnlineResult:
    """Which of these users have a connection anywhere in the cluster."""
    online = await call.node.presence.online(params.user_ids)
    return OnlineResult(online=list(online))


@store_errors
async def connections_disconnect(call: BackendCall, params: DisconnectParams) -> DisconnectResult:
    """Close every connection of a user on every node with 4003."""
    await call.node.broker.disconnect_user(params.user_id, params.reason)
    return DisconnectResult(user_id=params.user_id)


def register_backend_methods(registry: Registry) -> None:
    """Add the methods of PROTOCOL.md section 6."""
    for event in CATALOGUE:
        registry.method(
            event.name,
            params=event.params,
            result=Published,
            callers=Caller.BACKEND,
            summary=event.summary,
            extra_params=True,
        )(_catalogue_handler(event))
    registry.method("publish", params=PublishParams, result=Published,
                    callers=Caller.BACKEND, extra_params=True)(publish)
    registry.method("presence.list", params=PresenceListParams,
                    callers=Caller.BACKEND)(presence_list)
    registry.method("presence.online", params=OnlineParams, result=OnlineResult,
                    callers=Caller.BACKEND)(presence_online)
    registry.method("connections.disconnect", params=DisconnectParams,
                    result=DisconnectResult, callers=Caller.BACKEND)(connections_disconnect)
