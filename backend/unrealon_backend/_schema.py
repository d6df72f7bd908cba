"""
The JSON Schema subset of PROTOCOL.md section 9.2, for backend method
declarations: checking a schema when a method is declared (so a mistake is a
C{ValueError} at import time, not a declaration every node silently ignores)
and checking a value against a schema (the worker checks params, results and
progress items before they leave the process).

Private to the package: L{unrealon_backend.worker} is its user.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

#: the method name rule of PROTOCOL.md section 9.2
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
#: names under these prefixes belong to the server (section 4)
RESERVED_PREFIXES = ("auth.", "system.", "rpc.", "rooms.", "presence.", "connections.")
#: token claims a declaration may never ask for (section 9.2)
FORBIDDEN_CLAIMS = frozenset({"sub", "exp", "iat", "nbf", "aud", "iss", "jti"})

TYPE_NAMES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
#: every keyword the nodes accept; a declaration with another one is ignored by them
KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "description", "title", "default",
})
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")

#: section 3: an error lists at most 20 field errors
MAX_ERRORS = 20


def check_method_name(name: object) -> str:
    """C{name} if it may be declared; otherwise C{ValueError} saying why."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"backend method name {name!r} must match {NAME_PATTERN.pattern} "
            "(lower case, at least two dot-separated parts, e.g. 'ai.ask')"
        )
    for prefix in RESERVED_PREFIXES:
        if name.startswith(prefix):
            raise ValueError(f"backend method name {name!r}: the prefix {prefix!r} is the server's")
    return name


def check_schema(schema: object, where: str) -> None:
    """
    Raise C{ValueError} naming C{where} (e.g. C{"ai.ask params.properties.x"})
    unless C{schema} is a schema of the section 9.2 subset.
    """
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where}: a schema must be a dict, got {type(schema).__name__}")
    unknown = sorted(str(key) for key in schema if key not in KEYWORDS)
    if unknown:
        raise ValueError(
            f"{where}: keyword(s) {', '.join(unknown)} are not in the schema subset the "
            f"servers accept ({', '.join(sorted(KEYWORDS))})"
        )
    if "type" in schema:
        types = schema["type"]
        names = types if isinstance(types, list) else [types]
        if not names or any(not isinstance(t, str) or t not in TYPE_NAMES for t in names):
            raise ValueError(f"{where}: type must be one of, or a list of, {sorted(TYPE_NAMES)}")
    if "properties" in schema:
        properties = schema["properties"]
        if not isinstance(properties, Mapping):
            raise ValueError(f"{where}: properties must be a dict of schemas")
        for key, sub in properties.items():
            check_schema(sub, f"{where}.properties.{key}")
    if "required" in schema:
        required = schema["required"]
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise ValueError(f"{where}: required must be a list of property names")
    if "additionalProperties" in schema and not isinstance(schema["additionalProperties"], bool):
        raise ValueError(f"{where}: additionalProperties must be true or false (not a schema)")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise ValueError(f"{where}: enum must be a non-empty list")
    for bound in ("minimum", "maximum"):
        if bound in schema and not _is_number(schema[bound]):
            raise ValueError(f"{where}: {bound} must be a number")
    for count in _COUNTS:
        if count in schema and not (_is_integer(schema[count]) and schema[count] >= 0):
            raise ValueError(f"{where}: {count} must be a non-negative integer")
    if "pattern" in schema:
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            raise ValueError(f"{where}: pattern must be a string")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}: pattern {pattern!r} is not a valid regular expression: {e}") from None
    for text in ("description", "title"):
        if text in schema and not isinstance(schema[text], str):
            raise ValueError(f"{where}: {text} must be a string")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _has_type(value: object, name: str) -> bool:
    if name == "object":
        return isinstance(value, Mapping)
    if name == "array":
        return isinstance(value, (list, tuple))
    if name == "string":
        return isinstance(value, str)
    if name == "integer":
        return _is_integer(value)
    if name == "number":
        return _is_number(value)
    if name == "boolean":
        return isinstance(value, bool)
    return value is None  # "null"


def _json_equal(a: object, b: object) -> bool:
    """Equality as JSON sees it, at every depth: true is not 1, [true] is not [1], 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def validate(value: Any, schema: Mapping[str, Any], field: str = "") -> list[dict[str, str]]:
    """
    The ways C{value} breaks C{schema} (a checked schema), as section 3's
    C{data.errors}: a list of C{{"field", "message"}}, empty when it fits,
    at most L{MAX_ERRORS} long.  C{field} is the dotted path of C{value}.
    """
    errors: list[dict[str, str]] = []
    _validate(value, schema, field, errors)
    return errors[:MAX_ERRORS]


def _validate(value: Any, schema: Mapping[str, Any], field: str,
              errors: list[dict[str, str]]) -> None:
    def fail(message: str) -> None:
        errors.append({"field": field, "message": message})

    if len(errors) >= MAX_ERRORS:
        return
    if "type" in schema:
        types = schema["type"]
        names = types if isinstance(types, list) else [types]
        if not any(_has_type(value, name) for name in names):
            fail(f"must be of type {' or '.join(names)}")
            return
    if "const" in schema and not _json_equal(value, schema["const"]):
        fail(f"must be {schema['const']!r}")
    if "enum" in schema and not any(_json_equal(value, option) for option in schema["enum"]):
        fail(f"must be one of {schema['enum']!r}")
    if _is_number(value):
        if "minimum" in schema and value < schema["minimum"]:
            fail(f"must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            fail(f"must be at most {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            fail(f"must be at least {schema['minLength']} characters long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            fail(f"must be at most {schema['maxLength']} characters long")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            fail(f"must match {schema['pattern']!r}")
    if isinstance(value, (list, tuple)):
        if "minItems" in schema and len(value) < schema["minItems"]:
            fail(f"must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            fail(f"must have at most {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                _validate(item, schema["items"], f"{field}[{index}]", errors)
    if isinstance(value, Mapping):
        _validate_object(value, schema, field, errors)


def _validate_object(value: Mapping[str, Any], schema: Mapping[str, Any], field: str,
                     errors: list[dict[str, str]]) -> None:
    prefix = f"{field}." if field else ""
    properties: Mapping[str, Any] = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            errors.append({"field": prefix + name, "message": "is required"})
    for name, item in value.items():
        if name in properties:
            _validate(item, properties[name], prefix + str(name), errors)
        elif schema.get("additionalProperties", True) is False:
            errors.append({"field": prefix + str(name), "message": "is not allowed"})
