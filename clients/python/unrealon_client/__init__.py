"""
unrealon-ws client for asyncio: ``UnrealonClient`` (generated, typed) on the
hand-written runtime.  See clients/python/README.md.
"""

from .api import *  # noqa: F403  (the generated types and UnrealonClient)
from .api import API_VERSION, EVENT_KINDS, UnrealonClient
from .runtime import (
    Backoff,
    CallTimeoutError,
    ChunkOrder,
    ClientCore,
    ConnectError,
    ConnectionClosedError,
    ConnectionState,
    DirectEventMeta,
    EventMeta,
    RecoveryInfo,
    RoomEventMeta,
    RpcError,
    StateChange,
    TokenProvider,
    decode_jwt_payload,
)

__all__ = [
    "API_VERSION",
    "EVENT_KINDS",
    "Backoff",
    "CallTimeoutError",
    "ChunkOrder",
    "ClientCore",
    "ConnectError",
    "ConnectionClosedError",
    "ConnectionState",
    "DirectEventMeta",
    "EventMeta",
    "RecoveryInfo",
    "RoomEventMeta",
    "RpcError",
    "StateChange",
    "TokenProvider",
    "UnrealonClient",
    "decode_jwt_payload",
]
