"""
Real node processes: C{twist unrealon-ws} and C{twistd -n --pidfile= unrealon-ws}.

One helper for every test that runs a node in a process of its own:

  - L{NodeProcess}: a node the test starts, talks to, stops, kills, pauses
    and starts again.  It listens on C{tcp:0} and reads the ports it got
    from its own log line, so no two tests can race for a port.  It runs in
    an empty working directory (no stray C{.env}) with a minimal environment
    (L{base_env}), the repository on C{PYTHONPATH} (test extensions load),
    the test JWT secret, and whatever settings the test adds.
  - L{spawn}: the low level, for tests of startup itself (bad settings,
    runners, exit codes): a runner with arguments, its output collected.
  - L{free_port}: the one port helper, for what must know its port before
    it starts (C{make dev}, a port to find in use).

Every child is killed and reaped in the test's cleanup whatever the test did,
so the reactor is left clean.  Waiting is L{tests.helpers.waiting}'s.

Typical use::

    node = yield NodeProcess(self, server.url, "n1").start()
    client = yield node.connect(mint_token("alice"))
    yield node.kill()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from tests.helpers.node import SECRET, WSClient, connect
from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)
TWIST = os.path.join(BIN, "twist")
TWISTD = os.path.join(BIN, "twistd")

#: the two ways PROTOCOL.md section 7 says a node is started
RUNNERS: dict[str, list[str]] = {
    "twist": [TWIST, "unrealon-ws"],
    "twistd": [TWISTD, "-n", "--pidfile=", "unrealon-ws"],
}
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
#: output kept per stream (the tail): a chatty node must not fill the test's memory
_MAX_OUTPUT = 256 * 1024
#: the line a node logs once both listeners are open (unrealon.service)
_SERVING = "serving WebSocket on"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no UNREALON_*/JWT_*/REDIS_URL from the caller's."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    for name in ("LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


class ChildProcess(ProcessProtocol):
    """Collects a child's stdout and stderr and fires L{ended} with its exit status."""

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        #: fires with (exit code or None, signal or None)
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self.status: tuple[int | None, int | None] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.stdout = (self.stdout + data)[-_MAX_OUTPUT:]

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-_MAX_OUTPUT:]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.status = (0, None)
        elif isinstance(value, ProcessTerminated):
            self.status = (value.exitCode, value.signal)
        else:  # pragma: no cover
            self.status = (None, None)
        self.ended.callback(self.status)

    @property
    def running(self) -> bool:
        return self.status is None

    def signal(self, name: str) -> Deferred[tuple[int | None, int | None]]:
        """Send SIGname if it still runs; fires with the exit status once reaped."""
        if self.running and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass
        return self.wait_ended()

    def wait_ended(self, timeout: float | None = None) -> Deferred[tuple[int | None, int | None]]:
        """The exit status once it has ended (a C{TimeoutError} after C{timeout} s)."""
        if self.status is not None:
            return succeed(self.status)
        d: Deferred[tuple[int | None, int | None]] = Deferred()
        self.ended.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
        if timeout is not None:
            d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
        return d

    def exited(self) -> str | None:
        """None while it runs; once it has ended, its status and output (for L{wait_until}'s stop_if)."""
        if self.running:
            return None
        return f"the process exited {self.status}:\n{self.output()}"

    def output(self) -> str:
        return (
            f"--- stdout ---\n{self.stdout.decode(errors='replace')[-4000:]}\n"
            f"--- stderr ---\n{self.stderr.decode(errors='replace')[-4000:]}"
        )


