"""
unrealon-ws client for asyncio: ``UnrealonClient`` (generated, typed) on the
hand-written runtime.  See clients/python/README.md.
"""

from .api import *  # noqa: F403  (the generated types and UnrealonClient)
from .api import API_VERSION, EVENT_KINDS, UnrealonClient
from .messages import GapRange, MessageFeed, MessageHandler, MessageSnapshot, MessageStreamError
from .runtime import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    NO_WORKER,
    WORKER_LOST,
    Backoff,
    CallTimeoutError,
    ClientCore,
    ConnectError,
    ConnectionClosedError,
    ConnectionState,
    DirectEventMeta,
    EventMeta,
    ProgressHandler,
    RecoveryInfo,
    RoomEventMeta,
    RpcError,
    StateChange,
    TokenProvider,
    decode_jwt_payload,
)
from .streams import BackendStream

__all__ = [
    "API_VERSION",
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "EVENT_KINDS",
    "NO_WORKER",
    "WORKER_LOST",
    "BackendStream",
    "Backoff",
    "CallTimeoutError",
    "ClientCore",
    "ConnectError",
    "ConnectionClosedError",
    "ConnectionState",
    "DirectEventMeta",
    "EventMeta",
    "GapRange",
    "MessageFeed",
    "MessageHandler",
    "MessageSnapshot",
    "MessageStreamError",
    "ProgressHandler",
    "RecoveryInfo",
    "RoomEventMeta",
    "RpcError",
    "StateChange",
    "TokenProvider",
    "UnrealonClient",
    "decode_jwt_payload",
]
