"""
A private ``redis-server`` per test, for trial ``TestCase``\\ s.

Each server listens on a Unix socket only (``--port 0`` turns TCP off), so
parallel runs (``trial -j N``) never collide and the machine's shared Redis is
never touched.  Typical use::

    class MyTests(unittest.TestCase):
        @defer.inlineCallbacks
        def setUp(self):
            self.server = yield start_redis(self)
            self.redis = redisclient.connect(parse_redis_url(self.server.url))
            self.addCleanup(self.redis.disconnect)

Cleanups run last-in first-out, so the client registered after
:func:`start_redis` is disconnected before the server is stopped.

Persistence: by default the server keeps nothing on disk (``--save ""
--appendonly no``), so :meth:`RedisServer.restart` comes back *empty*, as a
Redis that lost its data would.  ``RedisServer(..., persistent=True)`` turns the
append-only file on with ``appendfsync always`` instead: a restart, or even a
:meth:`RedisServer.kill` followed by :meth:`RedisServer.start`, keeps every
write that was acknowledged.

The socket lives in its own short directory under the system temp dir, not in
the test's ``mktemp()`` directory: trial's paths easily pass the 107-byte limit
of a Unix socket path.  The data directory (the AOF) is the one given to the
constructor.  :meth:`RedisServer.close` stops the server and removes the socket
directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from typing import cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

READY_MARKER = b"ready to accept connections"
START_TIMEOUT = 10.0
_MAX_OUTPUT = 64 * 1024
# sun_path is 108 bytes on Linux (104 on the BSDs), terminating NUL included
_MAX_SOCKET_PATH = 100


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None when it is not installed."""
    return shutil.which("redis-server")


class RedisServerError(Exception):
    """redis-server did not start, or exited before it was ready."""


class _RedisProcessProtocol(ProcessProtocol):
    def __init__(self, marker: bytes = READY_MARKER) -> None:
        self.marker = marker
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = bytearray()
        self.has_ended = False

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.closeStdin()

    def _keep(self, data: bytes) -> None:
        self.output += data
        if len(self.output) > _MAX_OUTPUT:
            del self.output[: len(self.output) - _MAX_OUTPUT]

    def outReceived(self, data: bytes) -> None:
        self._keep(data)
        if not self.ready.called and self.marker in bytes(self.output).lower():
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self._keep(data)

    def processEnded(self, reason: Failure) -> None:
        self.has_ended = True
        if not self.ready.called:
            self.ready.errback(
                RedisServerError(
                    "redis-server exited before it was ready "
                    f"({reason.getErrorMessage()}); output:\n"
                    + bytes(self.output).decode("utf-8", "replace")
                )
            )
        self.ended.callback(None)


class RedisServer:
    """
    A private redis-server on a Unix socket (``--port 0 --unixsocket
    <sockdir>/redis.sock --unixsocketperm 700``), with its data directory in
    ``directory``.  See the module docstring for persistence.
    """

    #: what its output says once it serves (lower case)
    ready_marker = READY_MARKER

    def __init__(
        self,
        reactor: IReactorProcess,
        directory: str,
        *,
        persistent: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._reactor = reactor
        self.directory = os.path.abspath(directory)
        self.persistent = persistent
        # appended last, so they override the defaults (e.g. --requirepass,
        # --user, or --port N --bind 127.0.0.1 for a TCP listener)
        self.extra_args = list(extra_args)
        self._socket_dir = tempfile.mkdtemp(prefix="urw-redis-")
        self.socket_path = os.path.join(self._socket_dir, "redis.sock")
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            raise RedisServerError(
                f"socket path too long for a Unix socket: {self.socket_path!r} "
                "(set TMPDIR to a shorter directory)"
            )
        self.url = f"unix://{self.socket_path}?db=0"
        self._protocol: _RedisProcessProtocol | None = None
        self._transport: IProcessTransport | None = None

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.has_ended

    @property
    def output(self) -> str:
        """What the current (or last) process wrote to stdout/stderr, for diagnostics."""
        if self._protocol is None:
            return ""
        return bytes(self._protocol.output).decode("utf-8", "replace")

    def _argv(self, binary: str) -> list[str]:
        argv = [
            binary,
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", self.directory,
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return argv + self.extra_args

    def start(self) -> Deferred[None]:
        """Spawn redis-server and fire once it accepts connections (10 s deadline)."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self.running:
            raise RedisServerError("redis-server is already running")
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerError("redis-server is not installed")
        os.makedirs(self.directory, exist_ok=True)
        os.makedirs(self._socket_dir, mode=0o700, exist_ok=True)
        protocol = _RedisProcessProtocol(self.ready_marker)
        self._protocol = protocol
        self._transport = self._reactor.spawnProcess(
            protocol,
            binary,
            self._argv(binary),
            env=dict(os.environ),
            path=self.directory,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        ready = protocol.ready
        ready.addTimeout(START_TIMEOUT, cast(IReactorTime, self._reactor))
        try:
            await ready
        except defer.TimeoutError:
            await self._signal_and_wait("KILL")
            raise RedisServerError(
                f"redis-server was not ready within {START_TIMEOUT} s; output:\n" + self.output
            ) from None

    async def _signal_and_wait(self, sig: str) -> None:
        protocol, transport = self._protocol, self._transport
        if protocol is None or transport is None or protocol.has_ended:
            return
        try:
            transport.signalProcess(sig)
        except ProcessExitedAlready:
            pass
        await protocol.ended

    def stop(self) -> Deferred[None]:
        """SIGTERM (a clean shutdown) and wait until the process has ended; no-op if not running."""
        return Deferred.fromCoroutine(self._signal_and_wait("TERM"))

    def kill(self) -> Deferred[None]:
        """SIGKILL ("Redis went away") and wait until the process has ended."""
        return Deferred.fromCoroutine(self._signal_and_wait("KILL"))

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        self._signal_now(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal_now(signal.SIGCONT)

    def _signal_now(self, sig: int) -> None:
        if self._transport is None or not self.running:
            raise RedisServerError("redis-server is not running")
        pid = self._transport.pid
        assert pid is not None
        os.kill(pid, sig)

    def restart(self) -> Deferred[None]:
        """
        Stop then start again on the same socket path.  Data survives only
        with ``persistent=True``; otherwise the server comes back empty.
        """
        return Deferred.fromCoroutine(self._restart())

    async def _restart(self) -> None:
        await self._signal_and_wait("TERM")
        await self._start()

    def close(self) -> Deferred[None]:
        """Stop the server and remove the socket directory (the data directory is left to trial)."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._protocol is not None and not self._protocol.has_ended:
            # a paused (SIGSTOP) server would never act on SIGTERM
            try:
                self._signal_now(signal.SIGCONT)
            except (RedisServerError, OSError):
                pass
        await self._signal_and_wait("TERM")
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def start_redis(
    testcase: unittest.TestCase,
    persistent: bool = False,
    extra_args: Sequence[str] = (),
) -> Deferred[RedisServer]:
    """
    Start a private redis-server for ``testcase``; stopped (and its socket
    directory removed) by a cleanup.  Skips the test when redis-server is not
    installed.
    """
    if redis_server_binary() is None:
        raise unittest.SkipTest("redis-server is not installed")
    from twisted.internet import reactor

    server = RedisServer(
        cast(IReactorProcess, reactor),
        testcase.mktemp(),
        persistent=persistent,
        extra_args=extra_args,
    )
    testcase.addCleanup(server.close)

    async def go() -> RedisServer:
        await server.start()
        return server

    return Deferred.fromCoroutine(go())
