"""
Backend method declarations: what a worker says it serves, checked, and the
JSON Schema subset the server checks a browser's params against.

A backend worker writes one declaration per method into Redis (PROTOCOL.md
section 9.2); the nodes read them (L{unrealon.backendrpc}), and the code
generator reads the same objects from a file.  This module is pure data:
parsing a declaration (L{parse_declaration}, refusing anything the contract
does not allow, so a typo in a worker's schema makes the method uncallable
rather than unchecked), validating params (L{Declaration.check_params},
errors in the same C{{field, message}} shape as the server's own methods)
and the method's entry in the OpenRPC document (L{openrpc_method}).

The schema subset is small on purpose: it is what the generated clients can
type and what can be checked in one walk without surprises (no C{$ref}, no
C{oneOf}).  C{pattern} is a Python regular expression searched anywhere in
the string, as JSON Schema's is (ECMA 262 and Python agree on the common
syntax); patterns come from the backend, never from a browser.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from unrealon import jsoncodec
from unrealon.jsonrpc import MAX_ERRORS, FieldError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
#: the server's own namespaces (PROTOCOL.md section 9.2)
RESERVED_PREFIXES = ("auth.", "system.", "rpc.", "rooms.", "presence.", "connections.")
#: claims that describe the token itself, never passed to a worker
UNPASSABLE_CLAIMS = frozenset({"sub", "exp", "iat", "nbf", "aud", "iss", "jti"})

_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "description", "title", "default",
})
#: nesting of a declared schema, at most (a worker's bug must not cost the node a stack)
_MAX_SCHEMA_DEPTH = 32


class DeclarationError(ValueError):
    """A declaration the contract does not allow; the message says why."""


@attrs.frozen
class Declaration:
    """One backend method, as declared and checked."""

    name: str
    description: str
    params: Mapping[str, Any]
    result: Mapping[str, Any]
    progress: Mapping[str, Any] | None
    #: seconds; None: the node's UNREALON_BACKEND_TIMEOUT
    timeout: float | None
    idempotent: bool
    pass_claims: tuple[str, ...]
    #: the declaration as the worker wrote it (compared to notice a change)
    raw: str = attrs.field(eq=False, repr=False)
    _patterns: Mapping[str, re.Pattern[str]] = attrs.field(eq=False, repr=False)

    def check_params(self, params: Mapping[str, Any]) -> list[FieldError]:
        """The reasons C{params} break the params schema (empty: valid), at most MAX_ERRORS."""
        errors: list[FieldError] = []
        _validate(self.params, params, "", errors, self._patterns)
        return errors[:MAX_ERRORS]

    def deadline_seconds(self, default: float, cap: float) -> float:
        """The call's time budget: the declared timeout or the default, never past the cap."""
        return min(self.timeout if self.timeout is not None else default, cap)


def schema_errors(schema: Mapping[str, Any], value: Any) -> list[FieldError]:
    """
    Why C{value} breaks C{schema} (empty: it fits); L{DeclarationError}
    when C{schema} is outside the subset.  For one-off checks and tests: a
    declaration checks its schemas once, when it is parsed.
    """
    patterns: dict[str, re.Pattern[str]] = {}
    _schema(dict(schema), "schema", patterns)
    errors: list[FieldError] = []
    _validate(schema, value, "", errors, patterns)
    return errors[:MAX_ERRORS]


