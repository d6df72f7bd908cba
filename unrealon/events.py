"""
The event catalogue (PROTOCOL.md section 6): what the backend may publish,
typed, and where each event goes.

Each catalogue event is an attrs class of its required and optional params
with a rule naming its room.  The backend sends the params; clients receive
them as the event's C{data} (optional fields left out when not given, unknown
extra fields passed through).  The same classes type the generated clients'
event handlers through the OpenRPC document's C{x-events}.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

from unrealon.rpc import param, to_json


def id_param() -> Any:
    """An id: a string of 1-128 characters; a JSON number is taken as its decimal string."""
    return param(identifier=True, min_length=1, max_length=128)


class Change(enum.Enum):
    created = "created"
    modified = "modified"
    deleted = "deleted"
    renamed = "renamed"


class Role(enum.Enum):
    user = "user"
    assistant = "assistant"
    system = "system"
    tool = "tool"


class TaskState(enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Level(enum.Enum):
    info = "info"
    success = "success"
    warning = "warning"
    error = "error"


@attrs.frozen
class FileChanged:
    """A file in a workspace was created, modified, deleted or renamed."""

    workspace_id: str = id_param()
    path: str = param(min_length=1)
    change: Change = param()
    old_path: str | None = param(default=None, description="the former path, when renamed")


@attrs.frozen
class SnapshotCreated:
    """A snapshot of a workspace was taken."""

    workspace_id: str = id_param()
    snapshot_id: str = id_param()


@attrs.frozen
class StateChanged:
    """A workspace changed state (starting, running, stopped, ...)."""

    workspace_id: str = id_param()
    state: str = param(min_length=1)


@attrs.frozen
class SessionMessage:
    """An AI session message, or one streamed chunk of it (ordered by seq)."""

    session_id: str = id_param()
    message_id: str = id_param()
    role: Role = param()
    content: str = param()
    seq: int | None = param(default=None, minimum=0, description="chunk order within the message")
    done: bool | None = param(default=None, description="true on a message's last chunk")


@attrs.frozen
class TaskStatus:
    """A task of an AI session changed status."""

    session_id: str = id_param()
    task_id: str = id_param()
    status: TaskState = param()
    progress: float | None = param(default=None, minimum=0, maximum=1)


@attrs.frozen
class ContextUpdated:
    """The context of an AI session changed; clients reload it."""

    session_id: str = id_param()


@attrs.frozen
class NotificationSent:
    """A notification for one user."""

    user_id: str = id_param()
    title: str = param()
    message: str = param()
    level: Level = param(default=Level.info)
    data: dict[str, Any] | None = param(default=None)


@attrs.frozen
class NotificationBroadcast:
    """A notification for everyone."""

    title: str = param()
    message: str = param()
    level: Level = param(default=Level.info)
    data: dict[str, Any] | None = param(default=None)


@attrs.frozen
class CatalogueEvent:
    """One kind of event: its name, its params, the room it goes to."""

    name: str
    params: type
    room: Callable[[Any], str]
    summary: str


CATALOGUE: tuple[CatalogueEvent, ...] = (
    CatalogueEvent("workspace.file_changed", FileChanged,
                   lambda p: f"workspace:{p.workspace_id}", "A file in a workspace changed"),
    CatalogueEvent("workspace.snapshot_created", SnapshotCreated,
                   lambda p: f"workspace:{p.workspace_id}", "A workspace snapshot was taken"),
    CatalogueEvent("workspace.state_changed", StateChanged,
                   lambda p: f"workspace:{p.workspace_id}", "A workspace changed state"),
    CatalogueEvent("session.message", SessionMessage,
                   lambda p: f"session:{p.session_id}", "An AI session message or chunk"),
    CatalogueEvent("session.task_status", TaskStatus,
                   lambda p: f"session:{p.session_id}", "A session task changed status"),
    CatalogueEvent("session.context_updated", ContextUpdated,
                   lambda p: f"session:{p.session_id}", "A session's context changed"),
    CatalogueEvent("notification.send", NotificationSent,
                   lambda p: f"user:{p.user_id}", "A notification for this user"),
    CatalogueEvent("notification.broadcast", NotificationBroadcast,
                   lambda p: "broadcast", "A notification for everyone"),
)


def event_data(params: Any, extras: dict[str, Any]) -> dict[str, Any]:
    """The C{data} clients receive: given params (None left out) and extras."""
    data = {k: v for k, v in to_json(params).items() if v is not None}
    for key, value in extras.items():
        data.setdefault(key, value)
    return data


# -- events the server itself sends -------------------------------------------


@attrs.frozen
class PresenceJoined:
    """A user's first connection entered a room."""

    room: str
    user_id: str
    info: dict[str, Any]


@attrs.frozen
class PresenceLeft:
    """A user's last connection left a room."""

    room: str
    user_id: str


@attrs.frozen
class RoomRevoked:
    """This connection was removed from a room (its new token does not grant it)."""

    room: str


def client_events() -> list[tuple[str, type, str, str]]:
    """
    (name, class, summary, kind) of every event a client may receive.  A
    "room" event's params are C{room}, C{cursor} and C{data} (the class); a
    "direct" event's params are the class itself (never stored or replayed).
    """
    events = [(e.name, e.params, e.summary, "room") for e in CATALOGUE]
    events += [
        ("presence.joined", PresenceJoined, "A user joined a room (ephemeral)", "direct"),
        ("presence.left", PresenceLeft, "A user left a room (ephemeral)", "direct"),
        ("rooms.revoked", RoomRevoked, "This connection was removed from a room", "direct"),
    ]
    return events
