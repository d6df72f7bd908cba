"""
Backend method declarations (PROTOCOL.md section 9.2): what is refused, and
the JSON Schema subset checked differentially -- the server's validator
(L{unrealon.backenddecl}) and the worker's (C{unrealon_backend._schema}) must
each say "fits" exactly when the reference implementation (jsonschema,
draft 2020-12) does, for random schemas of the subset and random values.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from unrealon_backend._schema import validate as worker_validate

from tests.helpers.jsonvalues import json_values
from unrealon.backenddecl import DeclarationError, openrpc_method, parse_declaration, schema_errors

NAMES = st.sampled_from(["a", "b", "c"])
SCALARS = (st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.5, 2.0, -1.5])
           | st.sampled_from(["", "a", "ab", "xyz", "é"]))


def _schemas(children: Any) -> Any:
    """A schema of one to three keywords (more, and nearly every value fails its type check)."""
    kinds = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null"])
    keywords = {
        "type": kinds | st.lists(kinds, min_size=1, max_size=3, unique=True),
        "properties": st.dictionaries(NAMES, children, max_size=3),
        "required": st.lists(NAMES, max_size=3, unique=True),
        "additionalProperties": st.booleans(),
        "items": children,
        "enum": st.lists(SCALARS | st.lists(SCALARS, max_size=2), min_size=1, max_size=4),
        "const": SCALARS,
        "minimum": st.integers(-2, 2) | st.sampled_from([0.5, -0.5]),
        "maximum": st.integers(-2, 2) | st.sampled_from([1.5]),
        "minLength": st.integers(0, 3),
        "maxLength": st.integers(0, 3),
        "pattern": st.sampled_from(["^a", "b$", "[0-9]", "^$", "x+"]),
        "minItems": st.integers(0, 2),
        "maxItems": st.integers(0, 3),
        "description": st.just("d"),
    }

    @st.composite
    def schema(draw: Any) -> dict[str, Any]:
        chosen = draw(st.lists(st.sampled_from(sorted(keywords)), min_size=1, max_size=3,
                               unique=True))
        return {name: draw(keywords[name]) for name in chosen}

    return schema() | st.just({})


schemas = st.recursive(_schemas(st.just({})), _schemas, max_leaves=6)
#: values near the schemas' own vocabulary, so both verdicts come up often
values = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(NAMES, children, max_size=3),
    max_leaves=8,
) | json_values


STRINGS = st.sampled_from(["", "a", "ab", "ba", "abc", "xyz", "zx", "é", "9", "a9", "bb"])


def _kinds_reached(schema: Any) -> list[str]:
    """Without a type: the kinds of value the schema's other keywords look at."""
    kinds = [kind for kind, words in (
        ("string", ("minLength", "maxLength", "pattern")),
        ("number", ("minimum", "maximum")),
        ("integer", ("minimum", "maximum")),
        ("array", ("items", "minItems", "maxItems")),
        ("object", ("properties", "required", "additionalProperties")),
    ) if any(word in schema for word in words)]
    return kinds or ["object", "array", "string", "integer", "number", "boolean", "null"]


@st.composite
def value_for(draw: Any, schema: Any, depth: int = 0) -> Any:
    """
    A value shaped like C{schema} most of the time (so the keywords past
    the type check are reached), anything at all otherwise.
    """
    if depth > 3 or draw(st.integers(0, 9)) == 0:
        return draw(values)
    kinds = schema.get("type", _kinds_reached(schema))
    kind = draw(st.sampled_from(kinds if isinstance(kinds, list) else [kinds]))
    if "enum" in schema and draw(st.booleans()):
        return draw(st.sampled_from(schema["enum"]))
    if kind == "string":
        return draw(STRINGS)
    if kind == "integer":
        return draw(st.integers(-3, 3))
    if kind == "number":
        return draw(st.integers(-3, 3) | st.sampled_from([0.5, 1.5, -0.5, 2.0]))
    if kind == "boolean":
        return draw(st.booleans())
    if kind == "null":
        return None
    if kind == "array":
        return draw(st.lists(value_for(schema.get("items", {}), depth + 1), max_size=3))
    properties = schema.get("properties", {})
    value = {}
    for name in ["a", "b", "c"]:
        if draw(st.booleans()):
            value[name] = draw(value_for(properties.get(name, {}), depth + 1))
    return value


schema_and_value = schemas.flatmap(lambda schema: st.tuples(st.just(schema), value_for(schema)))


def reference_fits(schema: dict[str, Any], value: Any) -> bool:
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


