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

import secrets
from collections.abc import Callable
from typing import Any

import attrs
from autobahn.websocket.protocol import PreparedMessage
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from unrealon import jsoncodec
from unrealon._compat import reactorlog
from unrealon.auth import TokenVerifier
from unrealon.backendapi import BackendCall, register_backend_methods
from unrealon.backendcalls import BackendCalls
from unrealon.clientapi import register_client_methods
from unrealon.config import Config
from unrealon.engine.interfaces import IBackendLink, IBroker, IPresence
from unrealon.engine.memory import MemoryBroker, MemoryPresence
from unrealon.engine.memory import cursor_key as memory_cursor_key
from unrealon.engine.supervision import ISupervised
from unrealon.http import make_site
from unrealon.hub import Hub
from unrealon.idempotency import IReplyStore, MemoryReplyStore
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

    def __init__(
        self,
        node: Node,
        factory: RPCServerFactory,
        stoppables: list[Any],
        *,
        ingress: Any = None,
        loops: tuple[ISupervised, ...] = (),
    ) -> None:
        self.node = node
        self.factory = factory
        #: the backend ingress consumer (the Redis engine's), or None
        self.ingress = ingress
        #: the supervised long-running work (/health is degraded while one is not working)
        self.loops = loops
        #: services started before the listeners and stopped after the
        #: connections are closed, in this order (ingress first, engine last)
        self._stoppables = stoppables
        self.ws_port: IListeningPort | None = None
        self.http_port: IListeningPort | None = None
        self.ready: Deferred[None] = Deferred()
        self._starting: Deferred[None] | None = None
        #: the log observer twistd should use (UNREALON_LOG_FORMAT=json), if any
        self.log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> Any:
        """
        Under twistd the parent is the application, whose C{ILogObserver}
        component is the observer twistd logs with (set before twistd starts
        logging): how C{UNREALON_LOG_FORMAT=json} reaches twistd.
        """
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

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
        if failure.check(ListenError):
            # a known cause, said in one line: no traceback
            log.error("node cannot start: {why}", why=failure.getErrorMessage())
        else:
            log.failure("node failed to start", failure)
        self.ready.errback(failure)
        reactor = self.node.reactor
        if getattr(reactor, "running", False):
            reactor.stop()

    async def _start(self) -> None:
        """
        Begin every engine part, open both listeners, then wait until the
        engine is ready.  The listeners do not wait for the engine: a node
        serves (/live, /health 503, connections, -32011 for what needs Redis)
        while Redis is absent (PROTOCOL.md section 1).
        """
        node = self.node
        reactor = node.reactor
        node.started_at = reactor.seconds()
        engine: Deferred[Any] = gatherResults(
            [part.start() for part in reversed(self._stoppables)], consumeErrors=True
        )
        engine.addErrback(_first_error)
        try:
            self.http_port = await _listen(
                reactor, node.config.http_endpoint, make_site(node, self.ingress, self.loops),
                "UNREALON_HTTP", "--http",
            )
            self.ws_port = await _listen(
                reactor, node.config.ws_endpoint, self.factory, "UNREALON_WS", "--ws"
            )
        except BaseException:
            # the start fails for this; the engine's own outcome no longer matters
            engine.addErrback(lambda f: log.info("engine start abandoned: {error}",
                                                 error=f.getErrorMessage()))
            raise
        log.info(
            "node {node_id} serving WebSocket on {ws} and health on {http} ({engine} engine,"
            " JSON by {codec})",
            node_id=node.node_id,
            ws=_address(self.ws_port),
            http=_address(self.http_port),
            engine="redis" if node.config.redis_url else "memory",
            codec=jsoncodec.BACKEND,
        )
        if not engine.called:
            log.info("node {node_id} waiting for Redis", node_id=node.node_id)
        await engine

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        node = self.node
        reactor = node.reactor
        node.status = "stopping"
        deadline = reactor.seconds() + node.config.shutdown_timeout
        log.info("node {node_id} stopping", node_id=node.node_id)
        # Still starting (waiting for Redis, say)?  Not waited for: stopping
        # the engine's parts below ends that wait (the start then reports
        # that it was stopped, not that it failed).
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


class ListenError(Exception):
    """A listener could not be opened; the message names the setting and the address."""


async def _listen(reactor: Any, endpoint: str, factory: Any, env: str, cli: str) -> Any:
    try:
        return await serverFromString(reactor, endpoint).listen(factory)
    except CannotListenError as e:
        cause = e.socketError
        why = cause.strerror.lower() if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise ListenError(f"cannot listen on {endpoint} ({env} / {cli}): {why}") from None


def _first_error(failure: Failure) -> Failure:
    """A gatherResults' failure as the failure of the part that failed."""
    if isinstance(failure.value, FirstError):
        inner: Failure = failure.value.subFailure
        return inner
    return failure


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


