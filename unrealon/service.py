"""
The Twisted service tree of one node, with ordered start and shutdown.

L{makeService} builds every part from a L{Config} (nothing else reads the
environment or the global reactor).  L{NodeService} starts the engine, then
the health site, then the WebSocket listener; it stops in the order
PROTOCOL.md section 7 asks for -- report "stopping", stop accepting, close
every connection with 1001, stop the ingress consumer, release Redis, close
the health site -- all within C{UNREALON_SHUTDOWN_TIMEOUT}.  A plain
C{MultiService} would stop its children all at once, in no useful order,
so the steps are chained here by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from unrealon.auth import TokenVerifier
from unrealon.backendapi import BackendCall, register_backend_methods
from unrealon.clientapi import register_client_methods
from unrealon.config import Config
from unrealon.engine.memory import MemoryBroker, MemoryPresence
from unrealon.http import make_site
from unrealon.hub import Hub
from unrealon.idempotency import MemoryReplyStore, RedisReplyStore
from unrealon.metrics import Metrics
from unrealon.node import Node
from unrealon.rpc import Caller, Registry
from unrealon.ws import RPCServerFactory

log = Logger(namespace="unrealon.service")

#: a callable adding an application's own methods to the registry
Extension = Callable[[Registry], None]


def build_registry(extensions: tuple[Extension, ...] = ()) -> Registry:
    """The built-in client and backend methods, plus the application's."""
    registry = Registry()
    register_client_methods(registry)
    register_backend_methods(registry)
    for extend in extensions:
        extend(registry)
    return registry


