"""
The node: the one object that ties a running server's parts together.

Built by L{unrealon.service} and handed to the WebSocket factory, the method
handlers and the HTTP resources, so none of them reaches for globals.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from unrealon import __version__
from unrealon.auth import TokenVerifier
from unrealon.backendcalls import BackendCalls
from unrealon.config import Config
from unrealon.engine.interfaces import IBroker, IPresence
from unrealon.hub import Hub
from unrealon.idempotency import IReplyStore
from unrealon.metrics import Metrics
from unrealon.rpc import Registry

PROTOCOL_VERSION = 1


@attrs.define
class Node:
    """A running node's parts and state."""

    config: Config
    reactor: Any  # IReactorTime & IReactorCore; typed loosely for test fakes
    registry: Registry
    hub: Hub
    broker: IBroker
    presence: IPresence
    verifier: TokenVerifier | None
    metrics: Metrics
    started_at: float = 0.0
    #: "ok" while serving, "stopping" once shutdown began
    status: str = "ok"
    features: tuple[str, ...] = ()
    #: the HTTP API's Idempotency-Key records (L{unrealon.idempotency}); None:
    #: kept in this process
    api_replies: IReplyStore | None = None
    #: browser calls to backend methods (PROTOCOL.md section 9); None: the memory engine
    backend: BackendCalls | None = None
    version: str = __version__

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def stopping(self) -> bool:
        return self.status == "stopping"

    def uptime(self) -> float:
        clock: IReactorTime = self.reactor
        return max(0.0, clock.seconds() - self.started_at)
