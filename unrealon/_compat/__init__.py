"""
The compat layer: every access to a private internal of Twisted, Autobahn,
txredisapi or pyjwt lives in a module of this package, and nowhere else.

Each module checks, when it is imported, that what it relies on still
exists (L{require}): a release that renames or removes one stops the
server at start with an error naming the package and its version, instead
of breaking it silently under load.  The tested ranges are the upper
bounds in C{setup.cfg}; C{constraints.txt} pins the versions CI runs.
C{tests/test_compat.py} has a test per access.  One module per dependency,
so that importing one (the twistd plugin's option parsing imports
C{tokens} through the settings) pulls in nothing else.

  - L{unrealon._compat.transport} (Twisted): the TCP transport's
    user-space buffer (the send budget), writing through to the kernel.
  - L{unrealon._compat.websocket} (Autobahn): close codes peers may send,
    the lazy options dump, the closing-handshake timer, the outgoing size
    limit.
  - L{unrealon._compat.directframes} (Autobahn): the direct frame path,
    which reads Autobahn's frame state to know when it may take over.
  - L{unrealon._compat.tokens} (pyjwt): HMAC secrets vetted once.
  - L{unrealon._compat.redis} (txredisapi, Twisted's ClientService): the
    lean command encoder, the direct command path, the reconnect backoff,
    scripts loaded on every new connection, quiet reconnect retries.
  - L{unrealon._compat.runner} (twistd, twist): exit 0 after a graceful
    SIGTERM.
  - L{unrealon._compat.endpoints} (Twisted): endpoint strings checked
    without building the endpoint.
  - L{unrealon._compat.reactorlog} (Twisted): the epoll reactor's events
    run without the legacy log context.

Each module says why no public API does the job and which upstream change
would remove it.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import version
from typing import Any


class IncompatibleDependency(ImportError):
    """An installed dependency no longer has an internal this package relies on."""


def require(package: str, owner: Any, names: Iterable[str]) -> None:
    """Raise L{IncompatibleDependency} unless C{owner} has every one of C{names}."""
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise IncompatibleDependency(
            f"unrealon-ws needs {', '.join(missing)} of {getattr(owner, '__qualname__', owner)} "
            f"from {package} {version(package)}; this version is not supported "
            f"(see setup.cfg for the tested range)"
        )


def unsupported(package: str, what: str) -> IncompatibleDependency:
    return IncompatibleDependency(
        f"unrealon-ws: {package} {version(package)}: {what}; this version is not supported "
        f"(see setup.cfg for the tested range)"
    )
