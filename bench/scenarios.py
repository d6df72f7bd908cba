"""The seven scenarios, as harness-side procedures over client processes.

Each ``sc_*`` coroutine takes the run context and a started server and
returns case dicts: ``{scenario, case, params, status, reason, metrics,
checks}``. ``checks`` lists what looked wrong (lost messages, connect
failures...): shown in the report, and fatal for our own peers in ``--smoke``.
Sizes come from ``FULL`` or ``SMOKE``; every loop is bounded by a count and
a deadline.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import ClientProc, Window, finish_all, per_op_us, start_all
from role_conns import FD_RESERVE
from servers import Ports, RunningServer, free_port
from stats import merged

FULL: dict[str, Any] = {
    "rpc": {"conns": [1, 10, 100, 1000], "warmup_s": 2.0, "duration_s": 5.0,
            "open_conns": 100, "open_fracs": [0.25, 0.5, 0.75], "open_duration_s": 4.0},
    # (members, publish rate/s, seconds, receiver processes)
    "fanout": [(1000, 20, 5.0, 1), (1000, 100, 5.0, 1), (10000, 5, 5.0, 2)],
    "xadd_latency": {"rooms": 100, "members_per_room": 2, "rate": 1000, "duration_s": 5.0},
    # publisher_conns: client connections the rpc publish adapter spreads the
    # sessions over (a backend publishes through many workers, not one socket)
    # chunks_per_message: each session streams answers of this many chunks in
    # a row (seq from 0 in each, done on the last): 250 chunks a session in
    # 5 s make answers of 100, 100 and 50 chunks
    "ai_stream": {"sessions": 50, "chunks_per_s": 50, "duration_s": 5.0, "publisher_conns": 10,
                  "chunks_per_message": 100},
    # quiet_s: pause after the warm-up connections closed, before the baseline
    # conns: one case per size, each against one server process (19,000: the
    # issue's "19,000 connections in one process"); a fresh server per case
    "idle_memory": {"conns": [10000, 19000], "hold_s": 3.0, "settle_s": 1.0, "quiet_s": 1.0,
                    "connect_deadline_s": 240.0, "ping_timeout_s": 30.0, "fresh_server": True},
    "connect_rate": {"total": 3000, "concurrency": 200},
    "reconnect_storm": {"members": 1000, "rate": 20, "duration_s": 8.0, "drop_at_s": 3.0},
    "grace_s": 10.0,
}

SMOKE: dict[str, Any] = {
    "rpc": {"conns": [10], "warmup_s": 0.1, "duration_s": 0.3,
            "open_conns": 10, "open_fracs": [0.5], "open_duration_s": 0.3},
    "fanout": [(100, 20, 0.6, 1)],
    "xadd_latency": {"rooms": 10, "members_per_room": 1, "rate": 200, "duration_s": 0.5},
    "ai_stream": {"sessions": 5, "chunks_per_s": 20, "duration_s": 0.6, "publisher_conns": 2,
                  "chunks_per_message": 5},
    "idle_memory": {"conns": [200, 300], "hold_s": 0.2, "settle_s": 0.2, "quiet_s": 0.1,
                    "connect_deadline_s": 30.0, "ping_timeout_s": 10.0, "fresh_server": True},
    "connect_rate": {"total": 200, "concurrency": 50},
    "reconnect_storm": {"members": 50, "rate": 20, "duration_s": 1.2, "drop_at_s": 0.4},
    "grace_s": 3.0,
}

SCENARIOS = ["rpc", "fanout", "xadd_latency", "ai_stream", "idle_memory", "connect_rate",
             "reconnect_storm"]


@dataclass
class Ctx:
    """What every scenario needs besides the server."""

    sizes: dict[str, Any]
    logdir: Path


def case(scenario: str, name: str, params: dict[str, Any], metrics: dict[str, Any] | None = None,
         status: str = "ok", reason: str = "", checks: list[str] | None = None) -> dict[str, Any]:
    return {"scenario": scenario, "case": name, "params": params, "status": status,
            "reason": reason, "metrics": metrics or {}, "checks": checks or []}


def _base(srv: RunningServer) -> dict[str, Any]:
    return {"url": srv.url, "dialect": srv.spec.dialect}


def _cpu_metrics(win: dict[str, Any], ops: float) -> dict[str, Any]:
    return {"server_cpu_us_per_op": per_op_us(win, ops), "server_util": win["server_util"],
            "client_util": win["client_util"], "foreign_util": win["foreign_util"],
            "redis_cpu_us_per_op": (win["redis_cpu_s"] * 1e6 / ops)
            if win.get("redis_cpu_s") is not None and ops > 0 else None}


BUSY_LIMIT = 0.10  # foreign CPU share of the machine above which a case is flagged


def _measurement_notes(win: dict[str, Any]) -> list[str]:
    """Notes on the measurement itself: saturated client, busy machine."""
    out = []
    u = win.get("client_util") or 0
    if u > 0.9:
        out.append("client-bound (client CPU %.0f%%): numbers are a lower bound" % (u * 100))
    f = win.get("foreign_util") or 0
    if f > BUSY_LIMIT:
        out.append("machine busy (other processes used %.0f%% of the CPUs)" % (f * 100))
    return out


async def _guarded(scenario: str, name: str, params: dict[str, Any],
                   body: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run one case; any failure becomes an ``error`` case, never a crash."""
    try:
        return await body()
    except Exception as exc:  # reported in the results table
        return case(scenario, name, params, status="error",
                    reason=f"{type(exc).__name__}: {exc}")


