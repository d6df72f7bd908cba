"""Harness-side plumbing: client subprocesses and measurement windows.

A :class:`ClientProc` is one ``loadclient.py`` process pinned to the client
core. The harness drives it through the phase protocol (see loadclient.py)
and brackets the measured part with a :class:`Window`, which reads server,
Redis and client CPU at both ends. CPU-µs per operation come from there.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from servers import BENCH, CLIENT_CPU, RunningServer, cpu_seconds, machine_busy_s

LOADCLIENT = BENCH / "loadclient.py"


class ClientFailed(RuntimeError):
    """A load-client process reported an error or died."""


class ClientProc:
    """One load-client process and its phase stream."""

    def __init__(self, spec: dict[str, Any], log: Path) -> None:
        self.spec = spec
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.logf: Any = None

    async def start(self) -> "ClientProc":
        self.logf = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            "taskset", "-c", CLIENT_CPU, sys.executable, str(LOADCLIENT), json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.logf,
            limit=32 * 1024 * 1024)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def phase(self, timeout: float) -> dict[str, Any]:
        """Next phase message; raises ClientFailed on error, exit or timeout."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise ClientFailed("{}: no phase within {:.0f}s".format(self.spec["role"], timeout)) from None
        if not line:
            await self.proc.wait()
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ClientFailed("{} exited {}: {}".format(self.spec["role"], self.proc.returncode,
                                                      " | ".join(tail)))
        msg: dict[str, Any] = json.loads(line)
        if msg.get("phase") == "error":
            raise ClientFailed("{}: {}".format(self.spec["role"], msg.get("error")))
        return msg

    def go(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid) if self.proc else None

    async def finish(self, timeout: float = 15.0) -> None:
        """Wait for exit (it closes its connections first); kill it if it hangs."""
        if self.proc is None:
            return
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self.logf:
            self.logf.close()


async def start_all(specs: list[dict[str, Any]], logdir: Path, tag: str) -> list[ClientProc]:
    """Start client processes (their setup runs concurrently)."""
    procs = [ClientProc(s, logdir / f"client-{tag}-{i}.log") for i, s in enumerate(specs)]
    for p in procs:
        await p.start()
    return procs


async def finish_all(procs: list[ClientProc]) -> None:
    await asyncio.gather(*(p.finish() for p in procs))


class Window:
    """CPU and RSS between two points of a measured phase."""

    def __init__(self, srv: RunningServer, clients: list[ClientProc]) -> None:
        self.srv = srv
        self.clients = clients
        self.a = srv.snapshot()
        self.ca = [c.cpu() for c in clients]
        self.busy_a = machine_busy_s()
        self.self_a = sum(os.times()[:2])

    def close(self) -> dict[str, Any]:
        b = self.srv.snapshot()
        cb = [c.cpu() for c in self.clients]
        busy_b = machine_busy_s()
        self_cpu = sum(os.times()[:2]) - self.self_a
        wall = (b["t"] or 0) - (self.a["t"] or 0)

        def delta(k: str) -> float | None:
            if self.a.get(k) is None or b.get(k) is None:
                return None
            return b[k] - self.a[k]  # type: ignore[operator]

        client = sum((y or 0) - (x or 0) for x, y in zip(self.ca, cb, strict=False))
        # The machine is shared: CPU used by processes that are not part of
        # this measurement (other sessions' builds, tests) skews everything.
        foreign = None
        if self.busy_a is not None and busy_b is not None and wall > 0:
            ours = (delta("cpu_s") or 0) + (delta("redis_cpu_s") or 0) + client + self_cpu
            foreign = max(0.0, (busy_b - self.busy_a) - ours) / (wall * (os.cpu_count() or 1))
        return {"wall_s": wall, "server_cpu_s": delta("cpu_s"), "redis_cpu_s": delta("redis_cpu_s"),
                "client_cpu_s": client, "rss_kib": b["rss_kib"],
                "server_util": (delta("cpu_s") or 0) / wall if wall > 0 else None,
                "client_util": client / wall if wall > 0 else None,
                "foreign_util": foreign}


def per_op_us(win: dict[str, Any], ops: float) -> float | None:
    """Server CPU microseconds per operation (None when nothing happened)."""
    cpu = win.get("server_cpu_s")
    return None if cpu is None or ops <= 0 else cpu * 1e6 / ops


async def wait_quiet(max_wait_s: float, limit: float, log: Any) -> float | None:
    """Wait (bounded) until other processes use less than ``limit`` of the CPUs.

    Called between cases, when nothing of ours is running, so the machine's
    busy share is all foreign. Returns the last busy share seen (None if
    /proc/stat is unreadable); the case runs anyway after ``max_wait_s``.
    """
    ncpu = os.cpu_count() or 1
    end = asyncio.get_running_loop().time() + max_wait_s
    told = False
    while True:
        a = machine_busy_s()
        await asyncio.sleep(1.0)
        b = machine_busy_s()
        if a is None or b is None:
            return None
        share = (b - a) / ncpu
        if share < limit or asyncio.get_running_loop().time() >= end:
            return share
        if not told:
            log(f"machine busy ({share * 100:.0f}% of the CPUs used by other processes): waiting up to {max_wait_s:.0f}s")
            told = True

