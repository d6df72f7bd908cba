"""
Prometheus metrics of one node, in a registry of its own.

A registry per node (not prometheus-client's global one) keeps several nodes
in one test process from colliding, and lets /metrics show exactly this
node.  Gauges that mirror live state are read through callbacks at scrape
time, so the hot path only ever increments counters.

The metrics bumped once per call, per delivered event or per ingress entry
are L{ReactorCounter} and L{ReactorHistogram}: plain numbers that only the
reactor thread changes, turned into Prometheus samples at scrape time.
prometheus-client's own take a lock and check their argument on every
update, about a microsecond each, and a call used to pay for four of them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class ReactorCounter:
    """
    A counter for the reactor thread only: C{inc} adds to a float.  With
    C{labelnames}, C{labels(...)} returns the child for those values (the
    same object each time, so callers may keep it).
    """

    __slots__ = ("_children", "documentation", "labelnames", "name", "value")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.value = 0.0
        self._children: dict[tuple[str, ...], ReactorCounter] = {}

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def labels(self, **values: str) -> ReactorCounter:
        key = tuple(values[name] for name in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = ReactorCounter(self.name, self.documentation)
        return child

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if self.labelnames:
            for key, child in self._children.items():
                family.add_metric(list(key), child.value)
        else:
            family.add_metric([], self.value)
        return family


class ReactorHistogram:
    """A histogram for the reactor thread only: one bisect and two additions per value."""

    __slots__ = ("bounds", "counts", "documentation", "name", "sum")

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self) -> Metric:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self.sum
        )


class _ReactorMetrics(Collector):
    """Exposes a node's reactor-thread metrics in its registry."""

    def __init__(self, metrics: Sequence[ReactorCounter | ReactorHistogram]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield metric.family()


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
        self.calls = ReactorCounter(
            "unrealon_rpc_calls", "JSON-RPC calls handled", ["method", "outcome"]
        )
        self.call_seconds = ReactorHistogram(
            "unrealon_rpc_seconds",
            "JSON-RPC call handling time",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        # counted on the refusal path, which a flood takes: no lock
        self.rate_limited = ReactorCounter(
            "unrealon_rate_limited", "Messages refused by the rate limit"
        )
        self.events_delivered = ReactorCounter(
            "unrealon_events_delivered", "Room events sent to local connections"
        )
        self.bytes_sent = ReactorCounter("unrealon_bytes_sent", "WebSocket payload bytes sent")
        self.ingress_handled = ReactorCounter(
            "unrealon_ingress_entries", "Backend ingress entries handled", ["outcome"]
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
        self.loop_failures = ReactorCounter(
            "unrealon_loop_failures",
            "Unexpected errors caught in supervised loops (each loop restarted)",
            ["loop"],
        )
        self.api_requests = ReactorCounter(
            "unrealon_api_requests", "HTTP API requests answered", ["method", "status"]
        )
        self.stream_chunks = ReactorCounter(
            "unrealon_stream_chunks",
            "Chunks of streamed messages handled here (PROTOCOL.md 5.1), by outcome: delivered, "
            "held (an earlier one missing), ignored (repeated, late, after done), released "
            "(held chunks let go after the gap wait, the missing ones reported)",
            ["outcome"],
        )
        r.register(
            _ReactorMetrics(
                [self.calls, self.call_seconds, self.events_delivered, self.bytes_sent,
                 self.ingress_handled, self.rate_limited, self.loop_failures, self.api_requests,
                 self.stream_chunks]
            )
        )

    def call_outcome(self, method: str, outcome: str) -> None:
        """Count one call (C{calls.labels} keeps each pair's child)."""
        self.calls.labels(method=method, outcome=outcome).inc()

    def watch_redis(self, up: Callable[[], bool]) -> None:
        """
        C{unrealon_redis_up}: 1 while Redis (with sharded rooms: every shard)
        answers, 0 during an outage.  Only
        the Redis engine has it (on the memory engine there is no Redis to
        report, so the gauge is absent rather than a misleading 0).
        """
        gauge = Gauge("unrealon_redis_up", "1 while Redis answers, 0 during an outage",
                      registry=self.registry)
        gauge.set_function(lambda: 1.0 if up() else 0.0)

    def watch_room_channels(self, rooms: Callable[[], float], received: Callable[[], float],
                            repairs: Callable[[], float], resyncs: Callable[[], float]) -> None:
        """
        Interest routing (Redis engine): the rooms this node listens to, the
        messages their channels brought, and the gaps it repaired from a
        room's history or could not (the room's clients then recover).
        """
        r = self.registry
        Gauge("unrealon_room_channels", "Room channels this node is subscribed to (rooms with "
              "local members, and rooms in their grace period)", registry=r).set_function(rooms)
        Gauge("unrealon_room_channel_messages", "Messages received on room channels, "
              "since start", registry=r).set_function(received)
        Gauge("unrealon_room_gaps_repaired", "Room channel gaps repaired from history "
              "(clients saw nothing), since start", registry=r).set_function(repairs)
        Gauge("unrealon_room_gaps_resynced", "Room channel gaps history no longer covered "
              "(the room's clients were sent to recover), since start",
              registry=r).set_function(resyncs)

    def watch_backend(self, in_flight: Callable[[], float], dropped: Callable[[], float],
                      methods: Callable[[], float]) -> None:
        """
        Browser calls to backend methods (PROTOCOL.md section 9): in flight,
        replies that came too late (after a deadline or a cancel), and the
        declared methods a live worker serves.  Redis engine only, as above.
        """
        r = self.registry
        Gauge("unrealon_backend_calls_in_flight", "Backend calls of this node's connections "
              "waiting for their reply", registry=r).set_function(in_flight)
        Gauge("unrealon_backend_replies_dropped", "Worker replies that found no call in flight "
              "(late: after the deadline or a cancel), since start", registry=r
              ).set_function(dropped)
        Gauge("unrealon_backend_methods_served", "Declared backend methods a live worker serves",
              registry=r).set_function(methods)

    def chunk_outcome(self, outcome: str) -> None:
        """Count one chunk of a streamed message by what became of it."""
        self.stream_chunks.labels(outcome=outcome).inc()

    def loop_failure(self, loop: str) -> None:
        """Count one unexpected error in the supervised loop C{loop}."""
        self.loop_failures.labels(loop=loop).inc()

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