async def _run_simple(ctx: Ctx, srv: RunningServer, spec: dict[str, Any], tag: str,
                      timeout: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One client: wait ready, window, go, wait done. Returns (ready, done, window)."""
    (cp,) = await start_all([spec], ctx.logdir, tag)
    try:
        ready = await cp.phase(timeout)
        win = Window(srv, [cp])
        cp.go()
        done = await cp.phase(timeout)
        return ready, done["result"], win.close()
    finally:
        await finish_all([cp])


# 1. RPC ---------------------------------------------------------------------
async def sc_rpc(ctx: Ctx, srv: RunningServer) -> list[dict[str, Any]]:
    """Closed-loop round-trips at N connections, then open-loop at fractions of saturation."""
    sz = ctx.sizes["rpc"]
    out: list[dict[str, Any]] = []
    sat: dict[int, float] = {}
    for n in sz["conns"]:
        params = {"conns": n, "duration_s": sz["duration_s"]}

        async def body(n: int = n, params: dict[str, Any] = params) -> dict[str, Any]:
            spec = {**_base(srv), "role": "rpc_closed", "conns": n, "warmup_s": sz["warmup_s"],
                    "duration_s": sz["duration_s"], "max_s": 180}
            _, r, win = await _run_simple(ctx, srv, spec, f"rpc{n}", 150)
            sat[n] = r["rps"]
            h = merged([r["hist"]]).summary_ms()
            checks = _measurement_notes(win)
            if r["errors"] or r["lost"]:
                checks.append(f"{r['errors']} errors, {r['lost']} lost")
            if r["connect_failures"]:
                checks.append(f"connect failures {r['connect_failures']}")
            return case("rpc", f"closed_c{n}", params,
                        {"rps": r["rps"], **h, "ops": r["ops"], **_cpu_metrics(win, r["ops"])},
                        checks=checks)
        out.append(await _guarded("rpc", f"closed_c{n}", params, body))
    base = sat.get(sz["open_conns"]) or (max(sat.values()) if sat else None)
    for frac in sz["open_fracs"]:
        name = f"open_{round(frac * 100)}%"
        if not base:
            out.append(case("rpc", name, {}, status="error", reason="no closed-loop saturation"))
            continue
        rate = max(1.0, base * frac)
        params = {"conns": sz["open_conns"], "rate": round(rate), "fraction_of_saturation": frac}

        async def obody(rate: float = rate, params: dict[str, Any] = params, name: str = name) -> dict[str, Any]:
            spec = {**_base(srv), "role": "rpc_open", "conns": sz["open_conns"], "rate": rate,
                    "duration_s": sz["open_duration_s"], "max_s": 120}
            _, r, win = await _run_simple(ctx, srv, spec, "rpcopen", 100)
            h = merged([r["hist"]]).summary_ms()
            checks = _measurement_notes(win)
            if r["lost"] or r["errors"]:
                checks.append(f"{r['lost']} lost, {r['errors']} errors")
            return case("rpc", name, params,
                        {"offered_rps": r["offered_rps"], "achieved_rps": r["achieved_rps"], **h,
                         "sender_max_lag_ms": r["sender_max_lag_ms"], **_cpu_metrics(win, r["ok"])},
                        checks=checks)
        out.append(await _guarded("rpc", name, params, obody))
    return out


# 2-4, 7 share this: receivers + one publisher -------------------------------
async def _pubsub(ctx: Ctx, srv: RunningServer, *, tag: str, rooms: list[str], members: int,
                  procs: int, rate: float, duration: float, event: str, mode: str,
                  adapter: dict[str, Any], track_seq: bool = False,
                  extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Receivers in ``procs`` processes, one publisher; merged results + window.

    ``extra``: more spec keys for the receivers and the publisher alike
    (``chunks_per_message`` in AI mode).
    """
    extra = extra or {}
    count = max(len(rooms), int(rate * duration) // len(rooms) * len(rooms))
    expected = {r: count // len(rooms) for r in rooms}
    grace = ctx.sizes["grace_s"]
    share = [members // procs + (1 if i < members % procs else 0) for i in range(procs)]
    rspecs = [{**_base(srv), "role": "receivers", "members": share[i], "rooms": rooms,
               "member_offset": sum(share[:i]), "expected": expected, "track_seq": track_seq,
               "mode": mode, "deadline_s": duration + grace, "max_s": 200 + duration + grace,
               **extra}
              for i in range(procs)]
    pspec = {**_base(srv), "role": "publisher", "adapter": adapter, "rooms": rooms,
             "event": event, "mode": mode, "count": count, "rate": rate, "max_s": 100 + duration,
             **extra}
    recv = await start_all(rspecs, ctx.logdir, tag + "-recv")
    pub: list[ClientProc] = []
    try:
        readies = await asyncio.gather(*(p.phase(200) for p in recv))
        pub = await start_all([pspec], ctx.logdir, tag + "-pub")
        await pub[0].phase(60)
        win = Window(srv, recv + pub)
        for p in recv:
            p.go()
        pub[0].go()
        dones = await asyncio.gather(*(p.phase(duration + grace + 60) for p in recv + pub))
        w = win.close()
    finally:
        await finish_all(recv + pub)
    rs = [d["result"] for d in dones[:-1]]
    pr = dones[-1]["result"]
    agg: dict[str, Any] = {k: sum(r.get(k, 0) for r in rs) for k in
                           ("members", "expected", "received", "missing", "dups", "out_of_order",
                            "complete_members", "events", "mismatched_events", "bad_done")}
    agg["closed"] = {}
    for r in rs:
        for k, v in r["closed"].items():
            agg["closed"][k] = agg["closed"].get(k, 0) + v
    agg["connect_failures"] = [r["connect_failures"] for r in rs if r["connect_failures"]]
    agg["connect_s"] = max(rd.get("connect_s", 0) for rd in readies)
    last = max((r["last_ns"] for r in rs if r["last_ns"]), default=0)
    # From the first scheduled publish to the last delivery, plus one publish
    # interval: n events span n-1 intervals.
    agg["span_s"] = (last - pr["t0_ns"]) / 1e9 + 1.0 / rate if last else None
    agg["hist"] = merged(r["hist"] for r in rs)
    return agg, pr, w


def _pubsub_checks(agg: dict[str, Any], pr: dict[str, Any], win: dict[str, Any]) -> list[str]:
    checks = _measurement_notes(win)
    if agg["missing"]:
        checks.append(f"{agg['missing']} of {agg['expected']} deliveries missing")
    if agg["dups"]:
        checks.append(f"{agg['dups']} duplicates")
    if agg["closed"]:
        checks.append(f"members closed by server: {agg['closed']}")
    if agg["connect_failures"]:
        checks.append(f"connect failures {agg['connect_failures']}")
    if pr.get("ack_errors"):
        checks.append(f"{pr['ack_errors']} publish calls refused")
    return checks


def _delivery_metrics(agg: dict[str, Any], pr: dict[str, Any], win: dict[str, Any]) -> dict[str, Any]:
    span = agg["span_s"]
    return {"deliveries_per_s": agg["received"] / span if span else 0.0,
            **agg["hist"].summary_ms(), "expected": agg["expected"], "received": agg["received"],
            "missing": agg["missing"], "publisher_max_lag_ms": pr["sender_max_lag_ms"],
            **_cpu_metrics(win, agg["received"])}


async def sc_fanout(ctx: Ctx, srv: RunningServer) -> list[dict[str, Any]]:
    """One room, M members, fixed publish rate: deliveries/s and latency."""
    out = []
    for members, rate, dur, procs in ctx.sizes["fanout"]:
        name = f"m{members}_r{rate}"
        params = {"members": members, "rate": rate, "duration_s": dur, "client_procs": procs,
                  "publish": srv.spec.publish["kind"]}

        async def body(members: int = members, rate: float = rate, dur: float = dur,
                       procs: int = procs, name: str = name, params: dict[str, Any] = params) -> dict[str, Any]:
            agg, pr, win = await _pubsub(
                ctx, srv, tag=name, rooms=["bench:fanout"], members=members, procs=procs,
                rate=rate, duration=dur, event="bench.tick", mode="tick",
                adapter=srv.spec.publish_adapter(srv.ports))
            return case("fanout", name, params, _delivery_metrics(agg, pr, win),
                        checks=_pubsub_checks(agg, pr, win))
        out.append(await _guarded("fanout", name, params, body))
    return out


async def sc_xadd(ctx: Ctx, srv: RunningServer) -> list[dict[str, Any]]:
    """Backend XADD -> client latency, events spread over many rooms."""
    sz = ctx.sizes["xadd_latency"]
    name = f"r{sz['rooms']}_{sz['rate']}eps"
    params = dict(sz)
    adapter = srv.spec.ingress_adapter(srv.ports)
    assert adapter is not None

    async def body() -> dict[str, Any]:
        agg, pr, win = await _pubsub(
            ctx, srv, tag="xadd", rooms=[f"bench:x{i}" for i in range(sz["rooms"])],
            members=sz["rooms"] * sz["members_per_room"], procs=1, rate=sz["rate"],
            duration=sz["duration_s"], event="bench.tick", mode="tick", adapter=adapter)
        m = _delivery_metrics(agg, pr, win)
        events = pr["sent"]
        m["server_cpu_us_per_event"] = per_op_us(win, events)
        return case("xadd_latency", name, params, m, checks=_pubsub_checks(agg, pr, win))
    return [await _guarded("xadd_latency", name, params, body)]


async def sc_ai(ctx: Ctx, srv: RunningServer) -> list[dict[str, Any]]:
    """AI streaming: S sessions x C chunks/s of streamed session.message, one member each.

    Each session streams answers of ``chunks_per_message`` chunks (seq from 0,
    done on the last), published through the server's adapter: XADD of
    ``session.message`` itself for the Redis engine (one CHUNK script per
    chunk), ``bench.publish`` for the memory engine (which hands the chunks to
    the broker's ``append_chunk``, as the backend method does), the same data
    as ordinary events for the peers. Latency is per chunk, from its own
    scheduled time to the event that carried it; ``received`` counts chunks
    (an event may carry several: ``chunks_per_event``).
    """
    sz = ctx.sizes["ai_stream"]
    name = f"s{sz['sessions']}_c{sz['chunks_per_s']}"
    params = {**sz, "publish": srv.spec.publish["kind"]}

    async def body() -> dict[str, Any]:
        agg, pr, win = await _pubsub(
            ctx, srv, tag="ai", rooms=[f"session:s{i}" for i in range(sz["sessions"])],
            members=sz["sessions"], procs=1, rate=sz["sessions"] * sz["chunks_per_s"],
            duration=sz["duration_s"], event="session.message", mode="ai",
            adapter={**srv.spec.publish_adapter(srv.ports), "conns": sz["publisher_conns"]},
            track_seq=True, extra={"chunks_per_message": sz["chunks_per_message"]})
        m = _delivery_metrics(agg, pr, win)
        m["completeness_pct"] = 100.0 * (agg["expected"] - agg["missing"]) / max(1, agg["expected"])
        m["out_of_order"] = agg["out_of_order"]
        m["events"] = agg["events"]
        m["chunks_per_event"] = agg["received"] / agg["events"] if agg["events"] else None
        m["mismatched_events"] = agg["mismatched_events"]
        checks = _pubsub_checks(agg, pr, win)
        if agg["out_of_order"]:
            checks.append(f"{agg['out_of_order']} chunks out of order")
        if agg["mismatched_events"]:
            checks.append(f"{agg['mismatched_events']} events whose text is not their "
                          "seq..last_seq chunks")
        if agg["bad_done"]:
            checks.append(f"{agg['bad_done']} events with done wrong")
        return case("ai_stream", name, params, m, checks=checks)
    return [await _guarded("ai_stream", name, params, body)]


# 5. idle memory -------------------------------------------------------------
SERVER_FD_RESERVE = 64  # a server's own fds besides client sockets (listeners, log, Redis, epoll)


def _proc_fd_limit(pid: int) -> int | None:
    """Soft ``Max open files`` of a process, from /proc/<pid>/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    v = line.split()[3]
                    return None if v == "unlimited" else int(v)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _proc_fds(pid: int) -> int | None:
    """File descriptors a process has open now (None if /proc is unreadable)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _client_fd_limit() -> int | None:
    """Hard RLIMIT_NOFILE: what a client process can raise its soft limit to."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


async def _fresh_server(srv: RunningServer) -> None:
    """Restart the server (and its private Redis) on new ports: a clean RSS baseline."""
    srv.stop()
    srv.ports = Ports(ws=free_port(), http=free_port())
    await srv.start()


def _count(xs: list[dict[str, Any]], key: str) -> int:
    return sum(int(x[key]) for x in xs)


def _sum_kinds(xs: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        for k, v in x.items():
            out[k] = out.get(k, 0) + v
    return out


async def _idle_case(ctx: Ctx, srv: RunningServer, n: int, sz: dict[str, Any],
                     params: dict[str, Any]) -> dict[str, Any]:
    """Hold ``n`` idle connections to one server process; RSS growth per connection."""
    name = f"n{n}"
    pid = srv.proc.pid if srv.proc else -1
    limit = _proc_fd_limit(pid)
    if limit is not None and n + SERVER_FD_RESERVE > limit:
        return case("idle_memory", name, params, status="failed",
                    reason=f"server fd limit {limit} is below {n} connections + {SERVER_FD_RESERVE}")
    procs = params["client_procs"]
    share = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    deadline = sz["connect_deadline_s"]
    specs = [{**_base(srv), "role": "idle", "conns": share[i], "hold_s": sz["hold_s"],
              "quiet_s": sz["quiet_s"], "warmup_conns": 20 if i == 0 else 0,
              "connect_deadline_s": deadline, "ping_timeout_s": sz["ping_timeout_s"],
              "max_s": 120 + deadline + sz["hold_s"] + sz["ping_timeout_s"]}
             for i in range(procs)]
    cps = await start_all(specs, ctx.logdir, f"idle{n}")
    try:
        await asyncio.gather(*(p.phase(90) for p in cps))
        base = srv.snapshot()
        for p in cps:
            p.go()
        conns = await asyncio.gather(*(p.phase(deadline + 60) for p in cps))
        await asyncio.sleep(sz["settle_s"])
        after = srv.snapshot()
        server_fds = _proc_fds(pid)
        win = Window(srv, cps)
        for p in cps:
            p.go()
        await asyncio.gather(*(p.phase(sz["hold_s"] + 60) for p in cps))
        w = win.close()
        for p in cps:
            p.go()
        dones = [d["result"] for d in
                 await asyncio.gather(*(p.phase(sz["ping_timeout_s"] + 60) for p in cps))]
    finally:
        await finish_all(cps)
    held = _count(conns, "connected")
    alive = _count(dones, "alive_after_hold")
    fails = _sum_kinds([c["failures"] for c in conns])
    problems = []
    if held < n:
        problems.append(f"held {held} of {n} (connect failures {fails})")
    if alive < held:
        closed = _sum_kinds([d["closed_codes"] for d in dones])
        problems.append(f"{held - alive} of {held} did not answer a ping after the "
                        f"{sz['hold_s']:g}s hold (closed, by code: {closed})")
    per = ((after["rss_kib"] or 0) - (base["rss_kib"] or 0)) / held if held else None
    tcp = ((after["tcp_mem_pages"] or 0) - (base["tcp_mem_pages"] or 0)) * 4.0 / held if held else None
    return case("idle_memory", name, params, {
        "rss_per_conn_kib": per, "rss_base_mib": (base["rss_kib"] or 0) / 1024,
        "rss_after_mib": (after["rss_kib"] or 0) / 1024, "kernel_tcp_kib_per_conn": tcp,
        "connected": held, "alive_after_hold": alive,
        "connect_s": max(c["connect_s"] for c in conns),
        "ping_check_s": max(d["ping_check_s"] for d in dones),
        "server_fds": server_fds, "server_fd_limit": limit,
        "client_fds_max": max((c.get("client_fds") or 0) for c in conns),
        "idle_cpu_pct": (w["server_util"] or 0) * 100},
        status="failed" if problems else "ok", reason="; ".join(problems))


async def sc_idle(ctx: Ctx, srv: RunningServer) -> list[dict[str, Any]]:
    """RSS per idle connection (delta over a warmed-up baseline), one case per size.

    Each case holds all its connections against the one server process, split
    over as few client processes as the fd limit allows (each still on the
    client core), then checks every connection still answers a ping. With
    ``fresh_server``, every case after the first restarts the server so no
    allocator carry-over from the previous case lowers the delta.
    """
    sz = ctx.sizes["idle_memory"]
    out: list[dict[str, Any]] = []
    budget = _client_fd_limit()
    for i, n in enumerate(sz["conns"]):
        name = f"n{n}"
        procs = max(1, -(-n // (budget - FD_RESERVE))) if budget else 1
        params = {"conns": n, "client_procs": procs, "hold_s": sz["hold_s"],
                  "settle_s": sz["settle_s"], "connect_deadline_s": sz["connect_deadline_s"]}

        if not srv.alive() and not sz.get("fresh_server"):
            out.append(case("idle_memory", name, params, status="failed",
                            reason="not run: the server died in an earlier case"))
            continue

        async def body(i: int = i, n: int = n, params: dict[str, Any] = params) -> dict[str, Any]:
            if i > 0 and sz.get("fresh_server"):
                await _fresh_server(srv)
            return await _idle_case(ctx, srv, n, sz, params)
        c = await _guarded("idle_memory", name, params, body)
        if not srv.alive():
            c["status"] = "failed" if c["status"] == "ok" else c["status"]
            c["reason"] = "; ".join(x for x in ("server process died", c["reason"]) if x)
        out.append(c)
    return out


# 6. connect rate ------------------------------------------------------------
async def sc_connect(ctx: Ctx, srv: RunningServer) -> list[dict[str, Any]]:
    """Connections (handshake + auth + first ping) per second at fixed concurrency."""
    sz = ctx.sizes["connect_rate"]
    name = f"n{sz['total']}_c{sz['concurrency']}"

    async def body() -> dict[str, Any]:
        spec = {**_base(srv), "role": "connect", **sz, "max_s": 200}
        _, r, win = await _run_simple(ctx, srv, spec, "connect", 150)
        checks = _measurement_notes(win)
        if r["failures"]:
            checks.append(f"failures {r['failures']}")
        return case("connect_rate", name, dict(sz), {
            "conns_per_s": r["conns_per_s"], **merged([r["hist"]]).summary_ms(),
            "connected": r["connected"], **_cpu_metrics(win, r["connected"])}, checks=checks)
    return [await _guarded("connect_rate", name, dict(sz), body)]


# 7. reconnect storm ---------------------------------------------------------
async def sc_storm(ctx: Ctx, srv: RunningServer) -> list[dict[str, Any]]:
    """All members drop at once and rejoin with since: time until all recovered."""
    sz = ctx.sizes["reconnect_storm"]
    name = f"n{sz['members']}"
    params = {**sz, "publish": srv.spec.publish["kind"]}

    async def body() -> dict[str, Any]:
        total = int(sz["rate"] * sz["duration_s"])
        grace = ctx.sizes["grace_s"]
        sspec = {**_base(srv), "role": "storm", "members": sz["members"], "room": "bench:storm",
                 "total": total, "drop_at_s": sz["drop_at_s"], "concurrency": 200,
                 "deadline_s": sz["duration_s"] + grace, "max_s": 300}
        pspec = {**_base(srv), "role": "publisher", "adapter": srv.spec.publish_adapter(srv.ports),
                 "rooms": ["bench:storm"], "event": "bench.tick", "mode": "tick", "count": total,
                 "rate": sz["rate"], "max_s": 60 + sz["duration_s"]}
        procs = await start_all([sspec], ctx.logdir, "storm")
        try:
            await procs[0].phase(120)
            procs += await start_all([pspec], ctx.logdir, "storm-pub")
            await procs[1].phase(60)
            win = Window(srv, procs)
            procs[0].go()
            procs[1].go()
            dones = await asyncio.gather(*(p.phase(sz["duration_s"] + grace + 120) for p in procs))
            w = win.close()
        finally:
            await finish_all(procs)
        r = dones[0]["result"]
        h = merged([r["hist"]])
        checks = _measurement_notes(w)
        if r["complete"] < r["members"]:
            checks.append(f"{r['members'] - r['complete']} of {r['members']} members incomplete")
        if r["not_recovered"]:
            checks.append(f"{r['not_recovered']} rejoins not recovered")
        if r["dups"]:
            checks.append(f"{r['dups']} duplicates")
        if r["reconnect_failures"]:
            checks.append(f"reconnect failures {r['reconnect_failures']}")
        return case("reconnect_storm", name, params, {
            "time_to_all_s": r["time_to_all_s"], "recovery_p50_ms": h.summary_ms()["p50_ms"],
            "recovery_p99_ms": h.summary_ms()["p99_ms"], "recovered": r["recovered"],
            "complete": r["complete"], "members": r["members"],
            **_cpu_metrics(w, r["reconnected"])}, checks=checks)
    return [await _guarded("reconnect_storm", name, params, body)]


RUNNERS: dict[str, Callable[[Ctx, RunningServer], Awaitable[list[dict[str, Any]]]]] = {
    "rpc": sc_rpc, "fanout": sc_fanout, "xadd_latency": sc_xadd, "ai_stream": sc_ai,
    "idle_memory": sc_idle, "connect_rate": sc_connect, "reconnect_storm": sc_storm,
}
