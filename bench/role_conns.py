"""Connection roles: idle holder (memory per connection) and connect rate.

Both open connections with the dialect's auth (our server: the JWT in the
URL, checked before the upgrade; django-ipc: its ``Bearer`` first frame).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dialects import DIALECTS
from stats import Hist
from wsclient import Client, close_all, connect_many

now_ns = time.perf_counter_ns


async def idle(spec: dict[str, Any], ctl: Any) -> None:
    """Warm the server up, let the harness read its baseline, then hold N idle."""
    d = DIALECTS[spec["dialect"]]
    concurrency = spec.get("concurrency", 200)
    # A few connections first so one-time allocations (first handshake, first
    # JWT check, imports on first use) are not charged to the measured ones.
    warm, _, _ = await connect_many(spec.get("warmup_conns", 20), 20, spec["url"], d)
    for c in warm:
        await c.call(d.ping(1))
    await close_all(warm)
    await asyncio.sleep(spec.get("quiet_s", 1.0))  # let the server free them
    await ctl.phase("baseline")
    clients, fails, conn_s = await connect_many(spec["conns"], concurrency, spec["url"], d,
                                                deadline_s=spec.get("connect_deadline_s", 120.0))
    await ctl.phase("connected", connected=len(clients), failures=fails, connect_s=conn_s)
    await asyncio.sleep(spec.get("hold_s", 3.0))
    alive = sum(1 for c in clients if not c.closed)
    ctl.done({"conns": len(clients), "alive_after_hold": alive, "connect_failures": fails,
              "connect_s": conn_s})
    await close_all(clients, grace_s=5.0)


async def connect_rate(spec: dict[str, Any], ctl: Any) -> None:
    """Open ``total`` connections at ``concurrency``; each is done at its first ping reply."""
    d = DIALECTS[spec["dialect"]]
    hist = Hist()

    async def first_ping(c: Client) -> None:
        reply = await c.call(d.ping(1))
        if d.is_error(reply):
            raise RuntimeError("ping refused")
        # From connect start: TCP + upgrade + auth + first round trip.
        hist.add((now_ns() - c.t_start) / 1000.0)

    await ctl.phase("ready")
    clients, fails, elapsed = await connect_many(
        spec["total"], spec["concurrency"], spec["url"], d, after=first_ping,
        deadline_s=spec.get("connect_deadline_s", 120.0))
    ctl.done({"connected": len(clients), "failures": fails, "elapsed_s": elapsed,
              "conns_per_s": len(clients) / max(elapsed, 1e-9), "hist": hist.to_dict()})
    await close_all(clients, grace_s=5.0)
