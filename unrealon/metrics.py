"""
Prometheus metrics of one node, in a registry of its own.

A registry per node (not prometheus-client's global one) keeps several nodes
in one test process from colliding, and lets /metrics show exactly this
node.  Gauges that mirror live state are read through callbacks at scrape
time, so the hot path only ever increments counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The node's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "unrealon_connections", "Open WebSocket connections", registry=r
        )
        self.users = Gauge("unrealon_users", "Distinct users connected here", registry=r)
        self.rooms = Gauge("unrealon_rooms", "Rooms with local members", registry=r)
        self.connections_opened = Counter(
            "unrealon_connections_opened", "WebSocket connections accepted", registry=r
        )
        self.handshakes_refused = Counter(
            "unrealon_handshakes_refused",
            "WebSocket handshakes refused",
            ["reason"],
            registry=r,
        )
        self.closes = Counter(
            "unrealon_closes", "Connections closed by the server", ["code"], registry=r
        )
        self.calls = Counter(
            "unrealon_rpc_calls", "JSON-RPC calls handled", ["method", "outcome"], registry=r
        )
        self.call_seconds = Histogram(
            "unrealon_rpc_seconds",
            "JSON-RPC call handling time",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.rate_limited = Counter(
            "unrealon_rate_limited", "Calls refused by the rate limit", registry=r
        )
        self.events_delivered = Counter(
            "unrealon_events_delivered", "Room events sent to local connections", registry=r
        )
        self.bytes_sent = Counter(
            "unrealon_bytes_sent", "WebSocket payload bytes sent", registry=r
        )
        self.ingress_handled = Counter(
            "unrealon_ingress_entries",
            "Backend ingress entries handled",
            ["outcome"],
            registry=r,
        )
        self.ingress_lag = Gauge(
            "unrealon_ingress_lag", "Ingress entries not yet read by the group", registry=r
        )
        self.ingress_pending = Gauge(
            "unrealon_ingress_pending", "Ingress entries read but not acknowledged", registry=r
        )
        self.ingress_dead = Gauge(
            "unrealon_ingress_dead_letters", "Entries in the dead-letter stream", registry=r
        )
        self.redis_up = Gauge("unrealon_redis_up", "1 when Redis answers", registry=r)
        self._call_children: dict[tuple[str, str], Any] = {}

    def call_outcome(self, method: str, outcome: str) -> None:
        """Count one call; the labelled child is looked up once per pair (hot path)."""
        child = self._call_children.get((method, outcome))
        if child is None:
            child = self.calls.labels(method=method, outcome=outcome)
            self._call_children[(method, outcome)] = child
        child.inc()

    def watch(
        self,
        connections: Callable[[], float],
        users: Callable[[], float],
        rooms: Callable[[], float],
    ) -> None:
        """Read live counts at scrape time."""
        self.connections.set_function(connections)
        self.users.set_function(users)
        self.rooms.set_function(rooms)
