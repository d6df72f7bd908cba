"""
Real node processes (PROTOCOL.md section 7): the twistd plugin, settings
from CLI, environment and C{.env}, refusal of bad settings, start failures,
and graceful shutdown on SIGTERM.

Each test runs C{twist unrealon-ws} and/or C{twistd -n --pidfile=
unrealon-ws} as a child process in an empty directory with a minimal
environment (L{tests.helpers.process}); WebSocket clients and HTTP probes
run in the test's reactor.  Waiting for a process to come up is bounded
polling of its health endpoint; everything else awaits an event.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.helpers.node import SECRET, connect, mint_token
from tests.helpers.process import (
    RUNNERS,
    TWIST,
    TWISTD,
    base_env,
    free_port,
    http_get,
    spawn,
)
from tests.helpers.waiting import wait_until


def listen_args(ws_port: int, http_port: int) -> list[str]:
    return [
        "--ws", f"tcp:{ws_port}:interface=127.0.0.1",
        "--http", f"tcp:{http_port}:interface=127.0.0.1",
    ]


class StubbornClient(Protocol):
    """
    A WebSocket client that completes the opening handshake and then never
    answers anything, not even a close frame: it keeps a drain waiting.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.data = b""
        self.upgraded: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            (
                "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {self.token}\r\n\r\n"
            ).encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.upgraded.called:
            self.upgraded.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def close_code(self) -> int | None:
        """The code of the close frame received after the handshake, if any."""
        frames = self.data.split(b"\r\n\r\n", 1)[1]
        while len(frames) >= 2:
            opcode, length = frames[0] & 0x0F, frames[1] & 0x7F
            if opcode == 0x8 and length >= 2:
                return int.from_bytes(frames[2:4], "big")
            frames = frames[2 + length:]
        return None


class PluginTests(TestCase):
    """The twistd plugin is discoverable by both runners."""

    @inlineCallbacks
    def test_twist_lists_plugin(self) -> Any:
        """C{twist --help} lists unrealon-ws among the plugins."""
        out, err, code = yield getProcessOutputAndValue(TWIST, ["--help"], env=base_env())
        self.assertEqual(code, 0, err)
        self.assertIn(b"unrealon-ws", out)

    @inlineCallbacks
    def test_plugin_help(self) -> Any:
        """
        C{twistd unrealon-ws --help} and C{twist unrealon-ws --help} work and
        show every option with its environment variable.
        """
        for executable, args in ((TWISTD, ["unrealon-ws", "--help"]), (TWIST, ["unrealon-ws", "--help"])):
            out, err, code = yield getProcessOutputAndValue(executable, args, env=base_env())
            self.assertEqual(code, 0, (executable, err))
            text = out.decode()
            for option, env in (
                ("--ws", "UNREALON_WS"),
                ("--http", "UNREALON_HTTP"),
                ("--redis-url", "REDIS_URL"),
                ("--jwt-secret", "JWT_SECRET"),
                ("--rate-limit", "UNREALON_RATE_LIMIT"),
                ("--allowed-origins", "UNREALON_ALLOWED_ORIGINS"),
                ("--shutdown-timeout", "UNREALON_SHUTDOWN_TIMEOUT"),
                ("--insecure-dev", "UNREALON_INSECURE_DEV"),
            ):
                self.assertIn(option, text)
                self.assertIn(env, text)


#: (environment, CLI args, .env text, env var and option the line must name, secret)
BAD_SETTINGS: list[tuple[dict[str, str], list[str], str, str, str, str | None]] = [
    ({"UNREALON_RATE_LIMIT": "0"}, [], "", "UNREALON_RATE_LIMIT", "--rate-limit", None),
    ({}, ["--ws", "foo:1"], "", "UNREALON_WS", "--ws", None),
    ({}, ["--http", "tcp:notaport"], "", "UNREALON_HTTP", "--http", None),
    ({"JWT_ALGORITHMS": "none"}, [], "", "JWT_ALGORITHMS", "--jwt-algorithms", None),
    ({}, ["--jwt-algorithms", "HS999"], "", "JWT_ALGORITHMS", "--jwt-algorithms", None),
    (
        {"JWT_PUBLIC_KEY_FILE": "/nonexistent/key.pem", "JWT_ALGORITHMS": "RS256"},
        [], "", "JWT_PUBLIC_KEY_FILE", "--jwt-public-key-file", None,
    ),
    (
        {"REDIS_URL": "redis://:hunter2-secret@localhost:notaport/0"},
        [], "", "REDIS_URL", "--redis-url", "hunter2-secret",
    ),
    ({}, ["--allowed-origins", "https://app.example.com/path"], "",
     "UNREALON_ALLOWED_ORIGINS", "--allowed-origins", None),
    ({}, [], "UNREALON_SHUTDOWN_TIMEOUT=-1\n", "UNREALON_SHUTDOWN_TIMEOUT", "--shutdown-timeout", None),
    ({}, ["--max-message-size", "1.5"], "", "UNREALON_MAX_MESSAGE_SIZE", "--max-message-size", None),
]


