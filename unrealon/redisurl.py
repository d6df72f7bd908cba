"""
Redis URLs: C{redis://} and C{unix://} parsed into a L{RedisAddress}.

Pure parsing, with no Redis client behind it, so the settings can check
C{REDIS_URL} before the reactor exists (L{unrealon.config}); the Redis
engine connects to what it returns (L{unrealon.engine.redisclient}).
Messages never contain the password.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379



@attrs.frozen
class RedisAddress:
    """Where a Redis server is and how to log in.  The password is kept out of C{repr}."""

    kind: Literal["tcp", "unix", "sentinel"]
    host: str | None = None
    port: int | None = None
    path: str | None = None
    db: int = 0
    password: str | None = attrs.field(default=None, repr=False)
    username: str | None = None
    #: kind "sentinel": the Sentinels to ask (host, port), and the master's name
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.kind == "tcp":
            if not self.host or self.port is None or self.path is not None:
                raise ValueError("a tcp RedisAddress needs host and port, and no path")
            if not 0 < self.port < 65536:
                raise ValueError("Redis port must be between 1 and 65535")
        elif self.kind == "unix":
            if not self.path or self.host is not None or self.port is not None:
                raise ValueError("a unix RedisAddress needs a path, and no host or port")
        elif self.kind == "sentinel":
            if not self.sentinels or not self.service or self.host or self.path:
                raise ValueError("a sentinel RedisAddress needs sentinels and a service name")
        else:
            raise ValueError("RedisAddress.kind must be 'tcp', 'unix' or 'sentinel'")
        if self.db < 0:
            raise ValueError("Redis db must be a non-negative integer")
        if self.username is not None and self.password is None:
            raise ValueError("a Redis username needs a password")

    def display(self) -> str:
        """A URL for logs: same server, password masked."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        if self.kind == "unix":
            return f"unix://{auth}{self.path}?db={self.db}"
        if self.kind == "sentinel":
            hosts = ",".join(f"{_bracket(h)}:{p}" for h, p in self.sentinels)
            return f"redis+sentinel://{auth}{hosts}/{self.service}/{self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"


_QUERY_KEYS = frozenset({"db", "password", "username"})


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bad_url(problem: str) -> ValueError:
    # Never echo the URL or any piece of it that could be (part of) a password.
    return ValueError(f"invalid Redis URL: {problem}")


def _parse_db(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise _bad_url("the database must be a non-negative integer")
    return int(text)


def parse_redis_url(url: str) -> RedisAddress:
    """
    Parse C{redis://[[username]:password@]host[:port][/db]} or
    C{unix://[[username]:password@]/path/to/redis.sock[?db=N]}.

    The host defaults to C{localhost}, the port to 6379 and the database to 0.
    User name and password are percent-decoded; they may also be given as
    C{?username=}/C{?password=} query parameters, the database as C{?db=}.
    C{rediss://} is refused: txredisapi's TLS does not verify certificates.

    Redis Sentinel: C{redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service[/db]}
    (Sentinel's port defaults to 26379): the node asks the Sentinels for the
    master of C{service} before every connection, so after a failover it
    reconnects to the new master.  The password is the data nodes'.
    Raises ValueError with a message that never contains the password.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise _bad_url("it cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme == "redis+sentinel":
        return _parse_sentinel(url.strip())
    if scheme == "rediss":
        raise _bad_url("rediss:// (TLS) is not supported: txredisapi does not verify certificates")
    if scheme not in ("redis", "unix"):
        shown = f" {scheme!r}" if scheme.isalpha() and len(scheme) <= 10 else ""
        raise _bad_url(
            f"unsupported scheme{shown}; expected redis://, unix:// or redis+sentinel://"
        )
    if parts.fragment:
        raise _bad_url("a fragment (#...) is not allowed")

    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise _bad_url("the query string cannot be parsed") from None
    unknown = set(query) - _QUERY_KEYS
    if unknown:
        names = ", ".join(sorted(n for n in unknown if n.isidentifier()))
        raise _bad_url(
            f"unknown query parameter(s) {names or '(unprintable)'}; "
            "allowed: db, password, username"
        )
    for key, values in query.items():
        if len(values) != 1:
            raise _bad_url(f"query parameter {key} is given more than once")

    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if "username" in query:
        if username is not None:
            raise _bad_url("username given both before @ and as a query parameter")
        username = query["username"][0] or None
    if "password" in query:
        if password is not None:
            raise _bad_url("password given both before @ and as a query parameter")
        password = query["password"][0] or None
    if username is not None and password is None:
        raise _bad_url("a username needs a password (user:password@)")

    db_query = _parse_db(query["db"][0]) if "db" in query else None

    if scheme == "unix":
        if parts.hostname:
            raise _bad_url("unix:// needs an absolute path: unix:///path/to/redis.sock")
        path = unquote(parts.path)
        if not path.startswith("/") or path.endswith("/"):
            raise _bad_url("unix:// needs an absolute socket path")
        return RedisAddress(
            kind="unix",
            path=path,
            db=db_query if db_query is not None else 0,
            password=password,
            username=username,
        )

    try:
        port = parts.port
    except ValueError:
        raise _bad_url("the port must be an integer between 0 and 65535") from None
    if port == 0:
        raise _bad_url("the port must be between 1 and 65535")
    host = parts.hostname or "localhost"
    db_path: int | None = None
    path = parts.path.strip("/")
    if path:
        db_path = _parse_db(path)
    if db_path is not None and db_query is not None and db_path != db_query:
        raise _bad_url("the database is given twice, with different values")
    db = db_path if db_path is not None else db_query
    return RedisAddress(
        kind="tcp",
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        db=db if db is not None else 0,
        password=password,
        username=username,
    )


def _parse_sentinel(url: str) -> RedisAddress:
    """C{redis+sentinel://...} (see L{parse_redis_url}); urlsplit cannot take several hosts."""
    rest = url[len("redis+sentinel://"):]
    if "?" in rest or "#" in rest:
        raise _bad_url("redis+sentinel:// takes no query or fragment")
    authority, slash, path = rest.partition("/")
    auth, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if password is None or (username is not None and not password):
            raise _bad_url("a username needs a password (user:password@)")
    sentinels = []
    for item in hosts.split(","):
        host, port = _host_port(item)
        sentinels.append((host, port))
    parts = [p for p in path.split("/") if p] if slash else []
    if not parts or len(parts) > 2:
        raise _bad_url("redis+sentinel:// needs /<service name>[/<db>] after the hosts")
    service = unquote(parts[0])
    db = _parse_db(parts[1]) if len(parts) == 2 else 0
    return RedisAddress(kind="sentinel", sentinels=tuple(sentinels), service=service, db=db,
                        password=password, username=username)


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):
        host, bracket, after = item[1:].partition("]")
        if not bracket:
            raise _bad_url("an IPv6 address needs its closing bracket")
        port_text = after[1:] if after.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise _bad_url("a Sentinel host is empty")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad_url("a Sentinel port must be an integer between 1 and 65535")
    return host, int(port_text)
