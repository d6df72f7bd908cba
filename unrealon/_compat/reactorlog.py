"""
Twisted's epoll reactor: the legacy log context around every I/O event.

The reactor hands each read or write event to the protocol through
C{twisted.python.log.callWithLogger}, which asks the transport for its
C{logPrefix()} and runs the handler inside C{callWithContext({"system":
prefix})}: a context copy and two extra frames per event, 1.9 us on this
machine whether or not anything is logged, near a tenth of the CPU a whole
RPC round trip costs the node (about 20 us).  The context is read only by the legacy
C{twisted.python.log.msg}/C{err} (to fill in C{system}); C{twisted.logger},
which this server and Autobahn (through txaio) use, never reads it.

L{install} gives the epoll reactor's module a C{log} whose
C{callWithLogger} calls the handler directly and, as Twisted's does, logs
what it raises with the transport's prefix as C{system} (the prefix is
asked for only then).  Legacy log lines written during an event lose that
prefix; nothing else changes.  Upstream: let the reactor skip the context
when no legacy observer is registered, or take the prefix lazily.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from twisted.python import log as legacy_log

from unrealon._compat import require, unsupported


def _epoll_module() -> ModuleType | None:
    try:
        return importlib.import_module("twisted.internet.epollreactor")
    except ImportError:  # no epoll here (not Linux): the other reactors keep Twisted's own
        return None


_epollreactor = _epoll_module()


def check() -> None:
    if _epollreactor is None:
        return
    require("twisted", _epollreactor, ("log",))
    if getattr(_epollreactor.log, "callWithLogger", None) is None:
        raise unsupported("twisted", "epollreactor no longer runs events through log")


def call_without_context(logger: Any, func: Any, *args: Any, **kw: Any) -> Any:
    """C{log.callWithLogger} without the legacy context: errors logged the same way."""
    try:
        return func(*args, **kw)
    except KeyboardInterrupt:
        raise
    except BaseException:
        try:
            prefix = logger.logPrefix()
        except BaseException:
            prefix = "(buggy logPrefix method)"
        legacy_log.err(system=prefix)
        return None


class _EventLog:
    """The legacy log module, with the lean C{callWithLogger}."""

    callWithLogger = staticmethod(call_without_context)

    def __getattr__(self, name: str) -> Any:
        return getattr(legacy_log, name)


def install() -> None:
    """Run the epoll reactor's events without the legacy log context (idempotent)."""
    if _epollreactor is not None:
        _epollreactor.__dict__["log"] = _EventLog()


def uninstall() -> None:
    """Back to Twisted's own (for tests)."""
    if _epollreactor is not None:
        _epollreactor.__dict__["log"] = legacy_log


check()
