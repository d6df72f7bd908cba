"""
Acknowledging a consumer group's entries in batches: the XACKs of the
entries a consumer finishes in one reactor turn go to Redis as one command.

The ingress finishes entries in bursts (a batch is read, its entries are
handled concurrently, their scripts answer together). One XACK per entry
costs a command to build, a reply to parse and a Deferred each: with a
streamed AI answer's chunks that was about a tenth of an entry's CPU on the
node. Waiting for the end of the turn delays no acknowledgement by more
than that turn.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from unrealon.engine.redisclient import StreamClient


class StreamAcks:
    """XACK for one stream and group, one command per reactor turn."""

    def __init__(
        self, reactor: IReactorTime, streams: StreamClient, stream: str, group: str
    ) -> None:
        self._reactor = reactor
        self._streams = streams
        self._stream = stream
        self._group = group
        #: entry ids of this turn, and who waits for their acknowledgement
        self._ids: list[str] = []
        self._waiting: list[Deferred[None]] = []

    def ack(self, entry_id: str) -> Deferred[None]:
        """
        Acknowledge C{entry_id} with the others of this turn; fires once
        Redis has, or fails as the XACK failed (the entry stays pending).
        """
        if not self._ids:
            self._reactor.callLater(0, self._flush)
        self._ids.append(entry_id)
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        return done

    def _flush(self) -> None:
        ids, waiting = self._ids, self._waiting
        self._ids, self._waiting = [], []
        d = self._streams.xack(self._stream, self._group, *ids)

        def acked(_: object) -> None:
            for done in waiting:
                done.callback(None)

        def failed(failure: Failure) -> None:
            for done in waiting:
                done.errback(failure)

        d.addCallbacks(acked, failed)
