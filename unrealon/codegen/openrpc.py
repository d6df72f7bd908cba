"""
The OpenRPC document of the client API, and a small type model read from it.

The document is built from the server's own registry (L{build_registry} plus
any application extensions) through L{client_openrpc}, the same function that
answers C{rpc.discover}, so the generated clients can never describe another
API than the one served.  The generators read the document back from its JSON
text, so what they produce depends on C{clients/openrpc.json} alone.

A project's own backend methods (PROTOCOL.md section 9) are not in the
registry: workers declare them in Redis.  L{backend_methods} turns the same
declarations, read from a file, into the entries C{rpc.discover} gives them
(L{unrealon.backenddecl.openrpc_method}), so the clients get typed calls for
them too.  Unlike the server, which ignores a bad declaration, this refuses it:
a typo must fail the build, not drop a method from the client.

The type model is the small JSON Schema subset L{unrealon.rpc.schema_for}
writes: primitives, enums, arrays, maps, objects with properties, and
C{oneOf} with C{null} for optional values.  Anything else becomes "any JSON".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import attrs

from unrealon import __version__, jsoncodec
from unrealon.backenddecl import DeclarationError, openrpc_method, parse_declaration
from unrealon.clientapi import client_openrpc
from unrealon.config import SETTINGS_BY_NAME
from unrealon.extensions import Extension
from unrealon.rpc import Caller
from unrealon.service import build_registry

#: the node's defaults (UNREALON_BACKEND_TIMEOUT, UNREALON_BACKEND_MAX_TIMEOUT), in seconds
DEFAULT_BACKEND_TIMEOUT = float(SETTINGS_BY_NAME["backend_timeout"].default or 30)
MAX_BACKEND_TIMEOUT = float(SETTINGS_BY_NAME["backend_max_timeout"].default or 300)


def client_document(
    extensions: Iterable[Extension] = (),
    backend: Iterable[Any] = (),
    backend_timeout: float = DEFAULT_BACKEND_TIMEOUT,
    backend_max_timeout: float = MAX_BACKEND_TIMEOUT,
) -> dict[str, Any]:
    """
    The OpenRPC document of every client-callable method and pushed event, with
    the backend methods of C{backend} (declaration objects, PROTOCOL.md 9.2).
    """
    registry = build_registry(tuple(extensions))
    doc = client_openrpc(registry, __version__)
    declared = backend_methods(
        backend, backend_timeout, backend_max_timeout,
        {s.name for caller in Caller for s in registry.methods(caller)},
    )
    if declared:
        doc["methods"] = sorted([*doc["methods"], *declared], key=lambda m: str(m["name"]))
    return doc


def backend_methods(
    declarations: Iterable[Any], default_timeout: float, max_timeout: float,
    server_names: set[str],
) -> list[dict[str, Any]]:
    """The OpenRPC entries of backend method declarations; ValueError on a bad one."""
    methods: dict[str, dict[str, Any]] = {}
    for n, declaration in enumerate(declarations):
        try:
            decl = parse_declaration(jsoncodec.text(declaration), server_names.__contains__)
        except (DeclarationError, TypeError, ValueError) as e:
            name = declaration.get("name") if isinstance(declaration, dict) else None
            raise ValueError(f"backend declaration {n} ({name!r}): {e}") from None
        if decl.name in methods:
            raise ValueError(f"backend method {decl.name!r} is declared twice")
        methods[decl.name] = openrpc_method(decl, default_timeout, max_timeout)
    return list(methods.values())


def dump_json(doc: Any) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, final newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# -- the type model -----------------------------------------------------------


@attrs.frozen
class Field:
    name: str
    type: Type
    required: bool
    description: str = ""


@attrs.frozen
class Type:
    """
    One type: C{kind} is "string", "integer", "number", "boolean", "null",
    "any", "enum" (C{values}), "array" (C{items}), "map" (a JSON object of
    anything), "object" (C{name}, C{fields}, C{extra}) or "union" (C{options}).
    """

    kind: str
    values: tuple[Any, ...] = ()
    items: Type | None = None
    options: tuple[Type, ...] = ()
    name: str = ""
    fields: tuple[Field, ...] = ()
    extra: bool = False
    description: str = ""


@attrs.frozen
class Method:
    name: str
    summary: str
    params: Type  # an object type (possibly without fields)
    result: Type
    requires_auth: bool
    #: a backend method (PROTOCOL.md section 9): progress, cancel, its own deadline
    backend: bool = False
    #: the type of its progress items; None: it sends none
    progress: Type | None = None
    #: its deadline in seconds (x-timeout)
    timeout: float | None = None

    @property
    def takes_params(self) -> bool:
        return bool(self.params.fields) or self.params.extra


@attrs.frozen
class Event:
    name: str
    summary: str
    kind: str  # "room" | "direct"
    data: Type  # an object type


@attrs.frozen
class Model:
    methods: tuple[Method, ...]
    events: tuple[Event, ...]
    #: named object types, in first-use order (methods by name, then events)
    objects: tuple[Type, ...]

    def declared(self) -> list[Type]:
        """
        The object types a client declares: all but the params of methods that take
        none (those methods are generated without a params argument).
        """
        empty = {m.params.name for m in self.methods if not m.takes_params}
        return [t for t in self.objects if t.name not in empty]


def pascal(name: str) -> str:
    """C{"rooms.join"} -> C{"RoomsJoin"}; C{"file_changed"} -> C{"FileChanged"}."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name) if part)