class BadSettingTests(TestCase):
    """A bad setting stops startup: non-zero exit, one line naming env var and option."""

    def run_node(self, runner: str, env: dict[str, str], args: list[str], dotenv: str) -> Deferred[Any]:
        cwd = self.mktemp()
        os.makedirs(cwd)
        if dotenv:
            with open(os.path.join(cwd, ".env"), "w") as f:
                f.write(dotenv)
        proc = spawn(
            self,
            runner,
            [*listen_args(free_port(), free_port()), *args],  # the case's options win
            env=base_env(JWT_SECRET=SECRET, **env),
            cwd=cwd,
        )
        return proc.wait_ended(30).addCallback(lambda status: (proc, status))

    @inlineCallbacks
    def test_bad_settings(self) -> Any:
        """
        Under twist and twistd alike, each kind of bad setting (a non-positive
        number, an unparseable endpoint, an unknown or "none" algorithm, an
        unreadable key file, a bad Redis URL, a bad origin, a bad value in
        .env, a non-integer size) exits non-zero with exactly one line on
        stderr naming the environment variable and the CLI option, without
        echoing a secret, and without starting to listen.
        """
        cases = [(runner, case) for runner in RUNNERS for case in BAD_SETTINGS]
        results = yield DeferredList(
            [self.run_node(runner, env, args, dotenv) for runner, (env, args, dotenv, *_) in cases],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        for (runner, (_, _, _, env_name, option, secret)), (_, (proc, status)) in zip(
            cases, results, strict=True
        ):
            where = f"{runner} {env_name}:\n{proc.output()}"
            code, _signal = status
            self.assertIsNotNone(code, where)
            self.assertNotEqual(code, 0, where)
            lines = proc.stderr.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, where)
            self.assertIn(env_name, lines[0], where)
            self.assertIn(option, lines[0], where)
            if secret is not None:
                self.assertNotIn(secret, proc.stderr.decode() + proc.stdout.decode(), where)

    @inlineCallbacks
    def test_no_key_refused(self) -> Any:
        """
        Without JWT_SECRET or JWT_PUBLIC_KEY_FILE both runners refuse to start,
        in one line naming JWT_SECRET and --jwt-secret.
        """
        for runner in RUNNERS:
            proc = spawn(self, runner, listen_args(free_port(), free_port()), env=base_env())
            code, _ = yield proc.wait_ended(30)
            self.assertNotEqual(code, 0, proc.output())
            lines = proc.stderr.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, proc.output())
            self.assertIn("JWT_SECRET", lines[0])
            self.assertIn("--jwt-secret", lines[0])
            self.assertIn("UNREALON_INSECURE_DEV", lines[0])

    @inlineCallbacks
    def test_insecure_dev_starts_without_key(self) -> Any:
        """With UNREALON_INSECURE_DEV=1 and no key the node starts (and stops with 0)."""
        ws, http = free_port(), free_port()
        proc = spawn(self, "twist", listen_args(ws, http), env=base_env(UNREALON_INSECURE_DEV="1"))
        code, _ = yield wait_until(lambda: http_get(http, "/health"), stop_if=proc.exited, timeout=15)
        self.assertEqual(code, 200)
        proc.signal("TERM")
        status = yield proc.wait_ended(15)
        self.assertEqual(status, (0, None), proc.output())

    @inlineCallbacks
    def test_start_failure_exits_non_zero(self) -> Any:
        """
        A listener that cannot be opened (the WebSocket port is taken) stops
        the process with a non-zero status and one line naming the setting
        and the address (no traceback), under both runners, instead of
        leaving it running half-started.
        """
        from twisted.internet.protocol import Factory

        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        for runner in RUNNERS:
            proc = spawn(self, runner, listen_args(port, free_port()), env=base_env(JWT_SECRET=SECRET))
            code, _ = yield proc.wait_ended(30)
            self.assertNotEqual(code, 0, proc.output())
            self.assertIsNotNone(code, proc.output())
            err = proc.stderr.decode().strip().splitlines()
            self.assertEqual(len(err), 1, proc.output())
            self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1", err[0])
            self.assertIn("UNREALON_WS / --ws", err[0])
            self.assertIn("address already in use", err[0])
            self.assertNotIn("Traceback", proc.output())