class BackendDispatch:
    """Runs a backend method for an ingress entry (-32601 if there is none)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def __call__(self, method: str, params: dict[str, Any], entry_id: str) -> Deferred[Any]:
        registry = self._node.registry
        spec = registry.lookup(method, Caller.BACKEND)
        return registry.dispatch(spec, BackendCall(self._node, entry_id), params)


def prepare_message(payload: bytes) -> PreparedMessage:
    """A text message framed once, for every member of a room (a server's frames are unmasked)."""
    return PreparedMessage(payload, False, False, False)


@attrs.frozen
class _Engine:
    """The engine's parts, as makeService wires them."""

    broker: IBroker
    presence: IPresence
    #: stopped in this order (started in reverse)
    stoppables: tuple[Any, ...]
    loops: tuple[ISupervised, ...]
    features: tuple[str, ...]
    #: the HTTP API's Idempotency-Key records
    api_replies: IReplyStore
    ingress: Any = None
    #: how this node reaches backend workers (PROTOCOL.md section 9), or None
    backend: IBackendLink | None = None


def makeService(
    config: Config,
    reactor: Any,
    extensions: tuple[Extension, ...] = (),
) -> NodeService:
    """Build a node from its configuration."""
    # the reactor's events without the legacy log context: ~2 us per event
    reactorlog.install()
    registry = build_registry(extensions)
    metrics = Metrics()
    verifier = TokenVerifier(config.jwt_settings(), reactor) if config.jwt_keys else None
    # this start of the node: connection and call ids must not repeat those of an
    # earlier start (a late worker reply, a crashed node's swept connections)
    incarnation = secrets.token_hex(8)
    if config.redis_url:
        from unrealon.engine.redisbroker import parse_cursor

        hub = Hub(prepare_message, parse_cursor)
        engine = _redis_engine(config, reactor, hub, metrics, incarnation)
    else:
        hub = Hub(prepare_message, memory_cursor_key)
        engine = _memory_engine(config, reactor, hub, metrics)
    node = Node(
        config=config,
        reactor=reactor,
        registry=registry,
        hub=hub,
        broker=engine.broker,
        presence=engine.presence,
        verifier=verifier,
        metrics=metrics,
        features=engine.features,
        api_replies=engine.api_replies,
    )
    if engine.backend is not None:
        node.backend = BackendCalls(
            reactor, engine.backend, node_id=config.node_id, incarnation=incarnation,
            is_server_method=registry.has, default_timeout=config.backend_timeout,
            max_timeout=config.backend_max_timeout, max_calls=config.backend_max_calls,
        )
        backend = node.backend
        metrics.watch_backend(backend.in_flight, lambda: backend.dropped, backend.served)
    metrics.watch(
        lambda: hub.connection_count, lambda: hub.user_count, lambda: hub.room_count
    )
    stoppables = list(engine.stoppables)
    loops = engine.loops
    ingress = None
    if config.redis_url:
        ingress = _ingress(config, reactor, BackendDispatch(node), engine, metrics)
        stoppables.insert(0, ingress)
        loops = (ingress.reader, *loops)
    return NodeService(node, RPCServerFactory(node), stoppables, ingress=ingress, loops=loops)


def _memory_engine(config: Config, reactor: Any, hub: Hub, metrics: Metrics) -> _Engine:
    broker = MemoryBroker(
        reactor, hub, history_size=config.history_size, history_ttl=config.history_ttl,
        gap_wait=config.stream_gap_wait, count_chunk=metrics.chunk_outcome,
    )
    presence = MemoryPresence(broker.publish_ephemeral)
    return _Engine(broker=broker, presence=presence, stoppables=(presence, broker),
                   loops=broker.loops, features=("rooms", "history", "presence"),
                   api_replies=MemoryReplyStore(reactor))


def _redis_engine(
    config: Config, reactor: Any, hub: Hub, metrics: Metrics, incarnation: str
) -> _Engine:
    from unrealon.engine.redis import RedisConnections
    from unrealon.engine.redisbackend import RedisBackendLink
    from unrealon.engine.redisbroker import RedisBroker
    from unrealon.engine.redispresence import RedisPresence
    from unrealon.engine.redisreplies import RedisReplyStore

    assert config.redis_url is not None
    connections = RedisConnections.open(config.redis_url, reactor, config.node_id,
                                        config.redis_shards)
    link, failed = connections.link, metrics.loop_failure
    shard_links = [shard.link for shard in connections.room_shards if shard.link is not None]
    metrics.watch_redis(lambda: link.up and all(shard.up for shard in shard_links))
    broker = RedisBroker(
        reactor, hub, connections.commands, connections.feed_reader,
        history_size=config.history_size, history_ttl=config.history_ttl,
        gap_wait=config.stream_gap_wait, subscriber=connections.subscriber,
        channel_prefix=connections.channel_prefix, link=link, count_failure=failed,
        count_chunk=metrics.chunk_outcome, shards=connections.room_shards,
    )
    hub.interest = broker
    channels = broker.rooms.channels
    metrics.watch_room_channels(
        lambda: sum(c.room_count for c in channels), lambda: sum(c.received for c in channels),
        lambda: sum(c.repaired for c in channels), lambda: sum(c.resynced for c in channels),
    )
    presence = RedisPresence(
        reactor, connections.commands, ttl=config.presence_ttl, link=link, count_failure=failed,
        node_id=config.node_id, events_stream=config.events_stream,
        events_maxlen=config.events_maxlen, connection_events=config.connection_events,
        token=incarnation, channels=connections.channel_prefix,
    )
    backend = RedisBackendLink(
        reactor, connections.commands, connections.replies_reader, node_id=config.node_id,
        stream=config.backend_stream, link=link, count_failure=failed,
    )
    return _Engine(
        broker=broker, presence=presence,
        stoppables=(backend, presence, broker, connections),
        loops=(*broker.loops, *presence.loops, *backend.loops),
        features=("rooms", "history", "presence", "ingress", "cluster"),
        api_replies=RedisReplyStore(connections.commands),
        ingress=connections,
        backend=backend,
    )


def _ingress(
    config: Config, reactor: Any, dispatch: BackendDispatch, engine: _Engine, metrics: Metrics
) -> Any:
    from unrealon.ingress import IngressConsumer

    connections = engine.ingress
    return IngressConsumer(
        reactor, connections.commands, connections.ingress_reader, dispatch,
        stream=config.ingress_stream, group=config.ingress_group,
        consumer=config.node_id, dead_stream=config.dead_letter_stream,
        claim_idle=config.claim_idle, max_deliveries=config.max_deliveries,
        max_in_flight=config.ingress_max_in_flight,
        metrics=metrics, link=connections.link,
    )
