"""Bare Autobahn/Twisted peer: the ceiling of the stack our server is built on.

Nothing but the benchmark's JSON-RPC subset (``minirpc``) on an Autobahn
``WebSocketServerProtocol``: no auth, no rate limit, no validation beyond
JSON-RPC shape. Broadcast frames the message once with ``prepareMessage`` and
writes the same bytes to every member with ``sendPreparedMessage``; that is
the cheapest fan-out the stack offers, so our server cannot beat this peer.

Fair settings (bench/README.md): compression off, auto-ping off, backlog
1024, listen on 127.0.0.1 only, logging at WARNING, stdlib json, NVX on
(Autobahn's default).

Usage: python bench/peers/autobahn_ceiling.py --port 9001
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minirpc import Hub  # noqa: E402


class PeerProtocol(WebSocketServerProtocol):
    """One client connection: dispatch each text message to the hub."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        reply = HUB.handle(self, payload)
        if reply is not None:
            self.sendMessage(reply.encode())

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        HUB.drop(self)


def _broadcast(members: set[Any], payload: str) -> None:
    prepared = FACTORY.prepareMessage(payload.encode())
    for proto in members:
        proto.sendPreparedMessage(prepared)


FACTORY = WebSocketServerFactory()
HUB = Hub(_broadcast)


def main() -> None:
    """Parse flags, listen, run the reactor until SIGTERM."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False)
    FACTORY.protocol = PeerProtocol
    # Defaults already mean: no permessage-deflate offer accepted, no auto-ping.
    FACTORY.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=10)
    reactor.listenTCP(args.port, FACTORY, backlog=1024, interface=args.host)
    reactor.run()


if __name__ == "__main__":
    main()
