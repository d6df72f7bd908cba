"""
``python -m unrealon.devtoken [USER] [--ttl SECONDS] [--rooms PATTERN ...]``

Prints a development connection token: HS256, signed with ``JWT_SECRET``
from the environment, for USER (default "dev"), granting every room
(``rooms: ["*"]``) for one hour.  ``make token USER_ID=alice`` runs it with the
same secret ``make dev`` starts the server with.  For development only: real
tokens come from the application's backend.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jwt


def mint(user: str, secret: str, ttl: float = 3600, rooms: list[str] | None = None,
         now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": int(issued + ttl), "rooms": rooms or ["*"]}
    return jwt.encode(claims, secret, algorithm="HS256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unrealon.devtoken", description=__doc__.split("\n\n")[1])
    parser.add_argument("user", nargs="?", default="", help='the token\'s sub (default "dev")')
    parser.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    parser.add_argument("--rooms", nargs="+", default=["*"], help='room patterns (default "*")')
    args = parser.parse_args(argv)
    secret = os.environ.get("JWT_SECRET")
    if not secret:
        print("JWT_SECRET is not set: export the server's HMAC key (make token does)", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("--ttl must be positive", file=sys.stderr)
        return 2
    print(mint(args.user or "dev", secret, args.ttl, args.rooms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
