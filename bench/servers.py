"""Servers under test: how to start, probe, measure and stop each one.

Each :class:`ServerSpec` is the per-server adapter. It says how to launch the
server (pinned to CPU 0 with ``taskset``), which wire dialect it speaks, the
URL (with our JWT in ``?token=``), whether it needs a private Redis, how a
scenario publishes to a room (``publish``), what it feeds the ingress stream
(``ingress``), and which scenarios it cannot do and why.

Never the machine's shared Redis on port 6379: every server that needs Redis
gets a fresh private ``redis-server`` (unix socket plus a random loopback TCP
port, no persistence) pinned to CPU 1 with the clients.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MAIN_PY = REPO / ".venv" / "bin" / "python"
PEERS_PY = BENCH / ".venv-peers" / "bin" / "python"
TWIST = REPO / ".venv" / "bin" / "twist"
SERVER_CPU = "0"
CLIENT_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
JWT_SECRET = "bench-secret-not-for-production-0123456789"
# The memory engine has no backend ingress; the lead exposes a publish call
# for it. Override the method name without editing this file.
MEMORY_PUBLISH_METHOD = os.environ.get("BENCH_UNREALON_PUBLISH_METHOD", "bench.publish")


class ServerUnavailable(RuntimeError):
    """The server could not be started or did not become ready."""


@dataclass
class Ports:
    """Addresses handed to a server and its clients for one start."""

    ws: int
    http: int
    redis_unix: str | None = None  # unix:///.../r.sock?db=0
    redis_tcp: str | None = None  # redis://127.0.0.1:P/0


@dataclass(frozen=True)
class ServerSpec:
    """Per-server adapter (see module docstring and bench/README.md)."""

    name: str
    title: str
    dialect: str  # "jsonrpc" | "django-ipc" (bench/dialects.py)
    argv: Callable[[Ports], list[str]]
    env: Callable[[Ports], dict[str, str]] = lambda p: {}
    needs_redis: bool = False
    # How scenarios publish to rooms: {"kind": "rpc", "method": ...} over a
    # client connection, or {"kind": "redis_xadd", "format": ...} to the ingress.
    publish: dict[str, Any] = field(default_factory=lambda: {"kind": "rpc"})
    # Payload format for the XADD -> client scenario; None = no Redis ingress.
    ingress: str | None = None
    supports_since: bool = False
    only: frozenset[str] | None = None  # scenarios it runs; None = all
    only_reason: str = ""
    health_path: str | None = None  # HTTP readiness on ports.http
    requires: Callable[[], str | None] = lambda: None  # reason it cannot run at all
    builtin: bool = False  # ours: a failure in smoke means the harness is broken
    stop_timeout_s: float = 10.0  # SIGTERM grace before SIGKILL

    def url(self, ports: Ports, token: str) -> str:
        return f"ws://127.0.0.1:{ports.ws}/ws?token={token}"

    def publish_adapter(self, ports: Ports) -> dict[str, Any]:
        a = dict(self.publish)
        if a["kind"] == "redis_xadd":
            a["redis_url"] = ports.redis_unix
        return a

    def ingress_adapter(self, ports: Ports) -> dict[str, Any] | None:
        if self.ingress is None:
            return None
        return {"kind": "redis_xadd", "format": self.ingress,
                "redis_url": ports.redis_unix, "stream": "stream:requests"}

    def na_reason(self, scenario: str) -> str | None:
        """Why this server cannot run ``scenario`` (None: it can)."""
        if self.only is not None and scenario not in self.only:
            return self.only_reason
        if scenario == "xadd_latency" and self.ingress is None:
            return "no Redis Streams ingress"
        if scenario == "reconnect_storm" and not self.supports_since:
            return "no rooms.join since (no history/cursors)"
        return None


def _exists(path: Path, hint: str) -> Callable[[], str | None]:
    return lambda: None if path.exists() else f"{path} missing ({hint})"


def _peer(script: str) -> list[str]:
    return [str(MAIN_PY), str(BENCH / "peers" / script)]


def _unrealon_env(redis: bool) -> Callable[[Ports], dict[str, str]]:
    def env(p: Ports) -> dict[str, str]:
        e = {"JWT_SECRET": JWT_SECRET,
             # The benchmark measures throughput, not the limiters: the default
             # 50 calls/s would cap a closed-loop connection, and every bench
             # connection is one user (so no presence storm), over the default
             # 100 connections per user.
             "UNREALON_RATE_LIMIT": "1000000",
             "UNREALON_MAX_CONNECTIONS_PER_USER": "1000000",
             # Same as the other servers: WARNING logs, no ping inside a run
             # (django-ipc's longest interval is 300 s; the peers never ping).
             "UNREALON_LOG_LEVEL": "warn",
             "UNREALON_PING_INTERVAL": "300"}
        if redis:
            e["REDIS_URL"] = p.redis_unix or ""
        else:
            # bench.publish for clients: the memory engine has no ingress.
            e["UNREALON_EXTENSIONS"] = "unrealon_bench_ext:register"
            e["PYTHONPATH"] = os.pathsep.join(
                x for x in (str(BENCH), os.environ.get("PYTHONPATH", "")) if x)
        return e
    return env


def _unrealon_argv(p: Ports) -> list[str]:
    return [str(TWIST), "unrealon-ws",
            "--ws", f"tcp:{p.ws}:interface=127.0.0.1:backlog=1024",
            "--http", f"tcp:{p.http}:interface=127.0.0.1"]


SERVERS: dict[str, ServerSpec] = {s.name: s for s in (
    ServerSpec(
        name="autobahn-ceiling", title="Autobahn/Twisted bare (ceiling)", dialect="jsonrpc",
        argv=lambda p: [*_peer("autobahn_ceiling.py"), "--port", str(p.ws)],
        supports_since=True, builtin=True),
    ServerSpec(
        name="websockets-uvloop", title="websockets 17 + uvloop", dialect="jsonrpc",
        argv=lambda p: [*_peer("websockets_uvloop.py"), "--port", str(p.ws)],
        supports_since=True, builtin=True),
    ServerSpec(
        name="websockets-uvloop-redis", title="websockets + uvloop, Redis ingress",
        dialect="jsonrpc",
        argv=lambda p: [*_peer("websockets_uvloop.py"), "--port", str(p.ws), "--redis-url", p.redis_unix or ""],
        needs_redis=True, publish={"kind": "redis_xadd", "format": "unrealon-native"},
        ingress="unrealon", supports_since=True, builtin=True,
        only=frozenset({"fanout", "xadd_latency", "ai_stream", "reconnect_storm"}),
        only_reason="same server as websockets-uvloop (Redis only changes publishing)"),
    ServerSpec(
        name="django-ipc", title="django-ipc 1.0.9 (fair defaults)", dialect="django-ipc",
        argv=lambda p: [str(PEERS_PY), str(BENCH / "peers" / "django_ipc_server.py"),
                        "--port", str(p.ws), "--redis-url", p.redis_tcp or ""],
        needs_redis=True, publish={"kind": "rpc", "method": "broadcast"}, ingress="django-ipc",
        requires=_exists(PEERS_PY, "run: bash bench/setup_peers.sh"),
        # Its SIGTERM handler sets an asyncio.Event from a plain signal
        # handler, which does not wake the loop: it never exits by itself.
        stop_timeout_s=1.0),
    ServerSpec(
        name="unrealon-memory", title="unrealon-ws, memory engine", dialect="jsonrpc",
        argv=_unrealon_argv, env=_unrealon_env(False),
        publish={"kind": "rpc", "method": MEMORY_PUBLISH_METHOD},
        supports_since=True, health_path="/health",
        requires=_exists(TWIST, "main venv")),
    ServerSpec(
        name="unrealon-redis", title="unrealon-ws, Redis engine", dialect="jsonrpc",
        argv=_unrealon_argv, env=_unrealon_env(True), needs_redis=True,
        publish={"kind": "redis_xadd", "format": "unrealon-native"}, ingress="unrealon",
        supports_since=True, health_path="/health",
        requires=_exists(TWIST, "main venv")),
    # The same node, the AI chunks XADDed as ordinary events (the backend
    # ``publish`` method): what streamed messages (PROTOCOL.md 5.1) cost over
    # the plain event path, in the same run.
    ServerSpec(
        name="unrealon-redis-events", title="unrealon-ws, Redis engine, AI chunks as events",
        dialect="jsonrpc", argv=_unrealon_argv, env=_unrealon_env(True), needs_redis=True,
        publish={"kind": "redis_xadd", "format": "unrealon"}, ingress="unrealon",
        supports_since=True, health_path="/health", requires=_exists(TWIST, "main venv"),
        only=frozenset({"ai_stream"}),
        only_reason="same server as unrealon-redis (only the AI chunks' path differs)"),
)}


def make_token(secret: str = JWT_SECRET, ttl_s: int = 6 * 3600) -> str:
    """Connection JWT for our server (HS256, sub, exp, rooms ["*"]); peers ignore it."""
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": "bench", "iat": now, "exp": now + ttl_s, "rooms": ["*"]},
                      secret, algorithm="HS256")


def free_port() -> int:
    """A loopback port that was free a moment ago (ephemeral range: never 6379)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, from /proc/<pid>/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def machine_busy_s() -> float | None:
    """CPU seconds all cores spent in processes since boot, plus steal (/proc/stat).

    irq and softirq time are left out: loopback packet processing for our own
    traffic lands there, charged to no process, and would look foreign.
    """
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is inside user)
        return (v[0] + v[1] + v[2] + v[7]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def tcp_mem_pages() -> int | None:
    """Kernel TCP buffer memory in pages (/proc/net/sockstat ``TCP: ... mem N``)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    parts = line.split()
                    return int(parts[parts.index("mem") + 1])
    except (OSError, ValueError):
        pass
    return None


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM our own child, then SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, n: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


class PrivateRedis:
    """A throw-away redis-server: unix socket + random loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ubr-", dir="/tmp"))
        self.sock = str(self.dir / "r.sock")
        self.port = free_port()
        assert self.port != 6379
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["taskset", "-c", CLIENT_CPU, "redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--unixsocket", self.sock, "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--loglevel", "warning",
                "--maxclients", "1000"]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        import redis

        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                redis.Redis(unix_socket_path=self.sock, socket_timeout=1).ping()
                return
            except Exception:  # not up yet
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise ServerUnavailable(f"private redis-server did not start: {_tail(self.log)}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)


class RunningServer:
    """One started server (plus its private Redis), with CPU/RSS probes."""

    def __init__(self, spec: ServerSpec, logdir: Path, token: str) -> None:
        self.spec = spec
        self.logdir = logdir
        self.token = token
        self.ports = Ports(ws=free_port(), http=free_port())
        self.redis: PrivateRedis | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = logdir / (f"server-{spec.name}.log")

    @property
    def url(self) -> str:
        return self.spec.url(self.ports, self.token)

    async def start(self, timeout: float = 30.0) -> None:
        """Start (Redis first if needed) and wait until a ping round-trips."""
        reason = self.spec.requires()
        if reason:
            raise ServerUnavailable(reason)
        if self.spec.needs_redis:
            self.redis = PrivateRedis(self.logdir)
            self.redis.start()
            self.ports.redis_unix = f"unix://{self.redis.sock}?db=0"
            self.ports.redis_tcp = f"redis://127.0.0.1:{self.redis.port}/0"
        env = dict(os.environ)
        env.update(self.spec.env(self.ports))
        env["PYTHONUNBUFFERED"] = "1"
        argv = ["taskset", "-c", SERVER_CPU, *self.spec.argv(self.ports)]
        try:
            self.proc = subprocess.Popen(argv, env=env, cwd=str(REPO), stdin=subprocess.DEVNULL,
                                         stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        except OSError as exc:
            raise ServerUnavailable(f"cannot exec {argv[3]}: {exc}") from exc
        await self._wait_ready(timeout)

    async def _wait_ready(self, timeout: float) -> None:
        from dialects import DIALECTS
        from wsclient import connect

        d = DIALECTS[self.spec.dialect]
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"exited with {self.proc.returncode}: {_tail(self.log)}")
            try:
                if self.spec.health_path:
                    await asyncio.to_thread(self._health)
                c = await connect(self.url, d, timeout=2.0)
                reply = await c.call(d.ping(1), 2.0)
                c.close()
                if not d.is_error(reply):
                    return
                last = f"ping refused: {reply[:120]!r}"
            except Exception as exc:  # not ready yet: retry until the deadline
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.05)
        raise ServerUnavailable(f"not ready after {timeout:.0f}s ({last}): {_tail(self.log)}")

    def _health(self) -> None:
        url = f"http://127.0.0.1:{self.ports.http}{self.spec.health_path}"
        with urllib.request.urlopen(url, timeout=1.0) as r:
            if r.status != 200:
                raise RuntimeError(f"health {r.status}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def snapshot(self) -> dict[str, float | None]:
        """Server and Redis CPU seconds, server RSS, kernel TCP memory: now."""
        pid = self.proc.pid if self.proc else -1
        rpid = self.redis.pid if self.redis else None
        return {"t": time.monotonic(), "cpu_s": cpu_seconds(pid), "rss_kib": rss_kib(pid),
                "redis_cpu_s": cpu_seconds(rpid) if rpid else None, "tcp_mem_pages": tcp_mem_pages()}

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc, self.spec.stop_timeout_s)
        if self.redis is not None:
            self.redis.stop()
