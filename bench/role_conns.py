"""Connection roles: idle holder (memory per connection) and connect rate.

Both open connections with the dialect's auth (our server: the JWT in the
URL, checked before the upgrade; django-ipc: its ``Bearer`` first frame).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from typing import Any

from dialects import DIALECTS
from stats import Hist
from wsclient import Client, close_all, connect_many

now_ns = time.perf_counter_ns


# File descriptors a client process needs besides its sockets (stdio, the
# event loop's epoll and wake-up fds, the control pipe), with a wide margin.
FD_RESERVE = 100


def _raise_fd_limit() -> int | None:
    """Soft RLIMIT_NOFILE raised to the hard limit; the resulting soft limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _open_fds() -> int | None:
    """File descriptors open in this process (None where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own
    except OSError:
        return None


def _codes(clients: list[Client]) -> dict[str, int]:
    """Close codes of the connections that closed, by code."""
    out: dict[str, int] = {}
    for c in clients:
        if c.closed:
            k = str(c.close_code)
            out[k] = out.get(k, 0) + 1
    return out


async def idle(spec: dict[str, Any], ctl: Any) -> None:
    """Warm the server up, let the harness read its baseline, then hold N idle.

    Phases: ``baseline`` (warm-up done) -> ``connected`` (N open, authenticated)
    -> ``held`` (after ``hold_s`` idle; the harness closes its CPU window)
    -> done, after a ``system.ping`` on every connection proved it still answers.
    """
    d = DIALECTS[spec["dialect"]]
    n = spec["conns"]
    concurrency = spec.get("concurrency", 200)
    fd_limit = _raise_fd_limit()
    if fd_limit is not None and n + FD_RESERVE > fd_limit:
        raise RuntimeError(f"{n} connections need more than this process's fd limit {fd_limit}")
    # A few connections first so one-time allocations (first handshake, first
    # JWT check, imports on first use) are not charged to the measured ones.
    warm, _, _ = await connect_many(spec.get("warmup_conns", 20), 20, spec["url"], d)
    for c in warm:
        await c.call(d.ping(1))
    await close_all(warm)
    await asyncio.sleep(spec.get("quiet_s", 1.0))  # let the server free them
    await ctl.phase("baseline")
    clients, fails, conn_s = await connect_many(n, concurrency, spec["url"], d,
                                                deadline_s=spec.get("connect_deadline_s", 120.0))
    await ctl.phase("connected", connected=len(clients), failures=fails, connect_s=conn_s,
                    client_fds=_open_fds(), fd_limit=fd_limit)
    await asyncio.sleep(spec.get("hold_s", 3.0))
    open_after = sum(1 for c in clients if not c.closed)
    await ctl.phase("held", open_after_hold=open_after)
    # Still alive = still answers: one ping on every connection, all at once.
    live = [c for c in clients if not c.closed]
    t0 = time.monotonic()
    replies = await asyncio.gather(*(c.call(d.ping(2), spec.get("ping_timeout_s", 30.0))
                                     for c in live), return_exceptions=True)
    answered = sum(1 for r in replies if isinstance(r, bytes) and not d.is_error(r))
    ctl.done({"conns": len(clients), "open_after_hold": open_after,
              "alive_after_hold": answered, "ping_check_s": time.monotonic() - t0,
              "connect_failures": fails, "connect_s": conn_s,
              "closed_codes": _codes(clients)})
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
