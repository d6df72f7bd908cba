"""
twistd and twist: the exit signal they re-raise, the format they log in.

After the reactor stops, both runners re-raise the signal that stopped it
(C{reactor._exitSignal}), so a node that drained gracefully on SIGTERM
would still end "killed by SIGTERM"; PROTOCOL.md section 7 asks for exit
status 0.  L{forget_exit_signal} clears it from an "after shutdown"
trigger.  Upstream: an option (or a public attribute) to exit 0 after a
graceful stop.

twist picks its log format (C{--log-format}, else text on a terminal and
JSON with RFC 7464 separators otherwise) into its options'
C{fileLogObserverFactory}, read after the plugin's C{makeService}:
L{use_log_format} sets it from C{UNREALON_LOG_FORMAT}, so the node writes
each event once, in the format asked for.  twistd takes a log observer from
the application's C{ILogObserver} component (the documented C{.tac} way), set
by the node's service when twistd adopts it.  Upstream: a plugin hook to
choose the log observer.
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


def use_log_format(runner_options: Any, factory: Any) -> bool:
    """
    Make twist log with C{factory} (an observer factory taking a stream);
    False when C{runner_options} are not twist's (twistd: see the module's docstring).
    """
    if runner_options is None or "fileLogObserverFactory" not in runner_options:
        return False
    runner_options["fileLogObserverFactory"] = factory
    return True


def forget_exit_signal(reactor: Any, signal_number: int) -> None:
    """Let the runner exit 0 although C{signal_number} stopped the reactor."""
    if getattr(reactor, "_exitSignal", None) == signal_number:
        reactor._exitSignal = None


check()