def parse_declaration(
    raw: str | bytes, is_server_method: Callable[[str], bool] = lambda name: False
) -> Declaration:
    """A declaration from its JSON text, or L{DeclarationError} saying what is wrong."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        obj = jsoncodec.decode(text.encode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise DeclarationError("not JSON") from e
    if not isinstance(obj, dict):
        raise DeclarationError("not a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DeclarationError(f"name must match {NAME_RE.pattern}")
    if name.startswith(RESERVED_PREFIXES) or is_server_method(name):
        raise DeclarationError(f"{name} is a name of the server's own")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise DeclarationError("description must be a string")
    patterns: dict[str, re.Pattern[str]] = {}
    params = _schema(obj.get("params", {"type": "object"}), "params", patterns)
    if params.get("type", "object") != "object":
        raise DeclarationError("params must be an object schema (params are by name)")
    result = _schema(obj.get("result", {}), "result", patterns)
    progress_raw = obj.get("progress")
    progress = None if progress_raw is None else _schema(progress_raw, "progress", patterns)
    timeout = obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout) or timeout <= 0
    ):
        raise DeclarationError("timeout must be a positive number of seconds")
    idempotent = obj.get("idempotent", False)
    if not isinstance(idempotent, bool):
        raise DeclarationError("idempotent must be true or false")
    pass_claims = obj.get("pass_claims", [])
    if not isinstance(pass_claims, list) or not all(isinstance(c, str) for c in pass_claims):
        raise DeclarationError("pass_claims must be a list of claim names")
    return Declaration(
        name=name, description=description, params=params, result=result, progress=progress,
        timeout=None if timeout is None else float(timeout), idempotent=idempotent,
        pass_claims=tuple(c for c in pass_claims if c not in UNPASSABLE_CLAIMS),
        raw=text, patterns=patterns,
    )


# -- the schema subset --------------------------------------------------------------


def _schema(
    schema: Any, where: str, patterns: dict[str, re.Pattern[str]], depth: int = 0
) -> dict[str, Any]:
    """Check one (sub)schema uses only the subset; compile its patterns into C{patterns}."""
    if not isinstance(schema, dict):
        raise DeclarationError(f"{where}: a schema must be a JSON object")
    if depth > _MAX_SCHEMA_DEPTH:
        raise DeclarationError(f"{where}: nested deeper than {_MAX_SCHEMA_DEPTH}")
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise DeclarationError(f"{where}: keyword {unknown[0]!r} is not in the supported subset")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in _TYPES for k in kinds):
        raise DeclarationError(f"{where}: type must be one of {sorted(_TYPES)} or a list of them")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise DeclarationError(f"{where}: properties must be an object")
    for key, sub in properties.items():
        _schema(sub, f"{where}.{key}", patterns, depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise DeclarationError(f"{where}: required must be a list of names")
    if not isinstance(schema.get("additionalProperties", True), bool):
        raise DeclarationError(f"{where}: additionalProperties must be true or false")
    if "items" in schema:
        _schema(schema["items"], f"{where}[]", patterns, depth + 1)
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise DeclarationError(f"{where}: enum must be a list")
    for bound in ("minimum", "maximum"):
        value = schema.get(bound)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DeclarationError(f"{where}: {bound} must be a number")
    for bound in ("minLength", "maxLength", "minItems", "maxItems"):
        value = schema.get(bound)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise DeclarationError(f"{where}: {bound} must be a non-negative integer")
    pattern = schema.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise DeclarationError(f"{where}: pattern must be a string")
        try:
            patterns[pattern] = re.compile(pattern)
        except re.error as e:
            raise DeclarationError(f"{where}: pattern does not compile ({e})") from e
    return schema


def _type_matches(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float))  # number


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON means it: 1 == 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _validate(
    schema: Mapping[str, Any], value: Any, path: str, errors: list[FieldError],
    patterns: Mapping[str, re.Pattern[str]],
) -> None:
    """Append why C{value} breaks C{schema} (field paths as the server's methods give them)."""
    if len(errors) >= MAX_ERRORS:
        return
    field = path or "params"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_type_matches(k, value) for k in kinds):
            errors.append(FieldError(field, "must be " + " or ".join(kinds)))
            return
    if "const" in schema and not _json_equal(schema["const"], value):
        errors.append(FieldError(field, "must be " + jsoncodec.text(schema["const"])))
    if "enum" in schema and not any(_json_equal(option, value) for option in schema["enum"]):
        errors.append(FieldError(field, "must be one of "
                                 + ", ".join(jsoncodec.text(o) for o in schema["enum"])))
    if isinstance(value, dict):
        _validate_object(schema, value, path, errors, patterns)
    elif isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(FieldError(field, f"must have at least {schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(FieldError(field, f"must have at most {schema['maxItems']} items"))
        items = schema.get("items")
        if items is not None:
            for i, item in enumerate(value):
                _validate(items, item, f"{path}[{i}]", errors, patterns)
    elif isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(FieldError(field, f"must have length >= {schema['minLength']}"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(FieldError(field, f"must have length <= {schema['maxLength']}"))
        pattern = schema.get("pattern")
        if pattern is not None and not patterns[pattern].search(value):
            errors.append(FieldError(field, f"must match {pattern}"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(FieldError(field, f"must be >= {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(FieldError(field, f"must be <= {schema['maximum']}"))


def _validate_object(
    schema: Mapping[str, Any], value: dict[str, Any], path: str, errors: list[FieldError],
    patterns: Mapping[str, re.Pattern[str]],
) -> None:
    prefix = path + "." if path else ""
    properties: Mapping[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            errors.append(FieldError(prefix + name, "is required"))
    if schema.get("additionalProperties", True) is False:
        for key in value:
            if key not in properties:
                errors.append(FieldError(prefix + key, "unknown parameter"))
                if len(errors) >= MAX_ERRORS:
                    return
    for key, sub in properties.items():
        if key in value:
            _validate(sub, value[key], prefix + key, errors, patterns)


# -- the OpenRPC document -----------------------------------------------------------


def openrpc_method(decl: Declaration, default_timeout: float, max_timeout: float) -> dict[str, Any]:
    """The method's entry in the OpenRPC document, with the backend's extension fields."""
    properties: Mapping[str, Any] = decl.params.get("properties", {})
    required = set(decl.params.get("required", ()))
    method: dict[str, Any] = {
        "name": decl.name,
        "paramStructure": "by-name",
        "params": [
            {"name": key, "required": key in required, "schema": dict(sub)}
            for key, sub in properties.items()
        ],
        "result": {"name": "result", "schema": dict(decl.result)},
        "x-backend": True,
        "x-progress": None if decl.progress is None else dict(decl.progress),
        "x-timeout": decl.deadline_seconds(default_timeout, max_timeout),
        "x-idempotent": decl.idempotent,
    }
    if decl.description:
        method["summary"] = decl.description
    if decl.params.get("additionalProperties", True) is not False:
        method["x-additional-params"] = True
    return method
