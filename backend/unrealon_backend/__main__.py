"""
The command line of the backend package::

    python -m unrealon_backend worker --redis URL --handlers myapp.backend_methods
    python -m unrealon_backend events --redis URL --handlers myapp.lifecycle
    python -m unrealon_backend declarations --handlers myapp.backend_methods

C{--handlers} modules (one or more; the option may repeat) are imported
first; they declare their methods with C{from unrealon_backend import method}
and their event handlers with C{from unrealon_backend import on}, on the
process-wide defaults these commands serve.  C{declarations} prints the
declaration objects (PROTOCOL.md 9.2) as a JSON list sorted by name, for code
generation.  C{--redis} defaults to C{$UNREALON_REDIS_URL}, then
C{$REDIS_URL}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from unrealon_backend._methods import default_registry
from unrealon_backend.events import EventConsumer, default_event_handlers
from unrealon_backend.worker import Worker

log = logging.getLogger("unrealon_backend")


def import_handlers(modules: Sequence[str]) -> None:
    """Import each module (comma-separated names allowed), so its decorators register."""
    for name in modules:
        for module in filter(None, (part.strip() for part in name.split(","))):
            importlib.import_module(module)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unrealon_backend",
                                     description="unrealon-ws backend worker and event consumer")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, redis: bool = True) -> None:
        sub.add_argument("--handlers", action="append", required=True, metavar="MODULE",
                         help="module(s) to import; repeat or separate with commas")
        if redis:
            sub.add_argument("--redis", default=os.environ.get("UNREALON_REDIS_URL")
                             or os.environ.get("REDIS_URL"),
                             help="Redis URL (default $UNREALON_REDIS_URL, then $REDIS_URL)")
            sub.add_argument("--log-level", default="INFO",
                             choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    worker = commands.add_parser("worker", help="serve backend methods (PROTOCOL.md 9.3)")
    common(worker)
    worker.add_argument("--stream", default="stream:backend",
                        help="the servers' UNREALON_BACKEND_STREAM")
    worker.add_argument("--group", default="backend_workers")
    worker.add_argument("--worker-id", default=None, help="default: host-pid-random")
    worker.add_argument("--concurrency", type=_positive_int, default=32)
    worker.add_argument("--claim-idle", type=_positive_float, default=5.0,
                        help="seconds before a lost worker's calls are taken over")
    worker.add_argument("--shutdown-grace", type=_positive_float, default=10.0)

    events = commands.add_parser("events", help="consume lifecycle events (PROTOCOL.md 9.1)")
    common(events)
    events.add_argument("--stream", default="stream:events",
                        help="the servers' UNREALON_EVENTS_STREAM")
    events.add_argument("--group", default="backend_events")
    events.add_argument("--consumer", default=None, help="default: host-pid-random")
    events.add_argument("--claim-idle", type=_positive_float, default=30.0)
    events.add_argument("--max-deliveries", type=_positive_int, default=5)

    declarations = commands.add_parser("declarations",
                                       help="print the method declarations as JSON")
    common(declarations, redis=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import_handlers(args.handlers)
    if args.command == "declarations":
        print(json.dumps(default_registry.declarations(), indent=2, sort_keys=False))
        return 0
    if not args.redis:
        print("unrealon_backend: --redis (or UNREALON_REDIS_URL) is required", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "worker":
        if not default_registry.methods:
            print(f"unrealon_backend: {', '.join(args.handlers)} declared no method "
                  "(use `from unrealon_backend import method`)", file=sys.stderr)
            return 2
        Worker(args.redis, stream=args.stream, group=args.group, worker_id=args.worker_id,
               concurrency=args.concurrency, claim_idle=args.claim_idle,
               shutdown_grace=args.shutdown_grace, registry=default_registry).run()
    else:
        EventConsumer(args.redis, stream=args.stream, group=args.group, consumer=args.consumer,
                      claim_idle=args.claim_idle, max_deliveries=args.max_deliveries,
                      handlers=default_event_handlers).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
