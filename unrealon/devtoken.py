"""
Development connection tokens: what ``unrealon token`` (and ``make token``)
mints.

HS256, signed with the server's ``JWT_SECRET``, for one user, granting room
patterns (every room by default) for an hour by default, with an optional
presence ``info`` object and optional backend method patterns (``methods``:
none unless given, as the server grants none without the claim).  Every claim is checked here as the server checks
it (PROTOCOL.md section 2), so a token this prints is never one the server
refuses for its shape.  For development only: real tokens come from the
application's backend.

The command itself is L{unrealon.cli} (C{unrealon token}, or
C{python -m unrealon token} where the script is not on the PATH).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from unrealon.names import ROOM_GRANT_RE, USER_ID_RE

#: PROTOCOL.md section 2: info is a JSON object of at most 1 KiB
MAX_INFO_BYTES = 1024
#: a pattern that can match a backend method name (PROTOCOL.md section 9.2), `*` as in rooms
METHOD_GRANT_RE = re.compile(r"^[a-z0-9_.*]{1,200}$")


class TokenError(ValueError):
    """A claim the server would refuse."""


def check_sub(user: str) -> str:
    if not USER_ID_RE.match(user):
        raise TokenError(
            f"user {user!r} is not a valid sub: 1-128 of A-Z a-z 0-9 _ . @ - (PROTOCOL.md section 2)"
        )
    return user


def check_rooms(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not ROOM_GRANT_RE.match(pattern):
            raise TokenError(
                f"room pattern {pattern!r} can match no room: use A-Z a-z 0-9 _ . : @ - and *"
            )
    return patterns


def check_methods(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not METHOD_GRANT_RE.match(pattern):
            raise TokenError(
                f"method pattern {pattern!r} can match no backend method: use a-z 0-9 _ . and *"
            )
    return patterns


def parse_info(text: str) -> dict[str, Any]:
    """The C{info} claim from JSON text: an object of at most 1 KiB, as the server measures it."""
    try:
        info = json.loads(text)
    except ValueError:
        raise TokenError("--info is not JSON") from None
    if not isinstance(info, dict):
        raise TokenError("--info must be a JSON object, e.g. '{\"name\": \"Alice\"}'")
    size = len(json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > MAX_INFO_BYTES:
        raise TokenError(f"--info is {size} bytes; the server takes at most {MAX_INFO_BYTES}")
    return info


def mint(
    user: str,
    secret: str,
    ttl: float = 3600,
    rooms: list[str] | None = None,
    now: float | None = None,
    info: dict[str, Any] | None = None,
    methods: list[str] | None = None,
) -> str:
    """
    An HS256 connection token (claims C{sub}, C{iat}, C{exp}, C{rooms}, and C{info}
    and C{methods} if given).
    """
    import jwt

    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": check_sub(user),
        "iat": issued,
        "exp": int(issued + ttl),
        "rooms": check_rooms(rooms or ["*"]),
    }
    if info is not None:
        claims["info"] = info
    if methods is not None:
        claims["methods"] = check_methods(methods)
    return jwt.encode(claims, secret, algorithm="HS256")
