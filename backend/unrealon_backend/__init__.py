"""
unrealon-backend: the backend's side of unrealon-ws, from Django or any
Python service, with redis-py and nothing else.

Publish events to browsers::

    from unrealon_backend import Publisher

    publisher = Publisher("redis://127.0.0.1:6379/0")
    publisher.file_changed(42, "src/app.py", "modified")

Serve methods browsers call, and consume lifecycle events (PROTOCOL.md
section 9)::

    from unrealon_backend import method, on

    @method("ai.ask", params={"type": "object", "required": ["prompt"],
                              "properties": {"prompt": {"type": "string"}}})
    def ask(call, prompt):
        return {"answer": prompt.upper()}

    @on("user.online")
    def online(event):
        ...

    # python -m unrealon_backend worker --redis URL --handlers myapp.backend_methods
    # python -m unrealon_backend events --redis URL --handlers myapp.lifecycle

See L{unrealon_backend.publisher} (publishing), L{unrealon_backend.worker}
(backend methods), L{unrealon_backend.events} (lifecycle events) and
L{unrealon_backend.catalogue} (the event catalogue).
"""

from __future__ import annotations

from unrealon_backend import catalogue, events, publisher, worker
from unrealon_backend.catalogue import *  # noqa: F403 (its __all__)
from unrealon_backend.events import *  # noqa: F403 (its __all__)
from unrealon_backend.publisher import *  # noqa: F403 (its __all__)
from unrealon_backend.worker import *  # noqa: F403 (its __all__)

__version__ = "0.4.0"

__all__ = sorted([*catalogue.__all__, *publisher.__all__, *worker.__all__, *events.__all__])
