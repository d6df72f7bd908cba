"""
L{unrealon._compat}: one test per private access, against the installed
Twisted, Autobahn and pyjwt, so a release that changes one of them fails
here first (the import-time checks fail the server's start).
"""

from __future__ import annotations

import socket
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from unrealon._compat import (
    IncompatibleDependency,
    directframes,
    endpoints,
    reactorlog,
    redis,
    require,
    runner,
    tokens,
    websocket,
)
from unrealon._compat import transport as _compat


class _Accepted(Protocol):
    def __init__(self, ready: Deferred[Protocol]) -> None:
        self.ready = ready

    def connectionMade(self) -> None:
        self.ready.callback(self)


class TransportTests(TestCase):
    """The send-buffer accesses, on a real TCP connection."""

    @inlineCallbacks
    def setUp(self) -> Any:
        accepted: Deferred[Protocol] = Deferred()
        factory = Factory.forProtocol(lambda: _Accepted(accepted))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(self.peer.close)
        self.peer.setblocking(False)
        server = yield accepted
        self.transport = server.transport
        self.addCleanup(self.transport.loseConnection)

    def received(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def test_unsent_counts_buffered_bytes(self) -> None:
        """What transport.write buffers until the reactor's next turn is unsent."""
        self.transport.write(b"x" * 1000)
        self.transport.write(b"y" * 10)
        self.assertEqual(_compat.unsent(self.transport), 1010)
        self.assertEqual(self.received(), b"")

    def test_write_through_hands_bytes_to_the_kernel_at_once(self) -> None:
        """With nothing buffered, the bytes reach the peer without a reactor turn."""
        _compat.write_through(self.transport, b"hello")
        self.assertEqual(_compat.unsent(self.transport), 0)
        self.assertEqual(self.received(), b"hello")

    def test_write_through_never_overtakes_buffered_bytes(self) -> None:
        self.transport.write(b"first ")
        _compat.write_through(self.transport, b"second")
        self.assertEqual(self.received(), b"")
        self.assertEqual(_compat.unsent(self.transport), 12)
        _compat.try_send(self.transport)
        self.assertEqual(self.received(), b"first second")

    def test_try_send_leaves_what_the_kernel_refuses(self) -> None:
        """Past the kernel's buffers, try_send leaves the rest buffered (and unsent says so)."""
        self.transport.write(b"z" * (16 << 20))
        _compat.try_send(self.transport)
        left = _compat.unsent(self.transport)
        self.assertGreater(left, 0)
        self.assertLess(left, 16 << 20)

    def test_unsent_of_other_transports(self) -> None:
        self.assertEqual(_compat.unsent(object()), 0)


class CheckTests(SynchronousTestCase):
    def test_installed_versions_pass(self) -> None:
        for module in (_compat, websocket, directframes, tokens, redis, runner, endpoints):
            module.check()

    def test_a_missing_internal_names_package_and_version(self) -> None:
        class Stand:
            pass

        with self.assertRaises(IncompatibleDependency) as caught:
            require("twisted", Stand, ("_tempDataLen",))
        message = str(caught.exception)
        self.assertIn("_tempDataLen", message)
        self.assertIn("twisted", message)
        from importlib.metadata import version

        self.assertIn(version("twisted"), message)

    def test_registered_close_codes_are_accepted(self) -> None:
        for code in websocket.REGISTERED_CLOSE_CODES:
            self.assertIn(code, WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED)
        for code in (1004, 1005, 1006, 1015):
            self.assertNotIn(code, WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED)


class WebSocketTests(SynchronousTestCase):
    """The Autobahn protocol adjustments (the session tests cover them in use)."""

    def test_log_highlights_are_plain(self) -> None:
        from autobahn.util import hl, hltype

        self.assertEqual(hl("text"), "text")
        self.assertNotIn("\x1b", hltype(WebSocketProtocol))

    def test_lazy_options_dump_restores_pformat(self) -> None:
        import pprint

        from autobahn.websocket import protocol

        with websocket.lazy_options_dump():
            lazy = protocol.pformat({"a": 1})  # type: ignore[attr-defined]
            self.assertEqual(f"{lazy}", pprint.pformat({"a": 1}))
        self.assertIs(protocol.pformat, pprint.pformat)  # type: ignore[attr-defined]

    def test_outgoing_size_unlimited_restores_the_limit(self) -> None:
        class Proto:
            maxMessagePayloadSize = 100

        proto = Proto()
        with websocket.outgoing_size_unlimited(proto):
            self.assertEqual(proto.maxMessagePayloadSize, 0)
        self.assertEqual(proto.maxMessagePayloadSize, 100)

    def test_cancel_close_handshake_timer(self) -> None:
        cancelled = []

        class Timer:
            def cancel(self) -> None:
                cancelled.append(True)

        class Proto:
            closeHandshakeTimeoutCall: Any = Timer()

        proto = Proto()
        websocket.cancel_close_handshake_timer(proto)
        websocket.cancel_close_handshake_timer(proto)
        self.assertEqual(cancelled, [True])
        self.assertIsNone(proto.closeHandshakeTimeoutCall)


class TokenTests(SynchronousTestCase):
    def test_the_vetted_decoder_verifies_hs256(self) -> None:
        import jwt

        secret = "s" * 40
        token = jwt.encode({"sub": "a"}, secret, algorithm="HS256")
        decoder = tokens.vetted_hmac_decoder()
        self.assertEqual(decoder.decode(token, secret, algorithms=["HS256"]), {"sub": "a"})
        self.assertRaises(jwt.InvalidSignatureError, decoder.decode, token, "t" * 40,
                          algorithms=["HS256"])


class RunnerTests(SynchronousTestCase):
    def test_forget_exit_signal(self) -> None:
        import signal

        class Reactor:
            _exitSignal: Any = signal.SIGTERM

        reactor_ = Reactor()
        runner.forget_exit_signal(reactor_, signal.SIGINT)
        self.assertEqual(reactor_._exitSignal, signal.SIGTERM)
        runner.forget_exit_signal(reactor_, signal.SIGTERM)
        self.assertIsNone(reactor_._exitSignal)


class EndpointTests(SynchronousTestCase):
    def test_parse_server(self) -> None:
        kind, args, kwargs = endpoints.parse_server("tcp:8765:interface=127.0.0.1")
        self.assertEqual((kind, args[0], kwargs["interface"]), ("TCP", 8765, "127.0.0.1"))
        _, _, kwargs = endpoints.parse_server("systemd:domain=INET:index=0")
        self.assertEqual(kwargs, {"domain": "INET", "index": "0"})


class RedisCompatTests(SynchronousTestCase):
    def test_reconnect_retries_are_logged_at_debug(self) -> None:
        from twisted.application import internet
        from twisted.logger import LogLevel, globalLogPublisher

        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        internet.ClientService._log.info(  # type: ignore[attr-defined]
            "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
            attempt=1, endpoint="e", delay=0.2,
        )
        internet.ClientService._log.info("Something else {x}", x=1)  # type: ignore[attr-defined]
        levels = [e["log_level"] for e in events]
        self.assertEqual(levels, [LogLevel.debug, LogLevel.info])


class BoundsTests(SynchronousTestCase):
    """The packages this layer reaches into have upper bounds, and the installed ones are inside."""

    def test_upper_bounds(self) -> None:
        import configparser
        import re
        from importlib.metadata import version
        from pathlib import Path

        setup = configparser.ConfigParser()
        setup.read(Path(__file__).resolve().parent.parent / "setup.cfg")
        requires = setup["options"]["install_requires"].split()
        for package in ("twisted", "autobahn", "txredisapi", "pyjwt"):
            [spec] = [r for r in requires if re.match(rf"{package}(\[|>)", r)]
            upper = re.search(r"<([\d.]+)", spec)
            self.assertIsNotNone(upper, spec)
            assert upper is not None
            installed = tuple(int(p) for p in version(package).split(".")[:2])
            bound = tuple(int(p) for p in upper.group(1).split("."))
            self.assertLess(installed[: len(bound)], bound, (package, version(package)))


class IdleConnectionMemoryTests(TestCase):
    """
    What an opened connection no longer keeps (L{websocket.release_handshake},
    L{websocket.lazy_send_queue}), on a real node with a real client: the
    handshake leftovers are empty, and a write Autobahn queues still arrives.
    """

    @inlineCallbacks
    def _session(self) -> Any:
        from tests.helpers.node import mint_token, start_node

        running = yield start_node(self)
        client = yield running.connect(mint_token("alice"))
        self.addCleanup(client.drop)
        session = next(iter(running.service.factory.connections))
        return client, session

    @inlineCallbacks
    def test_handshake_leftovers_are_released(self) -> None:
        client, session = yield self._session()
        for name in websocket.HANDSHAKE_LEFTOVERS:
            self.assertIn(name, vars(session), f"Autobahn no longer sets {name}")
            self.assertEqual(len(getattr(session, name)), 0, name)
        self.assertEqual(session.send_queue, ())
        reply = yield client.call("system.ping")
        self.assertTrue(reply["pong"])

    @inlineCallbacks
    def test_sync_and_chopped_writes_get_a_queue(self) -> None:
        from unrealon.frames import text_frame

        client, session = yield self._session()
        session.sendData(text_frame(b'{"n":1}'), sync=True)
        session.sendData(text_frame(b'{"n":2}'), chopsize=3)
        first = yield client.next()
        second = yield client.next()
        self.assertEqual((first, second), ({"n": 1}, {"n": 2}))
        self.assertNotEqual(type(session.send_queue), tuple)


class ReactorLogTests(SynchronousTestCase):
    """The epoll reactor's events without the legacy log context."""

    def test_install_replaces_only_call_with_logger(self) -> None:
        from twisted.internet import epollreactor
        from twisted.python import log as legacy_log

        self.addCleanup(reactorlog.install)  # as every node in this process has it
        reactorlog.uninstall()
        self.assertIs(epollreactor.log, legacy_log)
        reactorlog.install()
        self.assertIs(epollreactor.log.callWithLogger, reactorlog.call_without_context)
        self.assertIs(epollreactor.log.err, legacy_log.err)

    def test_result_passed_and_errors_logged_with_the_prefix(self) -> None:
        from twisted.logger import globalLogPublisher

        class Selectable:
            def logPrefix(self) -> str:
                return "RPCSession,7,127.0.0.1"

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(reactorlog.call_without_context(Selectable(), lambda x: x * 2, 21), 42)

        def broken() -> None:
            raise ZeroDivisionError("in a handler")

        self.assertIsNone(reactorlog.call_without_context(Selectable(), broken))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        logged = [e for e in events if e.get("isError")]
        self.assertEqual([e["log_system"] for e in logged], ["RPCSession,7,127.0.0.1"])