def spawn(
    testcase: TestCase,
    runner: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> ChildProcess:
    """Start C{runner} ("twist" or "twistd") with C{args}; killed in cleanup if still running."""
    argv = [*RUNNERS[runner], *args]
    if cwd is None:
        cwd = os.path.abspath(testcase.mktemp())
        os.makedirs(cwd)
    child = ChildProcess()
    reactor.spawnProcess(  # type: ignore[attr-defined]
        child, argv[0], argv, env=dict(env if env is not None else base_env()), path=cwd
    )
    testcase.addCleanup(_kill, child)
    return child


def _kill(child: ChildProcess, pid: int | None = None) -> Deferred[Any]:
    if pid is not None and child.running:
        try:
            os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGKILL only once continued
        except OSError:
            pass
    return child.signal("KILL")


def http_get(port: int, path: str, timeout: float = 2.0) -> Deferred[tuple[int, bytes]]:
    """(status, body) of GET http://127.0.0.1:port/path."""

    async def get() -> tuple[int, bytes]:
        agent = Agent(reactor)  # type: ignore[arg-type]
        d = agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
        response = await d
        body = await readBody(response)
        return int(response.code), bytes(body)

    return Deferred.fromCoroutine(get())


class NodeProcess:
    """One node in a process of its own, started (and started again) by the test."""

    def __init__(
        self,
        testcase: TestCase,
        redis_url: str,
        node_id: str,
        env: Mapping[str, str] | None = None,
        *,
        runner: str = "twist",
        args: Sequence[str] = (),
    ) -> None:
        self.testcase = testcase
        self.node_id = node_id
        self.runner = runner
        self.args = tuple(args)
        #: the ports of the current (or last) run, read from its log
        self.ws_port = 0
        self.http_port = 0
        self.env = base_env(
            REDIS_URL=redis_url,
            JWT_SECRET=SECRET,
            UNREALON_NODE_ID=node_id,
            UNREALON_LOG_FORMAT="json",
        )
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self.env.update(env or {})
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self._child: ChildProcess | None = None
        self._pid: int | None = None

    # -- state --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    @property
    def status(self) -> tuple[int | None, int | None] | None:
        return None if self._child is None else self._child.status

    @property
    def pid(self) -> int | None:
        return self._pid

    def output(self) -> str:
        """What the current (or last) run wrote, stdout then stderr."""
        if self._child is None:
            return ""
        return (self._child.stdout + self._child.stderr).decode("utf-8", "replace")

    def log_lines(self, contains: str = "") -> list[dict[str, Any]]:
        """The node's JSON log events whose line contains C{contains}."""
        events = []
        for line in self.output().splitlines():
            if contains not in line:
                continue
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def rss_kib(self) -> int:
        """Resident set size of the process (Linux), in KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    # -- lifecycle ------------------------------------------------------------------

    def start(self, until: str = "/health") -> Deferred[NodeProcess]:
        """
        Spawn the node; fires once C{until} answers 200 (fails with its
        output): C{/health} for a node that is serving, C{/live} for one that
        only has to be up (its Redis may be away).
        """
        return Deferred.fromCoroutine(self._start(until))

    async def _start(self, until: str) -> NodeProcess:
        if self.running:
            raise AssertionError(f"{self.node_id} is already running")
        args = ["--ws", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1",
                *self.args]
        self._child = child = spawn(self.testcase, self.runner, args, self.env, self.directory)
        self._pid = child.transport.pid if child.transport is not None else None
        self.testcase.addCleanup(_kill, child, self._pid)

        def ended() -> str | None:
            if child.running:
                return None
            return f"node {self.node_id} exited {child.status}:\n{self.output()[-4000:]}"

        try:
            serving = await wait_until(lambda: self.log_lines(_SERVING), timeout=START_TIMEOUT,
                                       what=f"node {self.node_id} to listen", stop_if=ended)
            self.ws_port = _port(serving[0]["ws"])
            self.http_port = _port(serving[0]["http"])
            await wait_until(lambda: self.http_get(until, timeout=1.0).addCallback(
                lambda r: r[0] == 200), timeout=START_TIMEOUT,
                what=f"node {self.node_id}: {until} 200", stop_if=ended)
        except AssertionError as e:
            await self.kill()
            raise AssertionError(f"{e}\n{self.output()[-4000:]}") from None
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> Deferred[tuple[int | None, int | None]]:
        """SIGTERM (graceful shutdown); fires with (exit code, signal) once reaped."""
        return Deferred.fromCoroutine(self._stop(timeout))

    async def _stop(self, timeout: float) -> tuple[int | None, int | None]:
        if self._child is None:
            raise AssertionError(f"{self.node_id} was never started")
        self._child.signal("TERM")
        try:
            return await self._child.wait_ended(timeout)
        except Exception:
            await self.kill()
            raise AssertionError(
                f"node {self.node_id} did not stop within {timeout} s:\n" + self.output()[-4000:]
            ) from None

    def kill(self) -> Deferred[Any]:
        """SIGKILL (a crash); fires once the process is reaped."""
        if self._child is None:
            return succeed(None)
        return _kill(self._child, self._pid)

    def wait_ended(self, timeout: float | None = None) -> Deferred[tuple[int | None, int | None]]:
        """The exit status of the current run, once it has ended on its own."""
        assert self._child is not None
        return self._child.wait_ended(timeout)

    def pause(self) -> None:
        """SIGSTOP: the process stops answering (and heartbeating) but keeps its sockets."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)

    # -- talking to it ------------------------------------------------------------------

    def connect(self, token: str) -> Deferred[WSClient]:
        """A real WebSocket client connected to this node (authenticated by C{token})."""
        url = f"ws://127.0.0.1:{self.ws_port}/ws?token={quote(token)}"
        return connect(url, port=self.ws_port)

    def http_get(self, path: str, timeout: float = 5.0) -> Deferred[tuple[int, bytes]]:
        return http_get(self.http_port, path, timeout)

    def health(self) -> Deferred[dict[str, Any]]:
        return self.http_get("/health").addCallback(lambda r: json.loads(r[1]))


def _port(address: str) -> int:
    """The port of a node's logged listening address ("127.0.0.1:43215")."""
    return int(address.rsplit(":", 1)[1])