class NodeService(Service):
    """One node: engine, health site and WebSocket listener."""

    name = "unrealon-ws"

    def __init__(self, node: Node, factory: RPCServerFactory, stoppables: list[Any]) -> None:
        self.node = node
        self.factory = factory
        #: services started before the listeners and stopped after the
        #: connections are closed, in this order (ingress first, engine last)
        self._stoppables = stoppables
        self.ws_port: IListeningPort | None = None
        self.http_port: IListeningPort | None = None
        self.ready: Deferred[None] = Deferred()
        self._starting: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addCallbacks(self.ready.callback, self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        if self.node.stopping and failure.check(CancelledError):
            # stopped while still starting (e.g. Redis unreachable): not a
            # start failure, and the reactor is already stopping
            log.info("node stopped before it had started")
            self.ready.errback(failure)
            return
        log.failure("node failed to start", failure)
        self.ready.errback(failure)
        reactor = self.node.reactor
        if getattr(reactor, "running", False):
            reactor.stop()

    async def _start(self) -> None:
        node = self.node
        reactor = node.reactor
        node.started_at = reactor.seconds()
        for part in reversed(self._stoppables):
            await part.start()
        self.http_port = await serverFromString(reactor, node.config.http_endpoint).listen(
            make_site(node)
        )
        self.ws_port = await serverFromString(reactor, node.config.ws_endpoint).listen(
            self.factory
        )
        log.info(
            "node {node_id} serving WebSocket on {ws} and health on {http} ({engine} engine)",
            node_id=node.node_id,
            ws=_address(self.ws_port),
            http=_address(self.http_port),
            engine="redis" if node.config.redis_url else "memory",
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        node = self.node
        reactor = node.reactor
        node.status = "stopping"
        deadline = reactor.seconds() + node.config.shutdown_timeout
        log.info("node {node_id} stopping", node_id=node.node_id)
        if self._starting is not None and not self._starting.called:
            # Still starting (waiting for Redis, say): give up on it, or the
            # stop would wait for a start that may never come.
            self._starting.cancel()
        try:
            await self.ready
        except Exception:
            pass  # it did not start; stop what did
        if self.ws_port is not None:
            await maybeDeferred(self.ws_port.stopListening)
        await self._close_connections(deadline)
        for part in self._stoppables:
            await _bounded(part.stop(), deadline, reactor, "stopping " + type(part).__name__)
        if self.http_port is not None:
            await maybeDeferred(self.http_port.stopListening)
        log.info("node {node_id} stopped", node_id=node.node_id)

    async def _close_connections(self, deadline: float) -> None:
        reactor = self.node.reactor
        sessions = list(self.factory.connections)
        if not sessions:
            return
        waits = [s.closed for s in sessions]
        for session in sessions:
            session.close_going_away()
        # leave time for the rest of the shutdown after the drain
        budget = max(0.1, (deadline - reactor.seconds()) * 0.8)
        done: Deferred[Any] = DeferredList(waits)
        done.addTimeout(budget, reactor)
        try:
            await done
        except Exception:
            left = [s for s in sessions if s.transport is not None and s in self.factory.connections]
            log.warn("aborting {count} connections that did not close in time", count=len(left))
            for session in left:
                transport: Any = session.transport
                transport.abortConnection()


async def _bounded(d: Deferred[Any], deadline: float, reactor: Any, what: str) -> None:
    d.addTimeout(max(0.1, deadline - reactor.seconds()), reactor)
    try:
        await d
    except Exception:
        log.failure("{what} failed or timed out", what=what)


def _address(port: IListeningPort | None) -> str:
    if port is None:
        return "-"
    host: Any = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


def dispatch_backend(
    node: Node, method: str, params: dict[str, Any], entry_id: str
) -> Deferred[Any]:
    """Run a backend method for an ingress entry (-32601 if there is none)."""
    spec = node.registry.lookup(method, Caller.BACKEND)
    return node.registry.dispatch(spec, BackendCall(node, entry_id), params)


def makeService(
    config: Config,
    reactor: Any,
    extensions: tuple[Extension, ...] = (),
) -> NodeService:
    """Build a node from its configuration."""
    registry = build_registry(extensions)
    metrics = Metrics()
    factory_holder: list[RPCServerFactory] = []

    def prepare(payload: bytes) -> Any:
        return factory_holder[0].prepareMessage(payload)

    hub = Hub(prepare)
    stoppables: list[Any] = []
    node_holder: list[Node] = []
    if config.redis_url:
        from unrealon.engine.redis import RedisConnections
        from unrealon.engine.redisbroker import RedisBroker
        from unrealon.engine.redispresence import RedisPresence
        from unrealon.ingress import IngressConsumer

        connections = RedisConnections.open(config.redis_url)
        broker: Any = RedisBroker(
            reactor, hub, connections.commands, connections.feed_reader,
            history_size=config.history_size, history_ttl=config.history_ttl,
        )
        presence: Any = RedisPresence(reactor, connections.commands, ttl=config.presence_ttl)
        ingress: Any = IngressConsumer(
            reactor, connections.commands, connections.ingress_reader,
            lambda method, params, entry_id: dispatch_backend(
                node_holder[0], method, params, entry_id
            ),
            stream=config.ingress_stream, group=config.ingress_group,
            consumer=config.node_id, dead_stream=config.dead_letter_stream,
            claim_idle=config.claim_idle, max_deliveries=config.max_deliveries,
            max_in_flight=config.ingress_max_in_flight,
            metrics=metrics,
        )
        api_replies: Any = RedisReplyStore(connections.commands)
        # stopped in this order (started in reverse)
        stoppables.extend([ingress, presence, broker, connections])
        features: tuple[str, ...] = ("rooms", "history", "presence", "ingress", "cluster")
    else:
        broker = MemoryBroker(
            reactor, hub, history_size=config.history_size, history_ttl=config.history_ttl
        )
        presence = MemoryPresence(broker.publish_ephemeral)
        ingress = None
        api_replies = MemoryReplyStore(reactor)
        stoppables.extend([presence, broker])
        features = ("rooms", "history", "presence")
    hub.cursor_key = broker.cursor_key
    verifier = TokenVerifier(config.jwt_settings(), reactor) if config.jwt_keys else None
    node = Node(
        config=config,
        reactor=reactor,
        registry=registry,
        hub=hub,
        broker=broker,
        presence=presence,
        verifier=verifier,
        metrics=metrics,
        ingress=ingress,
        features=features,
        api_replies=api_replies,
    )
    metrics.watch(
        lambda: hub.connection_count, lambda: hub.user_count, lambda: hub.room_count
    )
    node_holder.append(node)
    factory = RPCServerFactory(node)
    factory_holder.append(factory)
    return NodeService(node, factory, stoppables)

