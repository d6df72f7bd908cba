"""
txredisapi: a leaner command path, a quicker reconnect, quiet retries.

  - Its protocol's C{_build_command} grows a bytearray a token at a time
    and formats every length through C{str().format()}: 8.5 us for the
    publish script's EVALSHA of eleven arguments, against 2.7 us in
    L{LeanEncodingProtocol}, and every ingress entry sends one.  Upstream:
    build the command with one C{b"".join}.
  - Its C{ConnectionHandler} runs an C{inlineCallbacks} pool lookup
    (C{_factory.getConnection}) and a random peek for every command, which
    costs more than the command; our handlers hold one connection, and
    L{DirectHandler} sends straight to it while it is up (reading the pool's
    C{_factory.connectionQueue}).  Upstream: a fast path for a pool of one.
  - Its factory's backoff (C{initialDelay}, C{maxDelay}: public attributes
    of C{RedisFactory}, reached through the handler's C{_factory}) is set per
    connection: PROTOCOL.md section 1 asks a node to serve within 3 s of
    Redis answering again, and the default backoff reaches 10 s.
  - A Redis restart flushes the script cache, and each caller's EVALSHA
    then fails with NOSCRIPT and is retried after a SCRIPT LOAD: calls made
    in one order on one connection would reach Redis in another (ingress
    entries taken back after a restart published out of order).
    L{lean_handler}'s C{preload} sends SCRIPT LOAD for every script first on
    each new connection, before the factory hands it to waiting commands
    (wrapping the factory's C{addConnection}).  Upstream: a hook run on each
    new connection before it joins the pool.
  - Its connection slots are Twisted C{ClientService}s, whose class logger
    (C{ClientService._log}) reports every reconnect attempt at info level:
    one line per second per connection while Redis is away, where the
    contract allows one every 30 s (the node's own L{RedisLink} lines).
    L{quiet_reconnect_retries} logs those attempts at debug level.
    Upstream: a log level (or a logger) parameter for ClientService.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.application import internet
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from unrealon._compat import require

log = Logger(namespace="unrealon._compat.redis")

_RETRY_FORMAT = "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds."


def check() -> None:
    require("txredisapi", txredisapi.RedisProtocol, ("_build_command", "_encode_value"))
    require("txredisapi", txredisapi.RedisFactory,
            ("initialDelay", "maxDelay", "retryDelay", "getConnection"))
    require("twisted", internet.ClientService, ("_log",))


class LeanEncodingProtocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol (hiredis replies) with a leaner command encoder.

    Its own C{_build_command} grows a bytearray a token at a time and formats
    every length through C{str().format()}: 8.5 us for the publish script's
    EVALSHA of eleven arguments, against 2.7 us here, and every ingress entry
    sends one.  The bytes are identical; anything but C{str}, C{bytes} and
    C{int} (and a C{str} that is not valid UTF-8, so the error stays
    txredisapi's C{InvalidData}) goes through txredisapi's own encoder.
    """

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            if type(arg) is str:
                try:
                    arg = arg.encode()
                except UnicodeEncodeError:
                    arg = self._encode_value(arg)
            elif type(arg) is int:
                arg = b"%d" % arg
            elif type(arg) is not bytes:
                arg = self._encode_value(arg)
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        return b"".join(out)


class DirectHandler(txredisapi.ConnectionHandler):
    """
    txredisapi's connection handler with a direct C{execute_command}.

    For every command the stock handler builds a closure, runs the pool's
    C{getConnection} (an inlineCallbacks generator) and peeks a random
    connection through a Deferred, which costs more than the command itself
    (a third of the Redis engine's CPU per WebSocket connection, whose
    presence join and leave are one script call each).  Our handlers hold
    one connection: while it is up, commands go straight to it; while it is
    down they take the stock path, which waits for the reconnection (and
    drops a dead connection from the pool) as before.  Every other method
    (C{get}, C{xadd}, ...) is txredisapi's own.
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        for connection in self._factory.connectionQueue.pending:
            if connection.connected:
                return connection.execute_command(*args, **kwargs)
        return self.__getattr__("execute_command")(*args, **kwargs)




def lean_handler(
    handler: Any,
    *,
    initial_delay: float,
    max_delay: float,
    preload: Sequence[str] = (),
) -> Any:
    """
    C{handler} (a just-made lazy txredisapi pool of one) with the lean
    encoder, the direct command path and the given reconnect backoff; the
    Lua sources in C{preload} are loaded on every new connection before any
    other command is sent on it.
    """
    factory = handler._factory
    require("txredisapi", factory, ("connectionQueue", "protocol", "addConnection"))
    if preload:
        add = factory.addConnection

        def load_then_add(connection: Any) -> None:
            if connection.connected:
                for source in preload:
                    d = connection.execute_command("SCRIPT", "LOAD", source)
                    d.addErrback(_preload_failed)
            add(connection)

        factory.addConnection = load_then_add
    factory.protocol = LeanEncodingProtocol  # before any connection is made
    factory.initialDelay = initial_delay
    factory.maxDelay = max_delay
    # The factory's "pool complete" Deferred is meant for non-lazy callers;
    # nobody waits on it here.  When AUTH or SELECT fails, txredisapi errbacks
    # it (and logs the message itself), which would otherwise end up as an
    # "Unhandled error in Deferred" when it is garbage collected.
    ready = getattr(factory, "deferred", None)
    if isinstance(ready, Deferred):
        ready.addErrback(lambda _: None)
    return DirectHandler(factory)


def _preload_failed(failure: Any) -> None:
    # a lost connection is retried with the next one; a broken script is a bug
    if not failure.check(txredisapi.ConnectionError, ConnectionError):
        log.failure("loading a Lua script on a new Redis connection failed", failure)


class _QuietRetries(Logger):
    """ClientService's logger, with reconnect attempts at debug level."""

    def info(self, format: str | None = None, **kwargs: Any) -> None:
        if format == _RETRY_FORMAT:
            self.debug(format, **kwargs)
        else:
            super().info(format, **kwargs)


def quiet_reconnect_retries() -> None:
    """Log ClientService's reconnect attempts at debug level (see the module's docstring)."""
    if not isinstance(internet.ClientService._log, _QuietRetries):
        internet.ClientService._log = _QuietRetries(namespace="twisted.application.internet.ClientService")


check()
quiet_reconnect_retries()
