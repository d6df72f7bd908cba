"""
unrealon-backend: publish events to unrealon-ws from Django or any Python
service, with redis-py and nothing else.

    from unrealon_backend import Publisher

    publisher = Publisher("redis://127.0.0.1:6379/0")
    publisher.file_changed(42, "src/app.py", "modified")

See L{unrealon_backend.publisher} for the whole API and the Django recipe,
and L{unrealon_backend.catalogue} for the event catalogue it checks against.
"""

from __future__ import annotations

from unrealon_backend import catalogue, publisher
from unrealon_backend.catalogue import *  # noqa: F403 (its __all__)
from unrealon_backend.publisher import *  # noqa: F403 (its __all__)

__version__ = "0.2.0"

__all__ = sorted([*catalogue.__all__, *publisher.__all__])
