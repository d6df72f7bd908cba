"""
The event catalogue of unrealon-ws (PROTOCOL.md section 6), read from the
same file the server builds its own checks from (C{catalogue.json}, the
server's C{unrealon/catalogue.json}): which events exist, their params,
their enums, the room each goes to.

L{check_event} applies the catalogue's rules to what a backend is about to
publish, so a mistake is a C{ValueError}/C{TypeError} at the call site
rather than an C{invalid_params} reply nobody reads.
"""

from __future__ import annotations

import enum
import json
import string
from collections.abc import Mapping
from importlib import resources
from typing import Any

__all__ = ["ENUMS", "EVENTS", "check_event", "event_room"]

_DATA: dict[str, Any] = json.loads(
    resources.files(__package__).joinpath("catalogue.json").read_text("utf-8")
)

#: enum name -> its values (Change, Role, TaskState, Level)
ENUMS: dict[str, frozenset[str]] = {
    name: frozenset(values) for name, values in _DATA["enums"].items()
}
#: event name -> its entry in the catalogue (params, room, summary)
EVENTS: dict[str, dict[str, Any]] = {spec["name"]: spec for spec in _DATA["events"]}

#: ids are strings of 1 to 128 characters
MAX_ID = 128


def check_event(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """
    C{params} of catalogue event C{method}, checked and normalised (ids as
    strings, enum members as their values, optional params left out when
    None); params the catalogue does not name are kept as they are (the
    server passes them on in the event's data).  Raises C{ValueError} or
    C{TypeError} naming the param.
    """
    spec = EVENTS.get(method)
    if spec is None:
        raise ValueError(f"{method!r} is not a catalogue event")
    out = {k: v for k, v in params.items() if v is not None}
    for field in spec["params"]:
        name = field["name"]
        value = params.get(name)
        if value is None:
            if "default" in field or field.get("optional"):
                continue
            raise ValueError(f"{name} is required")
        out[name] = _checked(name, field, value)
    for field in spec["params"]:
        for other, expected in field.get("required_when", {}).items():
            if out.get(other) == expected and not out.get(field["name"]):
                raise ValueError(f"{field['name']} is required when {other} is {expected}")
    return out


def event_room(method: str, params: Mapping[str, Any]) -> str:
    """The room a catalogue event goes to (after L{check_event})."""
    template = EVENTS[method]["room"]
    names = [n for _, n, _, _ in string.Formatter().parse(template) if n]
    return str(template.format(**{n: params[n] for n in names}))


def _checked(name: str, field: Mapping[str, Any], value: Any) -> Any:
    kind = field["type"]
    if kind in ENUMS:
        if isinstance(value, enum.Enum):
            value = value.value
        if value not in ENUMS[kind]:
            raise ValueError(
                f"{name} must be one of {', '.join(sorted(ENUMS[kind]))}, got {value!r}"
            )
        return value
    if kind == "id":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"{name} must be a string or an integer, got {type(value).__name__}")
        text = str(value)
        if not 0 < len(text) <= MAX_ID:
            raise ValueError(f"{name} must have 1 to {MAX_ID} characters")
        return text
    if kind == "string":
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        if len(value) < field.get("min_length", 0):
            raise ValueError(f"{name} must not be empty")
        if "max_length" in field and len(value) > field["max_length"]:
            raise ValueError(f"{name} must have at most {field['max_length']} characters")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a boolean")
        return value
    if kind in ("int", "number"):
        allowed = (int,) if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise TypeError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}")
        low, high = field.get("minimum"), field.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be {bounds}")
        return value
    if kind == "object":
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping (a JSON object)")
        return dict(value)
    raise AssertionError(f"unknown catalogue type {kind!r}")
