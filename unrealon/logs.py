"""
Where log lines go, and in which format: one line per event, never twice.

The runner (twist or twistd) writes every event once, to its output, in
the format C{UNREALON_LOG_FORMAT} asks for: readable text, or JSON (NDJSON:
one object per line, no RFC 7464 separator, so log shippers and C{jq} read
it) (L{runner_observer}).  Unset, the runner chooses (twist: text on a
terminal, JSON otherwise; twistd: text).  When C{UNREALON_LOG_FILE} is set, every event at or
above C{UNREALON_LOG_LEVEL} is also written to that file as JSON lines.
Nothing here formats secrets: no code in this package passes a token or key
to a log call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO

import txaio
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)

from unrealon.config import Config

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def runner_observer(fmt: str) -> Callable[[IO[str]], ILogObserver]:
    """The observer factory for the runner's output in format C{fmt} (text or json)."""
    if fmt == "json":
        return lambda stream: jsonFileLogObserver(stream, recordSeparator="")
    return textFileLogObserver


def json_file_observer(stream: IO[str], level: str) -> ILogObserver:
    """JSON lines of events at C{level} or above, written to C{stream}."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    return FilteringLogObserver(
        jsonFileLogObserver(stream, recordSeparator=""), [predicate]
    )


def start_file_logging(config: Config) -> ILogObserver | None:
    """Add the JSON file observer the configuration asks for, if any."""
    # Autobahn logs through txaio; keep its level in step with ours.
    txaio.set_global_log_level(config.log_level)  # type: ignore[attr-defined]
    if not config.log_file:
        return None
    directory = os.path.dirname(config.log_file)
    if directory:
        os.makedirs(directory, exist_ok=True)
    stream = open(config.log_file, "a", encoding="utf-8", buffering=1)
    observer = json_file_observer(stream, config.log_level)
    globalLogPublisher.addObserver(observer)
    return observer
