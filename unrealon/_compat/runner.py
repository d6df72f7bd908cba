"""
twistd and twist: the exit signal they re-raise.

After the reactor stops, both runners re-raise the signal that stopped it
(C{reactor._exitSignal}), so a node that drained gracefully on SIGTERM
would still end "killed by SIGTERM"; PROTOCOL.md section 7 asks for exit
status 0.  L{forget_exit_signal} clears it from an "after shutdown"
trigger.  Upstream: an option (or a public attribute) to exit 0 after a
graceful stop.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.internet import base

from unrealon._compat import unsupported


def check() -> None:
    # set per reactor in ReactorBase.__init__ (a reactor cannot be made just to look)
    if "self._exitSignal" not in inspect.getsource(base.ReactorBase):
        raise unsupported("twisted", "reactors no longer keep _exitSignal")


def forget_exit_signal(reactor: Any, signal_number: int) -> None:
    """Let the runner exit 0 although C{signal_number} stopped the reactor."""
    if getattr(reactor, "_exitSignal", None) == signal_number:
        reactor._exitSignal = None


check()