class _Builder:
    def __init__(self, reserved: Iterable[str]) -> None:
        self.objects: dict[str, Type] = {}
        self.reserved = set(reserved)

    def _name(self, wanted: str, shape: Type) -> str:
        """A unique type name: the same shape keeps its name, another gets a suffix."""
        candidate, n = wanted, 1
        while True:
            if candidate in self.reserved:
                pass
            elif candidate not in self.objects:
                return candidate
            elif attrs.evolve(self.objects[candidate], name="") == attrs.evolve(shape, name=""):
                return candidate
            n += 1
            candidate = f"{wanted}{n}"

    def object(self, schema: dict[str, Any], name: str) -> Type:
        props: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        fields = tuple(
            Field(
                key,
                self.type(sub, pascal(name) + pascal(key)),
                key in required,
                str(sub.get("description") or ""),
            )
            for key, sub in sorted(props.items())
        )
        shape = Type(
            "object",
            fields=fields,
            extra=schema.get("additionalProperties", True) is not False,
            description=str(schema.get("description") or ""),
        )
        final = self._name(str(schema.get("title") or name), shape)
        typ = attrs.evolve(shape, name=final)
        self.objects.setdefault(final, typ)
        return typ

    def type(self, schema: dict[str, Any], name: str) -> Type:
        if "oneOf" in schema or "anyOf" in schema:
            options = tuple(self.type(s, name) for s in schema.get("oneOf") or schema["anyOf"])
            return Type("union", options=options)
        if "enum" in schema:
            return Type("enum", values=tuple(schema["enum"]))
        kind = schema.get("type")
        if kind in ("string", "integer", "number", "boolean", "null"):
            return Type(str(kind))
        if kind == "array":
            return Type("array", items=self.type(schema.get("items") or {}, name + "Item"))
        if kind == "object":
            if "properties" in schema:
                return self.object(schema, name)
            return Type("map")
        return Type("any")


def read_model(doc: dict[str, Any], reserved: Iterable[str] = ()) -> Model:
    """The methods, events and named object types of an OpenRPC document."""
    builder = _Builder(reserved)
    methods = []
    for m in sorted(doc.get("methods", ()), key=lambda m: m["name"]):
        base = pascal(m["name"])
        params_schema = {
            "type": "object",
            "title": base + "Params",
            "additionalProperties": m.get("x-additional-params") is True,
            "properties": {p["name"]: p.get("schema") or {} for p in m.get("params", ())},
            "required": [p["name"] for p in m.get("params", ()) if p.get("required")],
        }
        params = builder.object(params_schema, base + "Params")
        result = builder.type((m.get("result") or {}).get("schema") or {}, base + "Result")
        progress = m.get("x-progress")
        timeout = m.get("x-timeout")
        methods.append(
            Method(m["name"], str(m.get("summary") or ""), params, result,
                   m.get("x-requires-auth", True) is not False,
                   backend=m.get("x-backend") is True,
                   progress=None if progress is None else builder.type(progress, base + "Progress"),
                   timeout=float(timeout) if isinstance(timeout, (int, float)) else None)
        )
    events = []
    for e in sorted(doc.get("x-events", ()), key=lambda e: e["name"]):
        data = builder.object(e["schema"], pascal(e["name"]))
        events.append(Event(e["name"], str(e.get("summary") or ""), e["kind"], data))
    return Model(tuple(methods), tuple(events), tuple(builder.objects.values()))


def groups(methods: Iterable[Method]) -> dict[str, list[tuple[str, Method]]]:
    """
    Methods by namespace: C{"rooms.join"} is C{("rooms", "join")}; a name
    without a dot is in the namespace C{""} (methods of the client itself).
    """
    out: dict[str, list[tuple[str, Method]]] = {}
    for method in methods:
        group, _, rest = method.name.partition(".")
        if not rest:
            group, rest = "", method.name
        out.setdefault(group, []).append((rest, method))
    return dict(sorted(out.items()))