class SettingsPrecedenceTests(TestCase):
    """CLI > environment > .env > default, in a real process."""

    @inlineCallbacks
    def test_precedence(self) -> Any:
        """
        One process, four sources: the node id is given everywhere and the
        CLI's wins; the WebSocket listener is given in the environment and
        .env and the environment's wins; the health listener and the JWT
        secret are only in .env and are used; the auth timeout is given
        nowhere and is the default (a connection is still open after 1 s).
        """
        ws_env, ws_dotenv, http = free_port(), free_port(), free_port()
        secret = "dotenv-secret-0123456789abcdef0123456789abcdef"
        cwd = self.mktemp()
        os.makedirs(cwd)
        with open(os.path.join(cwd, ".env"), "w") as f:
            f.write(
                "# settings for the test\n"
                "UNREALON_NODE_ID=from-dotenv\n"
                f"export UNREALON_WS='tcp:{ws_dotenv}:interface=127.0.0.1'\n"
                f'UNREALON_HTTP="tcp:{http}:interface=127.0.0.1"\n'
                f"JWT_SECRET={secret}\n"
            )
        env = base_env(UNREALON_NODE_ID="from-env", UNREALON_WS=f"tcp:{ws_env}:interface=127.0.0.1")
        proc = spawn(self, "twist", ["--node-id", "from-cli"], env=env, cwd=cwd)
        code, body = yield wait_until(lambda: http_get(http, "/health"), stop_if=proc.exited, timeout=15)
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["node_id"], "from-cli")
        client = yield connect(
            f"ws://127.0.0.1:{ws_env}/ws", port=ws_env
        )
        result = yield client.call("auth.authenticate", {"token": mint_token("alice", secret=secret)})
        self.assertEqual(result["user_id"], "alice")
        info = yield client.call("system.info")
        self.assertEqual(info["node_id"], "from-cli")
        yield client.close()
        proc.signal("TERM")
        status = yield proc.wait_ended(15)
        self.assertEqual(status, (0, None), proc.output())


