"""
What the two management commands share: reading the UNREALON_* Django
settings, importing the handler modules, and closing the database
connections a handler thread opened.  Django is imported here only, never by
the rest of the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError
from django.db import connections


def setting(name: str, default: Any = None) -> Any:
    return getattr(settings, name, default)


def redis_url() -> str:
    url = setting("UNREALON_REDIS_URL")
    if not url:
        raise CommandError("settings.UNREALON_REDIS_URL is not set (the servers' REDIS_URL)")
    return str(url)


def import_handlers(setting_name: str, override: Sequence[str] | None) -> list[str]:
    """Import the modules of --handlers, else of settings.<setting_name>; their names."""
    modules = list(override) if override else list(setting(setting_name, None) or [])
    if not modules:
        raise CommandError(f"no handler modules: set settings.{setting_name} (a list of module "
                           "names) or pass --handlers")
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise CommandError(f"cannot import handler module {module!r}: {e}") from e
    return modules


def close_thread_connections() -> None:
    """A handler thread's database connections die with it: close them (no leak)."""
    connections.close_all()
