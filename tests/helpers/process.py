"""
Real node processes: C{twist unrealon-ws} and C{twistd -n --pidfile= unrealon-ws}.

L{spawn} starts one through C{reactor.spawnProcess} in an empty working
directory (so no stray C{.env} is read) with a minimal environment, and
collects its output and exit status; the test's cleanup kills it if it is
still running and waits for it to be reaped, so the reactor stays clean.
L{free_port} picks a port the node can listen on (the node's own C{tcp:0}
would not tell us which one it got).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

BIN = os.path.dirname(sys.executable)
TWIST = os.path.join(BIN, "twist")
TWISTD = os.path.join(BIN, "twistd")

#: the two ways PROTOCOL.md section 7 says a node is started
RUNNERS: dict[str, list[str]] = {
    "twist": [TWIST, "unrealon-ws"],
    "twistd": [TWISTD, "-n", "--pidfile=", "unrealon-ws"],
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no UNREALON_*/JWT_*/REDIS_URL from the caller's."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    for name in ("LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


class NodeProcess(ProcessProtocol):
    """Collects a child's stdout/stderr and fires L{ended} with its exit status."""

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
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

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

    def signal(self, name: str) -> None:
        assert self.transport is not None
        self.transport.signalProcess(name)

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
) -> NodeProcess:
    """Start C{runner} ("twist" or "twistd") with C{args}; killed in cleanup if still running."""
    argv = [*RUNNERS[runner], *args]
    if cwd is None:
        cwd = testcase.mktemp()
        os.makedirs(cwd)
    proto = NodeProcess()
    reactor.spawnProcess(  # type: ignore[attr-defined]
        proto, argv[0], argv, env=dict(env if env is not None else base_env()), path=cwd
    )

    def kill() -> Deferred[Any]:
        if not proto.running:
            return succeed(None)
        proto.signal("KILL")
        return proto.ended

    testcase.addCleanup(kill)
    return proto


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


@inlineCallbacks
def http_get(port: int, path: str, timeout: float = 2.0) -> Any:
    """(status, body) of GET http://127.0.0.1:port/path."""
    agent = Agent(reactor)  # type: ignore[arg-type]
    d = agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
    response = yield d
    body = yield readBody(response)
    return response.code, body


@inlineCallbacks
def wait_for(
    check: Callable[[], Deferred[Any]],
    proc: NodeProcess | None = None,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> Any:
    """
    Poll C{check} (a Deferred-returning call) until it succeeds; fail after
    C{timeout} s, or at once if C{proc} ended meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = yield check()
            return result
        except Exception as e:
            if proc is not None and not proc.running:
                raise AssertionError(f"process ended {proc.status}:\n{proc.output()}") from e
            if time.monotonic() > deadline:
                extra = f"\n{proc.output()}" if proc is not None else ""
                raise AssertionError(f"not reached in {timeout} s: {e!r}{extra}") from e
        yield sleep(interval)


def wait_ended(proc: NodeProcess, timeout: float) -> Deferred[tuple[int | None, int | None]]:
    """The exit status, or a TimeoutError after C{timeout} s."""
    if not proc.running:
        assert proc.status is not None
        return succeed(proc.status)
    d: Deferred[tuple[int | None, int | None]] = Deferred()
    proc.ended.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
    d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
    return d