class ShutdownTests(TestCase):
    """SIGTERM: report "stopping", close every connection with 1001, exit 0 in time."""

    SHUTDOWN_TIMEOUT = 3.0

    @inlineCallbacks
    def start(self, runner: str) -> Any:
        ws, http = free_port(), free_port()
        env = base_env(JWT_SECRET=SECRET, UNREALON_SHUTDOWN_TIMEOUT=str(self.SHUTDOWN_TIMEOUT))
        proc = spawn(self, runner, listen_args(ws, http), env=env)
        code, _ = yield wait_until(lambda: http_get(http, "/health"), stop_if=proc.exited, timeout=15)
        self.assertEqual(code, 200)
        return proc, ws, http

    @inlineCallbacks
    def test_drain_with_stubborn_client(self) -> Any:
        """
        Under twist: a connected client receives close code 1001 on SIGTERM;
        while a second client that never answers the close keeps the drain
        going, /health says "stopping" with 503 and /live still answers 200;
        that client is cut off, and the process exits 0 within
        UNREALON_SHUTDOWN_TIMEOUT.
        """
        proc, ws, http = yield self.start("twist")
        client = yield connect(f"ws://127.0.0.1:{ws}/ws?token={mint_token('alice')}", port=ws)
        self.assertIs((yield client.call("system.ping"))["pong"], True)
        stubborn = StubbornClient(mint_token("bob"))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ws), stubborn)
        yield stubborn.upgraded
        self.assertIn(b" 101 ", stubborn.data.split(b"\r\n", 1)[0])
        code, body = yield http_get(http, "/health")
        self.assertEqual(json.loads(body)["connections"], 2)

        started = time.monotonic()
        proc.signal("TERM")
        close_code, _ = yield client.closed
        self.assertEqual(close_code, 1001)

        def stopping() -> Deferred[Any]:
            def check(result: tuple[int, bytes]) -> tuple[int, bytes]:
                if result[0] != 503:
                    raise AssertionError(f"health still {result}")
                return result

            return http_get(http, "/health").addCallback(check)

        code, body = yield wait_until(stopping, stop_if=proc.exited, timeout=self.SHUTDOWN_TIMEOUT)
        self.assertEqual(json.loads(body)["status"], "stopping")
        code, _ = yield http_get(http, "/live")
        self.assertEqual(code, 200)

        yield stubborn.lost
        self.assertEqual(stubborn.close_code(), 1001)
        status = yield proc.wait_ended(self.SHUTDOWN_TIMEOUT + 5)
        elapsed = time.monotonic() - started
        self.assertEqual(status, (0, None), proc.output())
        # the drain may take all of it; allow for the interpreter's own exit
        self.assertLess(elapsed, self.SHUTDOWN_TIMEOUT + 1.0, proc.output())

    @inlineCallbacks
    def test_sigterm_under_twistd(self) -> Any:
        """Under twistd -n: a connected client gets 1001 and the process exits 0 at once."""
        proc, ws, _ = yield self.start("twistd")
        client = yield connect(f"ws://127.0.0.1:{ws}/ws?token={mint_token('alice')}", port=ws)
        yield client.call("rooms.list")
        started = time.monotonic()
        proc.signal("TERM")
        close_code, _ = yield client.closed
        self.assertEqual(close_code, 1001)
        status = yield proc.wait_ended(self.SHUTDOWN_TIMEOUT + 5)
        self.assertEqual(status, (0, None), proc.output())
        self.assertLess(time.monotonic() - started, self.SHUTDOWN_TIMEOUT, proc.output())

    @inlineCallbacks
    def test_sigterm_while_starting(self) -> Any:
        """
        A node whose Redis does not answer serves anyway (PROTOCOL.md section
        1: /live 200, /health 503 "degraded") and stops on SIGTERM with
        status 0 within UNREALON_SHUTDOWN_TIMEOUT instead of waiting for a
        start that may never come.
        """
        ws, http = free_port(), free_port()
        env = base_env(
            JWT_SECRET=SECRET,
            UNREALON_SHUTDOWN_TIMEOUT=str(self.SHUTDOWN_TIMEOUT),
            REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        )
        proc = spawn(self, "twist", listen_args(ws, http), env=env)

        yield wait_until(lambda: b"Starting reactor" in proc.stdout, stop_if=proc.exited,
                         timeout=15, what="the reactor to start")
        status_code, body = yield wait_until(lambda: http_get(http, "/health"), stop_if=proc.exited, timeout=15)
        self.assertEqual((status_code, json.loads(body)["status"]), (503, "degraded"))
        live, _ = yield http_get(http, "/live")
        self.assertEqual(live, 200)
        started = time.monotonic()
        proc.signal("TERM")
        status = yield proc.wait_ended(self.SHUTDOWN_TIMEOUT + 5)
        self.assertEqual(status, (0, None), proc.output())
        self.assertLess(time.monotonic() - started, self.SHUTDOWN_TIMEOUT, proc.output())

    @inlineCallbacks
    def test_refuses_new_connections_while_stopping(self) -> Any:
        """Once SIGTERM arrived, the WebSocket listener no longer accepts new connections."""
        proc, ws, _ = yield self.start("twist")
        stubborn = StubbornClient(mint_token("bob"))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ws), stubborn)
        yield stubborn.upgraded
        proc.signal("TERM")
        yield wait_until(lambda: self.refused(ws).addCallback(lambda _: True), stop_if=proc.exited,
                         timeout=self.SHUTDOWN_TIMEOUT, what="the listener closed")
        yield stubborn.lost
        status = yield proc.wait_ended(self.SHUTDOWN_TIMEOUT + 5)
        self.assertEqual(status, (0, None), proc.output())

    def refused(self, port: int) -> Deferred[None]:
        """Succeeds when a WebSocket handshake on C{port} fails."""
        d = connect(f"ws://127.0.0.1:{port}/ws", port=port)

        def opened(client: Any) -> Deferred[Any]:
            return client.close().addCallback(lambda _: self.fail_open())

        d.addCallbacks(opened, lambda failure: None)
        return d

    @staticmethod
    def fail_open() -> None:
        raise AssertionError("a connection was accepted while stopping")



class LogFormatTests(TestCase):
    """UNREALON_LOG_FORMAT: each event once, as text or as JSON lines, with either runner."""

    timeout = 60

    @inlineCallbacks
    def check(self, runner: str, fmt: str) -> Any:
        ws, http = free_port(), free_port()
        env = base_env(JWT_SECRET=SECRET, UNREALON_LOG_FORMAT=fmt)
        proc = spawn(self, runner, listen_args(ws, http), env=env)
        yield wait_until(lambda: http_get(http, "/live"), stop_if=proc.exited, timeout=15)
        proc.signal("TERM")
        status = yield proc.wait_ended(15)
        self.assertEqual(status, (0, None), proc.output())
        lines = [line for line in proc.stdout.decode().splitlines() if line.strip()]
        serving = [line for line in lines if "serving WebSocket" in line]
        self.assertEqual(len(serving), 1, proc.output())  # once, not twice
        if fmt == "json":
            events = [json.loads(line) for line in lines]  # every line is a JSON object
            self.assertTrue(all(isinstance(e, dict) for e in events))
            self.assertNotIn("\x1e", proc.stdout.decode())
        else:
            self.assertFalse(any(line.startswith("{") for line in lines), proc.output())

    def test_twist_text(self) -> Any:
        return self.check("twist", "text")

    def test_twist_json(self) -> Any:
        return self.check("twist", "json")

    def test_twistd_text(self) -> Any:
        return self.check("twistd", "text")

    def test_twistd_json(self) -> Any:
        return self.check("twistd", "json")
