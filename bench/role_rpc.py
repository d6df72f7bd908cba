"""RPC roles: closed-loop throughput and open-loop fixed-rate latency.

Closed loop: every connection has exactly one ``system.ping`` in flight and
sends the next one from the reply callback (no task switch), which finds the
server's saturation throughput. Open loop: requests leave at scheduled times
whatever the replies do, and latency is measured from the *scheduled* time,
so a stalled server cannot hide its stall (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dialects import DIALECTS, Dialect
from stats import Hist
from wsclient import Client, close_all, connect_many

now_ns = time.perf_counter_ns
# Sleeps shorter than the loop's timer resolution return at once and turn the
# sender into a busy loop that eats the client core; instead wake at most
# every millisecond and send everything due (stamped with its scheduled time).
MIN_SLEEP_S = 0.001


class ClosedLoop:
    """One outstanding ping per connection, re-sent from the reply callback."""

    def __init__(self, dialect: Dialect, clients: list[Client]) -> None:
        self.d = dialect
        self.clients = clients
        self.hist = Hist()
        self.ops = self.errors = self.outstanding = self.rid = 0
        self.running = False
        self.last_ns = 0
        for c in clients:
            c.on_msg = self._make_handler(c)

    def _make_handler(self, c: Client):  # type: ignore[no-untyped-def]
        d, hist = self.d, self.hist

        def on_reply(payload: bytes) -> None:
            if d.is_event(payload):
                return
            t = now_ns()
            rid, sent = c.state
            self.outstanding -= 1
            if d.is_error(payload) or d.reply_id(payload) != rid:
                self.errors += 1
            else:
                self.ops += 1
                hist.add((t - sent) / 1000.0)
                self.last_ns = t
            if self.running:
                self._send(c)
        return on_reply

    def _send(self, c: Client) -> None:
        if c.closed:
            return
        self.rid += 1
        c.state = (self.rid, now_ns())
        self.outstanding += 1
        c.send(self.d.ping(self.rid))

    def start(self) -> None:
        self.hist.clear()
        self.ops = self.errors = 0
        self.running = True
        for c in self.clients:
            self._send(c)

    async def stop(self, tail_s: float) -> None:
        """Stop issuing; wait (bounded) for the replies still in flight."""
        self.running = False
        end = time.monotonic() + tail_s
        while self.outstanding > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)


async def rpc_closed(spec: dict[str, Any], ctl: Any) -> None:
    """Closed loop: warm up, sync with the harness, measure ``duration_s``."""
    d = DIALECTS[spec["dialect"]]
    clients, fails, conn_s = await connect_many(
        spec["conns"], spec.get("concurrency", 200), spec["url"], d)
    if not clients:
        raise RuntimeError(f"no connection opened: {fails}")
    loop = ClosedLoop(d, clients)
    loop.start()
    await asyncio.sleep(spec.get("warmup_s", 2.0))
    await loop.stop(5.0)
    await ctl.phase("ready", connected=len(clients), failures=fails, connect_s=conn_s)
    t0 = now_ns()
    loop.start()
    await asyncio.sleep(spec["duration_s"])
    await loop.stop(spec.get("tail_s", 5.0))
    span = max(loop.last_ns, t0 + 1) - t0
    ctl.done({"conns": len(clients), "connect_failures": fails, "ops": loop.ops,
              "errors": loop.errors, "lost": loop.outstanding, "span_s": span / 1e9,
              "rps": loop.ops / (span / 1e9), "hist": loop.hist.to_dict()})
    await close_all(clients)


async def rpc_open(spec: dict[str, Any], ctl: Any) -> None:
    """Open loop at ``rate`` pings/s over ``conns`` connections for ``duration_s``."""
    d = DIALECTS[spec["dialect"]]
    clients, fails, _ = await connect_many(spec["conns"], spec.get("concurrency", 200),
                                           spec["url"], d)
    if not clients:
        raise RuntimeError(f"no connection opened: {fails}")
    pending: dict[int, int] = {}
    hist = Hist()
    errors = [0]
    last = [0]

    def on_reply(payload: bytes) -> None:
        if d.is_event(payload):
            return
        t = now_ns()
        sched = pending.pop(d.reply_id(payload) or -1, None)
        if sched is None or d.is_error(payload):
            errors[0] += 1
        else:
            hist.add((t - sched) / 1000.0)
            last[0] = t

    for c in clients:
        c.on_msg = on_reply
    await ctl.phase("ready", connected=len(clients), failures=fails)

    rate = float(spec["rate"])
    total = max(1, int(rate * spec["duration_s"]))
    interval = 1e9 / rate
    t0 = now_ns()
    i = max_lag = 0
    nconn = len(clients)
    while i < total:
        t = now_ns()
        due = min(total, int((t - t0) / interval) + 1)
        if due - i > 1:
            max_lag = max(max_lag, t - int(t0 + i * interval))
        while i < due:
            i += 1
            pending[i] = int(t0 + (i - 1) * interval)
            clients[i % nconn].send(d.ping(i))
        await asyncio.sleep(max(MIN_SLEEP_S, (t0 + i * interval - now_ns()) / 1e9))
    end = time.monotonic() + spec.get("tail_s", 5.0)
    while pending and time.monotonic() < end:
        await asyncio.sleep(0.01)
    span = (max(last[0], t0 + 1) - t0) / 1e9
    ctl.done({"conns": nconn, "offered_rps": rate, "sent": total, "ok": hist.n,
              "errors": errors[0], "lost": len(pending), "achieved_rps": hist.n / max(span, 1e-9),
              "sender_max_lag_ms": max_lag / 1e6, "hist": hist.to_dict()})
    await close_all(clients)
