"""
C{manage.py unrealon_worker}: serve the backend methods declared in the
modules of C{settings.UNREALON_BACKEND_HANDLERS} (with
C{from unrealon_backend import method}) until SIGINT/SIGTERM.

Settings: C{UNREALON_REDIS_URL} (required), C{UNREALON_BACKEND_HANDLERS}
(list of modules), and optionally C{UNREALON_BACKEND_STREAM}
(C{stream:backend}), C{UNREALON_BACKEND_GROUP} (C{backend_workers}),
C{UNREALON_BACKEND_CONCURRENCY} (32), C{UNREALON_BACKEND_WORKER_ID}
(host-pid-random).  Results are encoded with Django's JSON encoder (dates,
UUIDs, Decimals).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder

from unrealon_backend._methods import default_registry
from unrealon_backend.management.commands._settings import (
    close_thread_connections,
    import_handlers,
    redis_url,
    setting,
)
from unrealon_backend.worker import Worker


class Command(BaseCommand):
    help = "Serve unrealon-ws backend methods (settings.UNREALON_BACKEND_HANDLERS)"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--handlers", nargs="+", metavar="MODULE",
                            help="instead of settings.UNREALON_BACKEND_HANDLERS")
        parser.add_argument("--concurrency", type=int, default=None)
        parser.add_argument("--worker-id", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        modules = import_handlers("UNREALON_BACKEND_HANDLERS", options["handlers"])
        if not default_registry.methods:
            raise CommandError(f"{', '.join(modules)} declared no method "
                               "(use `from unrealon_backend import method`)")
        worker = Worker(
            redis_url(),
            stream=setting("UNREALON_BACKEND_STREAM", "stream:backend"),
            group=setting("UNREALON_BACKEND_GROUP", "backend_workers"),
            worker_id=options["worker_id"] or setting("UNREALON_BACKEND_WORKER_ID"),
            concurrency=options["concurrency"] or setting("UNREALON_BACKEND_CONCURRENCY", 32),
            registry=default_registry,
            json_default=DjangoJSONEncoder().default,
            thread_cleanup=close_thread_connections,
        )
        self.stdout.write(f"unrealon worker {worker.worker_id}: "
                          f"{', '.join(sorted(default_registry.methods))}")
        worker.run()
