"""
The event catalogue (PROTOCOL.md section 6): what the backend may publish,
typed, and where each event goes.

The catalogue itself is data, C{unrealon/catalogue.json}, the one source the
server and the backend package (C{backend/unrealon_backend}) both read.
Here each catalogue event becomes an attrs class of its required and
optional params (built from that file) with a rule naming its room.  The backend sends the params; clients receive
them as the event's C{data} (optional fields left out when not given, unknown
extra fields passed through).  The same classes type the generated clients'
event handlers through the OpenRPC document's C{x-events}.
"""

from __future__ import annotations

import enum
import json
import string
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import attrs

from unrealon.rpc import attrs_names, param


def id_param(**extra: Any) -> Any:
    """An id: a string of 1-128 characters; a JSON number is taken as its decimal string."""
    return param(identifier=True, min_length=1, max_length=128, **extra)


#: the catalogue's one source: the server builds its params classes from it,
#: the backend package (backend/unrealon_backend) checks what it sends with it
CATALOGUE_DATA: dict[str, Any] = json.loads(
    resources.files("unrealon").joinpath("catalogue.json").read_text("utf-8")
)

#: the catalogue's enums (Change, Role, TaskState, Level), by name
ENUMS: dict[str, type[enum.Enum]] = {
    name: enum.Enum(name, [(v, v) for v in values], module=__name__)  # type: ignore[misc]
    for name, values in CATALOGUE_DATA["enums"].items()
}
Change = ENUMS["Change"]
Role = ENUMS["Role"]
TaskState = ENUMS["TaskState"]
Level = ENUMS["Level"]

_TYPES: dict[str, Any] = {
    "id": str, "string": str, "int": int, "number": float, "bool": bool, "object": dict[str, Any],
    "ranges": list[list[int]],
}


def _field(spec: Mapping[str, Any]) -> tuple[Any, Any]:
    """(annotation, attrs field) of one param of the catalogue."""
    kind = spec["type"]
    base = ENUMS[kind] if kind in ENUMS else _TYPES[kind]
    constraints = {
        key: spec[key]
        for key in ("description", "minimum", "maximum", "min_length", "max_length")
        if key in spec
    }
    if "default" in spec:
        default = base(spec["default"]) if kind in ENUMS else spec["default"]
        constraints["default"] = default
    elif spec.get("optional"):
        base = base | None
        constraints["default"] = None
    if kind == "id":
        return base, id_param(**constraints)
    return base, param(**constraints)


def _params_class(spec: Mapping[str, Any], section: tuple[str, ...] = ("params",)) -> type:
    """
    The attrs class of one catalogue event's params (what the backend
    sends), or, with the C{delivered} section too, of the data clients
    receive (the server adds those fields).
    """
    annotations: dict[str, Any] = {}
    body: dict[str, Any] = {"__doc__": spec["description"], "__module__": __name__}
    for field in (f for name in section for f in spec.get(name, ())):
        annotations[field["name"]], body[field["name"]] = _field(field)
    body["__annotations__"] = annotations
    return attrs.frozen(type(spec["class"], (), body))


def _room(template: str) -> Callable[[Any], str]:
    names = _names(template)  # parsed once: this runs for every event published
    return lambda params: template.format(**{k: getattr(params, k) for k in names})


def _names(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@attrs.frozen
class CatalogueEvent:
    """One kind of event: its name, its params, the room it goes to."""

    name: str
    params: type
    room: Callable[[Any], str]
    summary: str
    #: param -> the values of other params that make it required
    required_when: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: the data clients receive, when the server adds fields to the params
    #: (a streamed message's last_seq and gaps, PROTOCOL.md 5.1)
    delivered: type | None = None
    #: its chunks (params with C{message_id} and C{seq}) make streamed
    #: messages (PROTOCOL.md 5.1): ordered, held, compacted by the engine
    streamed: bool = False

    def missing(self, params: Any) -> list[str]:
        """Params this event's own rules require for these values and that are not given."""
        return [
            name for name, condition in self.required_when.items()
            if getattr(params, name) in (None, "")
            and all(_value(getattr(params, k)) == v for k, v in condition.items())
        ]


def _value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


CATALOGUE: tuple[CatalogueEvent, ...] = tuple(
    CatalogueEvent(
        spec["name"], _params_class(spec), _room(spec["room"]), spec["summary"],
        {f["name"]: f["required_when"] for f in spec["params"] if "required_when" in f},
        _params_class(spec, ("params", "delivered")) if "delivered" in spec else None,
        bool(spec.get("streamed")),
    )
    for spec in CATALOGUE_DATA["events"]
)
#: the params classes, by class name (FileChanged, SessionMessage, ...)
PARAMS: dict[str, type] = {e.params.__name__: e.params for e in CATALOGUE}


def event_data(params: Any, extras: dict[str, Any]) -> dict[str, Any]:
    """The C{data} clients receive: given params (None left out) and extras."""
    # Not to_json: a catalogue param is a JSON scalar, an enum or a JSON
    # object that came off the wire, so only enums need turning back, and
    # this runs for every chunk of every streamed answer
    data: dict[str, Any] = {}
    for name in attrs_names(params.__class__) or ():
        value = getattr(params, name)
        if value is not None:
            data[name] = value.value if isinstance(value, enum.Enum) else value
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
    events = [(e.name, e.delivered or e.params, e.summary, "room") for e in CATALOGUE]
    events += [
        ("presence.joined", PresenceJoined, "A user joined a room (ephemeral)", "direct"),
        ("presence.left", PresenceLeft, "A user left a room (ephemeral)", "direct"),
        ("rooms.revoked", RoomRevoked, "This connection was removed from a room", "direct"),
    ]
    return events
