"""
Redis Sentinel: connect to whichever server is the master now.

With C{REDIS_URL=redis+sentinel://host:port,.../<service>[/<db>]} every
connection of a node (commands, blocking readers, the room channels) is made
through a L{MasterEndpoint}: before each connection attempt it asks the
Sentinels for the master of the service (C{SENTINEL get-master-addr-by-name},
all of them at once, the first answer wins) and connects there.  After a
failover the old master's connections drop (it is dead, or Sentinel turns it
into a replica, which closes its clients), the connections reconnect through
the endpoint, and so reach the new master: the node's usual outage handling
(supervised loops, the room channels' repair from history) covers the
moment in between.

Why not txredisapi's own C{Sentinel.master_for}: it builds its own factory
and protocol, and the engine's connections need theirs (the lean encoder,
scripts loaded on connect, blocking readers, the RESP2 subscriber); an
endpoint is the one seam all of them share.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from unrealon.redisurl import RedisAddress

log = Logger(namespace="unrealon.engine.sentinel")

#: seconds to wait for the Sentinels' answer before the attempt fails (and is retried)
ASK_TIMEOUT = 2.0
CONNECT_TIMEOUT = 5.0


class Sentinels:
    """Connections to a service's Sentinels, asked where its master is."""

    def __init__(self, reactor: Any, address: RedisAddress) -> None:
        assert address.kind == "sentinel" and address.service is not None
        self._reactor = reactor
        self.service = address.service
        self._connections = [
            txredisapi.lazyConnection(host, port, reconnect=True, convertNumbers=False,
                                      connectTimeout=CONNECT_TIMEOUT)
            for host, port in address.sentinels
        ]
        #: the last master reported, for the log line of a change
        self.master: tuple[str, int] | None = None

    def ask(self) -> Deferred[tuple[str, int]]:
        """The master's (host, port), from the first Sentinel that knows it."""
        result: Deferred[tuple[str, int]] = Deferred()
        asked = []
        for connection in self._connections:
            d = connection.execute_command("SENTINEL", "get-master-addr-by-name", self.service)
            d.addTimeout(ASK_TIMEOUT, self._reactor)
            d.addCallback(self._answer, result)
            asked.append(d)

        def none_knew(_: Any) -> None:
            if not result.called:
                result.errback(ConnectError(
                    string=f"no Sentinel named a master for {self.service!r}"))

        DeferredList(asked, consumeErrors=True).addCallback(none_knew)
        return result

    def _answer(self, reply: Any, result: Deferred[tuple[str, int]]) -> None:
        if result.called or not reply:
            return
        master = (str(reply[0]), int(reply[1]))
        if master != self.master:
            log.info("Sentinel: the master of {service} is {host}:{port}",
                     service=self.service, host=master[0], port=master[1])
            self.master = master
        result.callback(master)

    def disconnect(self) -> Deferred[Any]:
        return DeferredList([c.disconnect() for c in self._connections], consumeErrors=True)


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Connects to the master the Sentinels name at the time of each attempt."""

    def __init__(self, reactor: Any, sentinels: Sentinels) -> None:
        self._reactor = reactor
        self._sentinels = sentinels

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        def there(master: tuple[str, int]) -> Deferred[Any]:
            endpoint = HostnameEndpoint(self._reactor, master[0], master[1],
                                        timeout=CONNECT_TIMEOUT)
            return endpoint.connect(protocolFactory)

        return self._sentinels.ask().addCallback(there)
