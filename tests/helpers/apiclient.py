"""
A real HTTP client for the HTTP server API tests (Twisted's Agent).

L{api_request} sends any method, path, headers and body (with a
Content-Length, or chunked when C{chunked=True}) and returns an
L{ApiReply}: the status, the headers (lower-cased names), the body bytes and
the body as JSON when it is JSON.  L{post} is the usual call: a JSON body
and an API key.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

#: a key the API tests configure (at least 16 characters)
API_KEY = "test-api-key-0123456789abcdef"
#: a second key: rotation (both configured at once)
API_KEY_2 = "second-api-key-fedcba9876543210"


@attrs.frozen
class ApiReply:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class _ChunkedProducer(FileBodyProducer):
    """A body of unknown length: Agent sends it chunked."""

    def __init__(self, body: bytes) -> None:
        super().__init__(BytesIO(body), readSize=64 * 1024)
        self.length = UNKNOWN_LENGTH


@inlineCallbacks
def api_request(
    port: int,
    method: bytes,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
    timeout: float = 10.0,
) -> Any:
    """One request to http://127.0.0.1:port/path; fires with an L{ApiReply}."""
    agent = Agent(reactor)  # type: ignore[arg-type]
    producer = None
    if body is not None:
        producer = _ChunkedProducer(body) if chunked else FileBodyProducer(BytesIO(body))
    raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    d = agent.request(method, f"http://127.0.0.1:{port}{path}".encode(), raw, producer)
    d.addTimeout(timeout, reactor)  # type: ignore[arg-type]
    response = yield d
    data = yield readBody(response)
    got = {
        name.decode().lower(): [v.decode() for v in values]
        for name, values in response.headers.getAllRawHeaders()
    }
    return ApiReply(response.code, got, data)


def post(
    port: int,
    method: str,
    params: Any,
    *,
    key: str | None = API_KEY,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Deferred[ApiReply]:
    """POST /api/<method> with C{params} as JSON and C{Authorization: apikey <key>}."""
    sent = {"Content-Type": "application/json"}
    if key is not None:
        sent["Authorization"] = f"apikey {key}"
    sent.update(headers or {})
    body = params if isinstance(params, bytes) else json.dumps(params).encode()
    return api_request(port, b"POST", f"/api/{method}", body=body, headers=sent,
                       timeout=timeout)
