"""
The twistd / twist entry: command-line options in, a node service out.

Imported by the plugin's option parsing before the reactor is chosen, so it
imports nothing that installs one (the service module is imported inside
L{makeService}, after the runner has installed the reactor).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python import usage
from twisted.python.failure import Failure

from unrealon.config import SETTINGS, ConfigError, load_config
from unrealon.extensions import ExtensionError, load_extensions

_FLAGS = {"insecure_dev", "compression", "connection_events"}


class Options(usage.Options):
    """Every setting of PROTOCOL.md section 7 as an option (the CLI wins)."""

    synopsis = "[options]"
    longdesc = (
        "Start one unrealon-ws node. Every option also reads its environment "
        "variable, then ./.env; see the README's settings table."
    )
    optFlags = [[s.option, None, f"{s.doc} [{s.env}]"] for s in SETTINGS if s.name in _FLAGS]
    optParameters = [
        [s.option, None, None, f"{s.doc} [{s.env}]" + (f" (default: {s.default})" if s.default and not s.secret else "")]
        for s in SETTINGS
        if s.name not in _FLAGS
    ]

    def opt_version(self) -> None:
        """Print the unrealon-ws version and exit."""
        from unrealon import __version__

        print(f"unrealon-ws {__version__}")
        sys.exit(0)

    def cli_values(self) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for setting in SETTINGS:
            raw = self.get(setting.option)
            if setting.name in _FLAGS:
                values[setting.name] = "1" if raw else None
            else:
                values[setting.name] = raw
        return values


def makeService(options: Options) -> Any:
    try:
        config = load_config(options.cli_values())
        extensions = load_extensions(config.extensions)
    except ExtensionError as e:
        sys.stderr.write(f"unrealon-ws: bad setting UNREALON_EXTENSIONS (--extensions): {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    except ConfigError as e:
        # One line, then a non-zero exit: never start half-configured.
        sys.stderr.write(f"unrealon-ws: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    from twisted.internet import reactor

    from unrealon._compat.runner import use_log_format
    from unrealon.logs import runner_observer, start_file_logging
    from unrealon.service import makeService as make_node

    start_file_logging(config)
    service = make_node(config, reactor, extensions)
    fmt = config.log_format
    if fmt is not None and not use_log_format(options.parent, runner_observer(fmt)):
        # twistd: its log observer is the application's ILogObserver component
        if fmt == "json":
            service.log_observer = runner_observer("json")(sys.stdout)
    service.ready.addCallbacks(_freeze_startup_objects, _exit_on_start_failure)
    reactor.addSystemEventTrigger("after", "shutdown", _forget_sigterm, reactor)
    return service


def _freeze_startup_objects(_: object) -> None:
    """
    Once the node is up, move everything allocated so far (modules, Twisted,
    Autobahn, the service tree: some 60 000 objects) out of the collector's
    sight.  They live as long as the process, yet every full collection
    walked them all: a 50 ms stall a few times a minute under load, which
    was the whole tail of the backend-to-browser latency (measured p99 30 ms
    and max 77 ms at 1,000 events/s before, see bench/README.md).  Only the
    process entry does this: tests build many nodes in one process.
    """
    gc.collect()
    gc.freeze()


def _exit_on_start_failure(failure: Failure) -> None:
    """
    A node that cannot start (a port in use, Redis refusing it) must not
    linger half-started: under twistd the failure comes before the reactor
    runs, so nothing would stop it, and twist would exit 0.  The service has
    logged the traceback; say why in one line on stderr and exit 1.  A
    start cancelled by a shutdown (SIGTERM while waiting for Redis) is not a
    failure: the shutdown goes on and exits 0.
    """
    if failure.check(CancelledError):
        return
    lines = failure.getErrorMessage().strip().splitlines() or [""]
    from unrealon.service import ListenError

    if failure.check(ListenError):
        message = f"unrealon-ws: {lines[0]}\n"
    else:
        message = f"unrealon-ws: cannot start: {type(failure.value).__name__}: {lines[0]}\n"
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os.write(2, message.encode("utf-8", "replace"))
    os._exit(1)


def _forget_sigterm(reactor: Any) -> None:
    """
    twistd and twist re-raise the signal that stopped the reactor once it has
    stopped, so after a complete graceful drain the process would still end
    "killed by SIGTERM"; PROTOCOL.md section 7 asks for exit status 0.
    """
    from unrealon._compat.runner import forget_exit_signal

    forget_exit_signal(reactor, signal.SIGTERM)
