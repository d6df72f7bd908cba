"""
The WebSocket opening handshake: who may upgrade, and what a refusal says.

L{check_handshake} applies PROTOCOL.md sections 1 and 2 to an upgrade
request before Autobahn answers it (path, Origin, the token in the
C{Authorization} header or the C{?token=} query, the per-user and
unauthenticated-connection caps) and either returns the identity the token
proves (None when there was no token) or raises L{HandshakeRefused}.
L{refusal_response} is the HTTP answer to a refusal: a short plain-text
body saying why (never the token) and the headers the status needs.

The upgrade request carries the token, and Autobahn logs the whole request
at debug level; L{ScrubbedLog} blanks it before any log event exists.
"""

from __future__ import annotations

import http
import re
from collections.abc import Mapping
from typing import Any

from autobahn.websocket.types import ConnectionRequest

from unrealon.auth import AuthError, Identity, TokenVerifier
from unrealon.config import Config

#: seconds a client refused for too many unauthenticated connections should wait
RETRY_AFTER_UNAUTHENTICATED = 5
#: the challenge of a 401 answer (RFC 6750)
BEARER_CHALLENGE = ("WWW-Authenticate", 'Bearer realm="unrealon-ws"')


class HandshakeRefused(Exception):
    """
    A refused opening handshake: the HTTP status, a short plain-text body
    saying why (never the token), and extra response headers.
    """

    def __init__(self, code: int, why: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(code, why)
        self.code = code
        self.why = why
        self.headers = headers


def check_handshake(
    request: ConnectionRequest,
    config: Config,
    verifier: TokenVerifier | None,
    *,
    stopping: bool,
    user_connections: Any,
    unauthenticated: int,
) -> Identity | None:
    """
    The identity an upgrade request proves, None when it carries no token
    (it must authenticate later), or L{HandshakeRefused}.

    @param user_connections: user id -> connections that user holds here.
    @param unauthenticated: connections open and not yet authenticated here.
    """
    if request.path != "/ws":
        raise HandshakeRefused(404, "not found: the WebSocket endpoint is /ws")
    if stopping:
        raise HandshakeRefused(503, "server shutting down", (("Retry-After", "1"),))
    origin = request.headers.get("origin")
    allowed = config.allowed_origins
    if origin is not None and "*" not in allowed and origin not in allowed:
        raise HandshakeRefused(403, "origin not allowed")
    token = handshake_token(request.headers, request.params)
    if token is None:
        if unauthenticated >= config.max_unauthenticated:
            raise HandshakeRefused(
                503,
                "too many unauthenticated connections: send a token in the handshake, "
                "or retry later",
                (("Retry-After", str(RETRY_AFTER_UNAUTHENTICATED)),),
            )
        return None
    if verifier is None:
        raise HandshakeRefused(401, "unauthorized: no key is configured", (BEARER_CHALLENGE,))
    try:
        identity = verifier.verify_connection_token(token)
    except AuthError as e:
        raise HandshakeRefused(401, f"unauthorized: {e.reason}", (BEARER_CHALLENGE,)) from None
    if user_connections(identity.user_id) >= config.max_connections_per_user:
        raise HandshakeRefused(429, "too many connections for this user")
    return identity


def handshake_token(headers: Mapping[str, str], params: Mapping[str, list[str]]) -> str | None:
    """The token of C{Authorization: Bearer}, else of C{?token=}, else None."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    values = params.get("token")
    if values and values[0]:
        return values[0]
    return None


def status_phrase(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def refusal_response(refused: HandshakeRefused, server: str) -> bytes:
    """The complete HTTP answer to a refused handshake."""
    body = (refused.why + "\n").encode("utf-8")
    lines = [
        f"HTTP/1.1 {refused.code} {status_phrase(refused.code)}",
        f"Server: {server}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in refused.headers),
    ]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


# -- keeping tokens out of Autobahn's logs ---------------------------------------

_REDACTED = "[redacted]"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_SECRET_HEADER_LINE = re.compile(r"(?im)^((?:proxy-)?authorization|cookie)[ \t]*:[^\r\n]*")
_TOKEN_PARAM = re.compile(r"(?i)([?&;]token=)[^&;#\s]*")


def scrub(value: Any) -> Any:
    """
    C{value} with handshake secrets blanked: the C{token} query parameter and the
    C{Authorization}/C{Cookie} headers, in request text (str or bytes), header
    dicts and lists of those.  Anything else is returned as it is.
    """
    if isinstance(value, str):
        value = _TOKEN_PARAM.sub(r"\1" + _REDACTED, value)
        return _SECRET_HEADER_LINE.sub(r"\1: " + _REDACTED, value)
    if isinstance(value, (bytes, bytearray)):
        return scrub(bytes(value).decode("latin-1")).encode("latin-1")
    if isinstance(value, dict):
        return {
            k: _REDACTED if isinstance(k, str) and k.lower() in _SECRET_HEADERS else scrub(v)
            for k, v in value.items()
        }
    if type(value) in (list, tuple):
        return type(value)(scrub(v) for v in value)
    return value


class ScrubbedLog:
    """
    Autobahn's txaio logger for sessions, with handshake secrets blanked.

    At debug level Autobahn logs the whole HTTP upgrade request, its request line
    and its headers, so the C{?token=} query and the C{Authorization} header would
    reach every log observer.  A log observer cannot take them back out (the
    runner's own observers see the event first), so the values are scrubbed here,
    before the event exists, whatever level is configured.
    """

    _EMITTERS = frozenset(
        {"trace", "debug", "info", "warn", "error", "critical", "failure", "emit"}
    )

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        # txaio binds the levels below the configured one to a no-op: keep it cheap
        if name not in self._EMITTERS or getattr(method, "__name__", "") == "_no_op":
            return method

        def emit(*args: Any, **kwargs: Any) -> Any:
            return method(*(scrub(a) for a in args), **{k: scrub(v) for k, v in kwargs.items()})

        return emit
