"""
A cluster of real node processes on one private redis-server.

L{NodeProcess} runs C{twist unrealon-ws} as a child of the test's reactor,
on ports picked free a moment before (bind port 0, close), in an empty
working directory (no stray C{.env}) with a minimal environment: the test's
C{REDIS_URL}, the test JWT secret, its own C{UNREALON_NODE_ID} and whatever
settings the test adds.  L{NodeProcess.start} fires once C{/health} answers
200; L{NodeProcess.stop} sends SIGTERM, L{NodeProcess.kill} SIGKILL, and both
wait for the process to be reaped.  A cleanup kills what is still running,
so the reactor is left clean whatever the test did.

L{start_cluster} starts several nodes at once (in parallel: a node takes
about a second to import and start).  L{Tap} records what a real client
receives (events with the replays of its joins in place, presence);
L{FakeSink} records what an engine hands to its node; L{wait_until} polls.

Typical use::

    server = yield start_redis(self)
    n1, n2 = yield start_cluster(self, server.url, 2, UNREALON_PRESENCE_TTL="3")
    client = yield n1.connect(mint_token("alice"))
    yield n2.kill()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from zope.interface import implementer

from tests.helpers.node import SECRET, WSClient, connect
from unrealon.engine.interfaces import EphemeralEvent, IDeliverySink, RoomEvent

#: the event name the cluster tests publish
EVENT = "test.event"
TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
_MAX_OUTPUT = 256 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def _base_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    for name in ("LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class _Protocol(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()
        #: (exit code, signal) once ended
        self.status: tuple[int | None, int | None] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def _keep(self, data: bytes) -> None:
        self.output += data
        if len(self.output) > _MAX_OUTPUT:
            del self.output[: len(self.output) - _MAX_OUTPUT]

    outReceived = errReceived = _keep

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.status = (0, None)
        elif isinstance(value, ProcessTerminated):
            self.status = (value.exitCode, value.signal)
        else:  # pragma: no cover
            self.status = (None, None)
        self.ended.callback(None)


class NodeProcess:
    """One C{twist unrealon-ws} child process."""

    def __init__(
        self,
        testcase: TestCase,
        redis_url: str,
        node_id: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.testcase = testcase
        self.node_id = node_id
        self.ws_port = free_port()
        self.http_port = free_port()
        self.env = _base_env()
        self.env.update(
            REDIS_URL=redis_url,
            JWT_SECRET=SECRET,
            UNREALON_NODE_ID=node_id,
        )
        self.env.update(env or {})
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self._protocol: _Protocol | None = None
        self._transport: Any = None
        testcase.addCleanup(self._cleanup)

    # -- state ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._protocol is not None and self._protocol.status is None

    @property
    def status(self) -> tuple[int | None, int | None] | None:
        return None if self._protocol is None else self._protocol.status

    @property
    def pid(self) -> int | None:
        return None if self._transport is None else self._transport.pid

    @property
    def output(self) -> str:
        if self._protocol is None:
            return ""
        return bytes(self._protocol.output).decode("utf-8", "replace")

    def log_lines(self, contains: str = "") -> list[dict[str, Any]]:
        """The node's JSON log events whose text contains C{contains}."""
        events = []
        for line in self.output.splitlines():
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

    # -- lifecycle ----------------------------------------------------------------

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
        argv = [
            TWIST, "unrealon-ws",
            "--ws", f"tcp:{self.ws_port}:interface=127.0.0.1",
            "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
        ]  # fmt: skip
        self._protocol = protocol = _Protocol()
        self._transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            protocol, argv[0], argv, env=self.env, path=self.directory
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if protocol.status is not None:
                raise AssertionError(
                    f"node {self.node_id} exited {protocol.status} before it was ready:\n"
                    + self.output[-4000:]
                )
            try:
                code, _ = await self.http_get(until, timeout=1.0)
                if code == 200:
                    return self
            except Exception:
                pass
            if time.monotonic() > deadline:
                await self.kill()
                raise AssertionError(
                    f"node {self.node_id} not healthy within {START_TIMEOUT} s:\n"
                    + self.output[-4000:]
                )
            await sleep(0.05)

    def _signal(self, name: str) -> Deferred[None]:
        protocol = self._protocol
        if protocol is None or protocol.status is not None:
            return succeed(None)
        try:
            self._transport.signalProcess(name)
        except ProcessExitedAlready:
            pass
        return protocol.ended

    def stop(self, timeout: float = STOP_TIMEOUT) -> Deferred[tuple[int | None, int | None]]:
        """SIGTERM (graceful shutdown); fires with (exit code, signal) once reaped."""
        return Deferred.fromCoroutine(self._stop(timeout))

    async def _stop(self, timeout: float) -> tuple[int | None, int | None]:
        d = self._signal("TERM")
        d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
        try:
            await d
        except Exception:
            await self.kill()
            raise AssertionError(
                f"node {self.node_id} did not stop within {timeout} s:\n" + self.output[-4000:]
            ) from None
        assert self.status is not None
        return self.status

    def kill(self) -> Deferred[None]:
        """SIGKILL (a crash); fires once the process is reaped."""
        return self._signal("KILL")

    def pause(self) -> None:
        """SIGSTOP: the process stops answering (and heartbeating) but keeps its sockets."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)

    def _cleanup(self) -> Deferred[None]:
        if self.running:
            try:
                self.resume()  # a stopped process would not act on SIGKILL until continued
            except OSError:
                pass
        return self.kill()

    # -- talking to it --------------------------------------------------------------

    def connect(self, token: str) -> Deferred[WSClient]:
        """A real WebSocket client connected to this node (authenticated by C{token})."""
        from urllib.parse import quote

        url = f"ws://127.0.0.1:{self.ws_port}/ws?token={quote(token)}"
        return connect(url, port=self.ws_port)

    def http_get(self, path: str, timeout: float = 5.0) -> Deferred[tuple[int, bytes]]:
        async def get() -> tuple[int, bytes]:
            agent = Agent(reactor)  # type: ignore[arg-type]
            d = agent.request(b"GET", f"http://127.0.0.1:{self.http_port}{path}".encode())
            d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
            response = await d
            body = await readBody(response)
            return int(response.code), bytes(body)

        return Deferred.fromCoroutine(get())

    def health(self) -> Deferred[dict[str, Any]]:
        return self.http_get("/health").addCallback(lambda r: json.loads(r[1]))


def start_cluster(
    testcase: TestCase, redis_url: str, count: int, **env: str
) -> Deferred[list[NodeProcess]]:
    """Start C{count} nodes (n1, n2, ...) on one Redis, in parallel."""
    nodes = [NodeProcess(testcase, redis_url, f"n{i + 1}", env) for i in range(count)]
    d = gatherResults([n.start() for n in nodes], consumeErrors=True)
    return d.addCallback(lambda _: nodes)


@implementer(IDeliverySink)
class FakeSink:
    """Records what an engine hands to its node."""

    def __init__(self) -> None:
        self.events: list[RoomEvent] = []
        self.ephemeral: list[EphemeralEvent] = []
        self.disconnects: list[tuple[str, str]] = []
        self.resyncs: list[Sequence[str] | None] = []

    def deliver(self, event: RoomEvent) -> None:
        self.events.append(event)

    def deliver_ephemeral(self, event: EphemeralEvent) -> None:
        self.ephemeral.append(event)

    def disconnect_user(self, user_id: str, reason: str) -> None:
        self.disconnects.append((user_id, reason))

    def resync(self, rooms: Sequence[str] | None) -> None:
        self.resyncs.append(rooms)

    def notifications(self, room: str | None = None) -> list[Any]:
        return [json.loads(e.message) for e in self.events if room is None or e.room == room]

    def presence(self) -> list[tuple[str, str, str, str | None]]:
        """(method, room, user_id, excluded user) of each presence notification."""
        out = []
        for e in self.ephemeral:
            message = json.loads(e.message)
            params = message["params"]
            out.append((message["method"], params["room"], params["user_id"], e.exclude_user))
        return out


def wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> Deferred[None]:
    """Poll C{predicate} on the real reactor until it holds (fail after C{timeout} s)."""

    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await deferLater(reactor, 0.01, lambda: None)

    return Deferred.fromCoroutine(poll())


class Tap:
    """
    One client's view of its rooms: every C{test.event} in arrival order
    (the replayed ones of a join's C{missed} in their place, just before the
    live ones that follow the reply) and every presence notification.
    """

    def __init__(self, client: WSClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.presence: list[dict[str, Any]] = []
        self.joins: list[dict[str, Any]] = []
        self._join_ids: set[int] = set()
        original = client._received

        def received(payload: bytes, is_binary: bool) -> None:
            message = json.loads(payload)
            if isinstance(message, dict):
                method = message.get("method")
                if method == EVENT:
                    self.events.append(message["params"])
                    return
                if isinstance(method, str) and method.startswith("presence."):
                    self.presence.append({"method": method, **message["params"]})
                    return
                if message.get("id") in self._join_ids and "result" in message:
                    # record the replay before anything that follows the reply
                    self.joins.append(message["result"])
                    self.events.extend(m["params"] for m in message["result"]["missed"])
            original(payload, is_binary)

        client._received = received  # type: ignore[method-assign]

    @inlineCallbacks
    def join(self, room: str, since: str | None = None) -> Any:
        params: dict[str, Any] = {"room": room}
        if since is not None:
            params["since"] = since
        self._join_ids.add(self.client._next_id + 1)
        result = yield self.client.call("rooms.join", params)
        return result

    def seqs(self, room: str | None = None) -> list[int]:
        return [e["data"]["seq"] for e in self.events if room is None or e["room"] == room]

    def cursor(self, room: str) -> str | None:
        for event in reversed(self.events):
            if event["room"] == room:
                return str(event["cursor"])
        return None
