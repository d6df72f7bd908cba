"""
Twisted endpoint strings: parsed without building the endpoint.

Settings are checked before the reactor exists (a bad one stops startup
with one line, PROTOCOL.md section 7), and building a C{systemd:} endpoint
needs the inherited descriptors, so C{serverFromString} cannot be used to
check them.  Twisted's own parser (C{endpoints._parseServer}) splits the
string into its kind, arguments and options exactly as
C{serverFromString} will.  Upstream: a public C{parseServerString}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints

from unrealon._compat import require


def check() -> None:
    require("twisted", endpoints, ("_parseServer",))


def parse_server(description: str) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """
    (kind, positional arguments, options) of a server endpoint string (the
    kind is a name, or the plugin's parser for plugin endpoints such as
    C{systemd:}); ValueError if bad.
    """
    kind, args, kwargs = endpoints._parseServer(description, None)
    return kind, tuple(args), dict(kwargs)


check()
