"""
Request bodies of at most 1 MiB on the HTTP listener (PROTOCOL.md section 8).

Twisted reads a whole request body (into a temporary file past 100 kB)
before any resource sees the request, whatever its size.  L{BoundedRequest}
is the site's request class instead: it keeps at most L{MAX_BODY} bytes and
marks a request whose body is larger, and the API answers it 413.  No
endpoint of this listener takes a larger body (the health and metrics
resources take none), so the limit holds for every path.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.web.server import Request

from unrealon import jsonrpc

#: the largest body (PROTOCOL.md: a JSON object of at most 1 MiB)
MAX_BODY = 1024 * 1024
#: a body past this is not read to its end: the 413 goes out at once and the
#: connection is closed (up to it, the body is read and dropped, so that an
#: ordinary client that sends all of it before reading gets a clean 413)
DISCARD_LIMIT = 16 * MAX_BODY

#: the 413 reply's body (the API's error layout)
TOO_LARGE_BODY = jsonrpc.encode(
    {
        "error": {
            "code": "payload_too_large",
            "message": f"The body is larger than {MAX_BODY} bytes (1 MiB)",
        }
    }
)


class BoundedRequest(Request):
    """
    A request that keeps at most L{MAX_BODY} bytes of body.

    It checks the declared C{Content-Length} and counts what really arrives
    (chunked bodies have no length): past the limit it keeps nothing and sets
    L{too_large}.  A body so large that reading it to its end would be abuse
    (past L{DISCARD_LIMIT}), or announced with C{Expect: 100-continue} (the
    client waits to be told before sending it), is refused at once with a
    413 written here, and the connection closed.
    """

    too_large = False
    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self.too_large = True
            self.content = BytesIO()
            expect = self.requestHeaders.getRawHeaders(b"expect") or []
            if length > DISCARD_LIMIT or any(v.lower() == b"100-continue" for v in expect):
                # the channel would send "100 Continue" after this method
                self.requestHeaders.removeHeader(b"expect")
                self._refuse_now()
            return
        if length is None:
            self.content = BytesIO()  # chunked: bounded below
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.too_large:
            if self._received > DISCARD_LIMIT:
                self._refuse_now()
            return
        if self._received > MAX_BODY:
            self.too_large = True
            self.content = BytesIO()  # keep nothing of it
            return
        content: Any = self.content
        content.write(data)

    def _refuse_now(self) -> None:
        if self._refused:
            return
        self._refused = True
        transport: Any = self.channel.transport
        head = (
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(TOO_LARGE_BODY)
        )
        transport.write(head + TOO_LARGE_BODY)
        transport.loseConnection()

    def process(self) -> None:
        if self._refused:
            return  # answered already; the connection is closing
        super().process()
