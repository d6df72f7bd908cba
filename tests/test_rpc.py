"""
The method registry (L{unrealon.rpc}): typed params, who may call what,
dispatch and its error discipline, the OpenRPC document.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from unrealon.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, METHOD_NOT_FOUND, RPCError
from unrealon.rpc import (
    Caller,
    NoParams,
    Registry,
    openrpc_document,
    param,
    to_json,
    validate_params,
    validate_params_with_extras,
)
from unrealon.service import build_registry


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@attrs.frozen
class Inner:
    name: str = param(min_length=1)


@attrs.frozen
class Params:
    room: str = param(pattern=r"[a-z]+:[0-9]+")
    count: int = param(default=1, minimum=1, maximum=10)
    ratio: float = param(default=0.5)
    flag: bool = param(default=False)
    color: Color = param(default=Color.RED)
    mode: Literal["a", "b"] = param(default="a")
    tags: list[str] = param(factory=list, max_length=3)
    inner: Inner | None = param(default=None)
    user_id: str = param(default="", identifier=True)
    extra: dict[str, Any] = param(factory=dict)


def fields_of(error: RPCError) -> dict[str, str]:
    assert error.code == INVALID_PARAMS
    return {e["field"]: e["message"] for e in error.data["errors"]}


class ValidationTests(SynchronousTestCase):
    """Params are checked against their attrs class before a handler runs."""

    def refused(self, raw: dict[str, Any]) -> dict[str, str]:
        with self.assertRaises(RPCError) as raised:
            validate_params(Params, raw)
        return fields_of(raised.exception)

    def test_valid(self) -> None:
        """Valid params build the class, converting where the contract allows."""
        value = validate_params(
            Params,
            {
                "room": "ws:1", "count": 3.0, "ratio": 2, "flag": True, "color": "blue",
                "mode": "b", "tags": ["x"], "inner": {"name": "n"}, "user_id": 42,
                "extra": {"k": [1]},
            },
        )
        self.assertEqual(
            value,
            Params("ws:1", 3, 2.0, True, Color.BLUE, "b", ["x"], Inner("n"), "42", {"k": [1]}),
        )
        self.assertIsInstance(value.count, int)
        self.assertIsInstance(value.ratio, float)

    def test_unknown_and_missing(self) -> None:
        """Unknown names and missing required ones are all reported, together."""
        self.assertEqual(
            set(self.refused({"bogus": 1, "other": 2})), {"bogus", "other", "room"}
        )

    def test_wrong_types(self) -> None:
        """Each mistyped field is reported with its own message; booleans are not numbers."""
        errors = self.refused(
            {
                "room": 1, "count": True, "ratio": "1", "flag": 1, "color": "green",
                "mode": "c", "tags": "x", "inner": [], "extra": [],
            }
        )
        self.assertEqual(
            set(errors),
            {"room", "count", "ratio", "flag", "color", "mode", "tags", "inner", "extra"},
        )
        self.assertEqual(errors["room"], "must be a string")
        self.assertEqual(errors["count"], "must be an integer")
        self.assertEqual(errors["flag"], "must be a boolean")

    def test_constraints(self) -> None:
        """Patterns, ranges and lengths; nested and list paths are named."""
        errors = self.refused(
            {"room": "Bad Room", "count": 11, "tags": ["a", "b", "c", "d"], "inner": {"name": ""}}
        )
        self.assertEqual(set(errors), {"room", "count", "tags", "inner.name"})
        errors = self.refused({"room": "ws:1", "count": 0, "tags": ["a", 2], "inner": {"x": 1}})
        self.assertEqual(set(errors), {"count", "tags[1]", "inner.x", "inner.name"})

    def test_non_integral_float_is_not_int(self) -> None:
        """1.5 is not an integer."""
        self.assertEqual(set(self.refused({"room": "ws:1", "count": 1.5})), {"count"})

    def test_no_params(self) -> None:
        """A method without params accepts {} and refuses any name."""
        self.assertEqual(validate_params(NoParams, {}), NoParams())
        with self.assertRaises(RPCError) as raised:
            validate_params(NoParams, {"x": 1})
        self.assertEqual(fields_of(raised.exception), {"x": "unknown parameter"})

    def test_extras(self) -> None:
        """With extras allowed, unknown names are returned apart instead of refused."""
        value, extras = validate_params_with_extras(Inner, {"name": "n", "a": 1, "b": [2]})
        self.assertEqual(value, Inner("n"))
        self.assertEqual(extras, {"a": 1, "b": [2]})

    @settings(max_examples=200)
    @given(st.dictionaries(st.text(max_size=8), st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=8,
    ), max_size=6))
    def test_anything_validates_or_is_refused(self, raw: dict[str, Any]) -> None:
        """Any JSON object either builds the class or is -32602 with well-formed errors; nothing else."""
        try:
            validate_params(Params, raw)
        except RPCError as e:
            errors = e.data["errors"]
            self.assertTrue(errors)
            for item in errors:
                self.assertEqual(set(item), {"field", "message"})
                self.assertIsInstance(item["field"], str)
                self.assertIsInstance(item["message"], str)


class RegistryTests(SynchronousTestCase):
    """Registration, lookup by caller, dispatch."""

    def setUp(self) -> None:
        self.registry = Registry()

    def test_caller_separation(self) -> None:
        """
        A backend-only method is not found for clients with the very same
        error as a name that does not exist; each caller sees its own methods.
        """
        handler = lambda call, params: None  # noqa: E731
        self.registry.method("client.only")(handler)
        self.registry.method("backend.only", callers=Caller.BACKEND)(handler)
        self.registry.method("both", callers=Caller.BOTH)(handler)
        self.assertEqual(self.registry.lookup("client.only", Caller.CLIENT).name, "client.only")
        self.assertEqual(self.registry.lookup("both", Caller.BACKEND).name, "both")
        errors = []
        for name, caller in (("backend.only", Caller.CLIENT), ("nope", Caller.CLIENT),
                             ("client.only", Caller.BACKEND)):
            with self.assertRaises(RPCError) as raised:
                self.registry.lookup(name, caller)
            errors.append(raised.exception.to_error())
        self.assertEqual(errors, [{"code": METHOD_NOT_FOUND, "message": "Method not found"}] * 3)
        self.assertEqual([s.name for s in self.registry.methods(Caller.CLIENT)], ["both", "client.only"])
        self.assertEqual([s.name for s in self.registry.methods(Caller.BACKEND)], ["backend.only", "both"])

    def test_registration_errors(self) -> None:
        """A name registered twice for one caller, or under the reserved rpc. prefix, is refused."""
        handler = lambda call, params: None  # noqa: E731
        self.registry.method("x")(handler)
        self.assertRaises(ValueError, self.registry.method("x"), handler)
        self.registry.method("x", callers=Caller.BACKEND)(handler)
        self.assertRaises(ValueError, self.registry.method("rpc.mine"), handler)

    def dispatch(self, handler: Any, raw: Any = None, params: type = NoParams) -> Deferred[Any]:
        self.registry.method("m", params=params)(handler)
        spec = self.registry.lookup("m", Caller.CLIENT)
        return self.registry.dispatch(spec, "context", {} if raw is None else raw)

    def test_results(self) -> None:
        """Plain values, Deferreds and coroutines all give the JSON form of the result."""
        seen = []

        def plain(call: Any, params: Any) -> Any:
            seen.append((call, params))
            return Inner("a")

        self.assertEqual(self.successResultOf(self.dispatch(plain)), {"name": "a"})
        self.assertEqual(seen, [("context", NoParams())])
        registry = Registry()
        registry.method("d")(lambda c, p: succeed((Color.BLUE, [Inner("b")])))

        async def coro(call: Any, params: Any) -> Any:
            return {"k": (1, 2)}

        registry.method("c")(coro)
        d = registry.dispatch(registry.lookup("d", Caller.CLIENT), None, {})
        self.assertEqual(self.successResultOf(d), ["blue", [{"name": "b"}]])
        d = registry.dispatch(registry.lookup("c", Caller.CLIENT), None, {})
        self.assertEqual(self.successResultOf(d), {"k": [1, 2]})

    def test_invalid_params_before_handler(self) -> None:
        """Bad params fail with -32602 and the handler never runs; positional params too."""
        calls = []
        d = self.dispatch(lambda c, p: calls.append(p), {"bogus": 1})
        self.assertEqual(self.failureResultOf(d, RPCError).value.code, INVALID_PARAMS)
        spec = self.registry.lookup("m", Caller.CLIENT)
        for positional in ([], ["x"]):
            d = self.registry.dispatch(spec, None, positional)
            error = self.failureResultOf(d, RPCError).value
            self.assertEqual(fields_of(error), {"params": "params must be given by name"})
        self.assertEqual(calls, [])

    def test_rpc_errors_pass_through(self) -> None:
        """An RPCError raised by a handler reaches the caller unchanged."""

        def forbidden(call: Any, params: Any) -> Any:
            raise RPCError(-32003, "Forbidden: not yours", data={"why": "x"})

        error = self.failureResultOf(self.dispatch(forbidden), RPCError).value
        self.assertEqual(error.to_error(), {"code": -32003, "message": "Forbidden: not yours", "data": {"why": "x"}})

    def test_other_errors_become_internal(self) -> None:
        """
        Any other exception -- raised, from a coroutine, through a Deferred --
        is logged and becomes -32603 with the fixed message and no data.
        """

        def raises(call: Any, params: Any) -> Any:
            raise ZeroDivisionError("secret-detail")

        async def coro(call: Any, params: Any) -> Any:
            raise LookupError("secret-detail")

        def deferred(call: Any, params: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            d.errback(OSError("secret-detail"))
            return d

        for handler in (raises, coro, deferred):
            registry = Registry()
            registry.method("m")(handler)
            d = registry.dispatch(registry.lookup("m", Caller.CLIENT), None, {})
            error = self.failureResultOf(d, RPCError).value
            self.assertEqual(error.to_error(), {"code": INTERNAL_ERROR, "message": "Internal error"})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError, LookupError, OSError)), 3)

    def test_to_json(self) -> None:
        """attrs instances, enums, tuples and nested dicts become plain JSON values."""
        self.assertEqual(
            to_json({"a": (Inner("x"), Color.RED), "b": [None, 1.5]}),
            {"a": [{"name": "x"}, "red"], "b": [None, 1.5]},
        )

    def test_json_values_are_taken_as_they_are(self) -> None:
        """A JSONValues list becomes a plain list, its items not walked again."""
        from unrealon import jsoncodec
        from unrealon.rpc import JSONValues

        events = [{"params": {"data": {"seq": i, "tags": ["a", None]}}} for i in range(3)]
        out = to_json({"missed": JSONValues(events)})
        self.assertIs(type(out["missed"]), list)
        self.assertIs(out["missed"][0], events[0])  # the very same dicts
        self.assertEqual(jsoncodec.decode(jsoncodec.encode(out)), {"missed": events})


class DocumentTests(SynchronousTestCase):
    """The OpenRPC document clients are generated from."""

    def test_client_document(self) -> None:
        """
        It lists exactly the client methods of PROTOCOL.md section 4, with
        by-name params, and none of the backend-only names.
        """
        registry = build_registry()
        document = openrpc_document(registry, Caller.CLIENT, title="t", version="1")
        names = {m["name"] for m in document["methods"]}
        self.assertEqual(
            names,
            {"auth.authenticate", "auth.refresh", "system.ping", "system.info", "rpc.discover",
             "rpc.cancel",
             "rooms.join", "rooms.leave", "rooms.list", "presence.list", "presence.count"},
        )
        for method in document["methods"]:
            self.assertEqual(method["paramStructure"], "by-name")
        join = next(m for m in document["methods"] if m["name"] == "rooms.join")
        params = {p["name"]: p for p in join["params"]}
        self.assertTrue(params["room"]["required"])
        self.assertFalse(params["since"]["required"])
        self.assertEqual(params["room"]["schema"]["type"], "string")
        ping = next(m for m in document["methods"] if m["name"] == "system.ping")
        self.assertIs(ping.get("x-requires-auth"), False)

    def test_extension_methods_appear(self) -> None:
        """An application's method, registered through an extension, is in the client document."""

        def extend(registry: Registry) -> None:
            registry.method("app.echo", params=Inner, result=Inner, summary="Echo")(lambda c, p: p)

        document = openrpc_document(build_registry((extend,)), Caller.CLIENT, title="t", version="1")
        echo = next(m for m in document["methods"] if m["name"] == "app.echo")
        self.assertEqual(echo["summary"], "Echo")
        self.assertEqual(echo["params"][0]["schema"]["minLength"], 1)