class SubsetDifferentialTests(SynchronousTestCase):
    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(schema_and_value)
    def test_server_validator_agrees_with_jsonschema(self, case: Any) -> None:
        schema, value = case
        expected = reference_fits(schema, value)
        errors = schema_errors(schema, value)
        self.assertEqual(not errors, expected, f"schema {schema!r} value {value!r}: {errors}")

    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(schema_and_value)
    def test_worker_validator_agrees_with_jsonschema(self, case: Any) -> None:
        schema, value = case
        expected = reference_fits(schema, value)
        errors = worker_validate(value, schema, "")
        self.assertEqual(not errors, expected, f"schema {schema!r} value {value!r}: {errors}")

    def test_json_equality_in_enum(self) -> None:
        """true is not 1, [true] is not [1], 1 is 1.0 (JSON's equality, not Python's)."""
        for schema, value, fits in (
            ({"enum": [1]}, True, False),
            ({"enum": [[1]]}, [True], False),
            ({"enum": [{"a": 1}]}, {"a": True}, False),
            ({"enum": [1]}, 1.0, True),
            ({"const": [0]}, [False], False),
        ):
            self.assertEqual(reference_fits(schema, value), fits)
            self.assertEqual(not schema_errors(schema, value), fits, (schema, value))
            self.assertEqual(not worker_validate(value, schema, ""), fits, (schema, value))


def declaration(**fields: Any) -> str:
    return json.dumps({"name": "app.run", **fields})


class DeclarationTests(SynchronousTestCase):
    def refused(self, text: str, why: str) -> None:
        with self.assertRaises(DeclarationError) as caught:
            parse_declaration(text, lambda name: name == "app.server_side")
        self.assertIn(why, str(caught.exception))

    def test_refusals(self) -> None:
        """Each rule of section 9.2 refuses, saying which."""
        self.refused("{", "not JSON")
        self.refused("[]", "not a JSON object")
        for name in ("App.run", "app", "app.", "app.Run", "1.x", "app..x"):
            self.refused(json.dumps({"name": name}), "name must match")
        for name in ("auth.x", "system.x", "rpc.x", "rooms.x", "presence.x", "connections.x",
                     "app.server_side"):
            self.refused(json.dumps({"name": name}), "of the server's own")
        self.refused(declaration(params={"oneOf": []}), "'oneOf' is not in the supported subset")
        self.refused(declaration(params={"type": "array"}), "params must be an object schema")
        self.refused(declaration(result={"type": "decimal"}), "type must be one of")
        self.refused(declaration(params={"properties": {"x": {"pattern": "("}}}),
                     "pattern does not compile")
        self.refused(declaration(progress={"minLength": -1}), "non-negative integer")
        self.refused(declaration(params={"additionalProperties": {}}), "true or false")
        for timeout in (0, -1, "5", True, None):
            if timeout is not None:
                self.refused(declaration(timeout=timeout), "positive number")
        self.refused(declaration(idempotent="yes"), "true or false")
        self.refused(declaration(pass_claims="info"), "list of claim names")
        deep: dict[str, Any] = {}
        for _ in range(40):
            deep = {"items": deep}
        self.refused(declaration(result=deep), "nested deeper")

    def test_defaults_and_claims(self) -> None:
        """Absent fields take their defaults; token-describing claims are never passed."""
        decl = parse_declaration(declaration(pass_claims=["org", "sub", "exp", "jti", "info"]))
        self.assertEqual(decl.pass_claims, ("org", "info"))
        self.assertIsNone(decl.timeout)
        self.assertFalse(decl.idempotent)
        self.assertIsNone(decl.progress)
        self.assertEqual(decl.deadline_seconds(30, 300), 30)
        capped = parse_declaration(declaration(timeout=900))
        self.assertEqual(capped.deadline_seconds(30, 300), 300)

    def test_openrpc_method(self) -> None:
        """The method as rpc.discover and the code generator show it."""
        decl = parse_declaration(declaration(
            description="Runs it",
            params={"type": "object", "properties": {"x": {"type": "integer"}, "y": {}},
                    "required": ["x"], "additionalProperties": False},
            progress={"type": "string"}, timeout=900, idempotent=True))
        method = openrpc_method(decl, 30, 300)
        self.assertEqual(method, {
            "name": "app.run", "summary": "Runs it", "paramStructure": "by-name",
            "params": [{"name": "x", "required": True, "schema": {"type": "integer"}},
                       {"name": "y", "required": False, "schema": {}}],
            "result": {"name": "result", "schema": {}},
            "x-backend": True, "x-progress": {"type": "string"}, "x-timeout": 300,
            "x-idempotent": True,
        })
        open_params = parse_declaration(declaration())
        self.assertIs(openrpc_method(open_params, 30, 300)["x-additional-params"], True)
