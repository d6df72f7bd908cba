"""
C{manage.py unrealon_events}: consume the servers' lifecycle events with the
handlers registered (C{from unrealon_backend import on}) in the modules of
C{settings.UNREALON_EVENT_HANDLERS}, until SIGINT/SIGTERM.

Settings: C{UNREALON_REDIS_URL} (required), C{UNREALON_EVENT_HANDLERS} (list
of modules), and optionally C{UNREALON_EVENTS_STREAM} (C{stream:events}, the
servers' setting of the same name), C{UNREALON_EVENTS_GROUP}
(C{backend_events}), C{UNREALON_EVENTS_CONSUMER} (host-pid-random).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from unrealon_backend.events import EventConsumer, default_event_handlers
from unrealon_backend.management.commands._settings import (
    close_thread_connections,
    import_handlers,
    redis_url,
    setting,
)


class Command(BaseCommand):
    help = "Consume unrealon-ws lifecycle events (settings.UNREALON_EVENT_HANDLERS)"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--handlers", nargs="+", metavar="MODULE",
                            help="instead of settings.UNREALON_EVENT_HANDLERS")
        parser.add_argument("--consumer", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        modules = import_handlers("UNREALON_EVENT_HANDLERS", options["handlers"])
        if not default_event_handlers.handlers:
            raise CommandError(f"{', '.join(modules)} registered no handler "
                               "(use `from unrealon_backend import on`)")
        consumer = EventConsumer(
            redis_url(),
            stream=setting("UNREALON_EVENTS_STREAM", "stream:events"),
            group=setting("UNREALON_EVENTS_GROUP", "backend_events"),
            consumer=options["consumer"] or setting("UNREALON_EVENTS_CONSUMER"),
            handlers=default_event_handlers,
            thread_cleanup=close_thread_connections,
        )
        self.stdout.write(f"unrealon events consumer {consumer.consumer}: "
                          f"{', '.join(sorted(default_event_handlers.handlers))}")
        consumer.run()
