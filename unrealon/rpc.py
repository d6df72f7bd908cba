"""
The method registry: typed JSON-RPC methods, who may call them, dispatch.

A method declares its params and result as attrs classes.  Params are checked
against the class (names, types, patterns, ranges) before the handler runs, so
a handler only ever sees valid values; the same declarations produce the JSON
Schemas of the OpenRPC document (C{rpc.discover}) from which clients are
generated.  A method also declares its callers: browser clients, the backend
(through the Redis ingress), or both.  A client asking for a backend-only
method gets -32601 exactly as for a name that does not exist, so browsers
cannot even learn backend method names.
"""

from __future__ import annotations

import enum
import functools
import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar, Union

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from unrealon.jsonrpc import (
    INTERNAL_ERROR,
    MAX_ERRORS,
    METHOD_NOT_FOUND,
    FieldError,
    RPCError,
    invalid_params,
)

log = Logger(namespace="unrealon.rpc")


class Caller(enum.Flag):
    """Who may call a method."""

    CLIENT = enum.auto()
    BACKEND = enum.auto()
    BOTH = CLIENT | BACKEND


# -- declaring fields -------------------------------------------------------

_META_KEY = "unrealon"


def param(
    *,
    default: Any = attrs.NOTHING,
    factory: Callable[[], Any] | None = None,
    description: str | None = None,
    pattern: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    identifier: bool = False,
) -> Any:
    """
    An attrs field with validation constraints and documentation.

    The constraints are checked by L{validate_params} and written into the
    JSON Schema; they are not attrs validators, so building instances in
    trusted code stays cheap.  An C{identifier} is a string that may arrive
    as a JSON number, taken then as its decimal string (backend ids).
    """
    meta = {
        _META_KEY: {
            "description": description,
            "pattern": re.compile(pattern) if pattern is not None else None,
            "minimum": minimum,
            "maximum": maximum,
            "min_length": min_length,
            "max_length": max_length,
            "identifier": identifier,
        }
    }
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta)
    return attrs.field(default=default, metadata=meta)


@attrs.frozen
class NoParams:
    """Params of a method that takes none."""


# -- validation -------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if origin in (list, tuple) or tp in (list, tuple):
        return "an array"
    if origin is dict or tp is dict or attrs.has(tp):
        return "an object"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return "a valid value"


#: declared types a JSON value of exactly that type satisfies as it is
_PLAIN_TYPES = frozenset({str, int, float, bool})

#: typing.get_origin, cached per declared type
_origin: Callable[[Any], Any] = functools.cache(typing.get_origin)


@functools.cache
def _is_optional(tp: Any) -> tuple[bool, Any]:
    # cached: validation asks this of the same few declared types on every call
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            inner = args[0] if len(args) == 1 else Union[tuple(args)]
            return True, inner
    return False, tp


def _enum_member(tp: type[enum.Enum], value: Any) -> enum.Enum | None:
    """The member of C{tp} whose value is C{value}; None if there is none (a type error follows)."""
    try:
        return tp(value)
    except (ValueError, TypeError):
        return None


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check C{value} against type C{tp}; return the typed value."""
    if type(value) is tp and tp in _PLAIN_TYPES:
        return value  # the common case, first
    if tp is Any or tp is object:
        return value
    optional, inner = _is_optional(tp)
    if optional:
        if value is None:
            return None
        return _convert(inner, value, path)
    origin = _origin(tp)
    if tp is str:
        if isinstance(value, str):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        member = _enum_member(tp, value)
        if member is not None:
            return member
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, list):
            args = typing.get_args(tp)
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if (origin is tuple or tp is tuple) else items
    elif origin is dict or tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
    elif attrs.has(tp):
        if isinstance(value, dict):
            return _build(tp, value, path + ".")
    elif origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
    raise _Invalid([FieldError(path, f"must be {_type_name(tp)}")])


def _check_constraints(field: attrs.Attribute, value: Any, path: str) -> None:  # type: ignore[type-arg]
    meta = field.metadata.get(_META_KEY)
    if not meta or value is None:
        return
    pattern = meta["pattern"]
    if pattern is not None and isinstance(value, str) and not pattern.fullmatch(value):
        raise _Invalid([FieldError(path, f"must match {pattern.pattern}")])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise _Invalid([FieldError(path, f"must be >= {meta['minimum']}")])
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise _Invalid([FieldError(path, f"must be <= {meta['maximum']}")])
    if isinstance(value, (str, list, tuple)):
        if meta["min_length"] is not None and len(value) < meta["min_length"]:
            raise _Invalid([FieldError(path, f"must have length >= {meta['min_length']}")])
        if meta["max_length"] is not None and len(value) > meta["max_length"]:
            raise _Invalid([FieldError(path, f"must have length <= {meta['max_length']}")])


@functools.cache
def _fields_of(cls: type) -> tuple[tuple[attrs.Attribute, ...], frozenset[str]]:  # type: ignore[type-arg]
    """A params class's fields with their types resolved, once per class (hot path)."""
    attrs.resolve_types(cls)
    fields = attrs.fields(cls)
    return tuple(fields), frozenset(f.name for f in fields)


def _build(cls: type, raw: dict[str, Any], prefix: str = "", extra: bool = False) -> Any:
    fields, names = _fields_of(cls)
    if not raw and not fields:
        return cls()
    errors: list[FieldError] = []
    kwargs: dict[str, Any] = {}
    if not extra:
        for key in raw:
            if key not in names:
                errors.append(FieldError(prefix + str(key), "unknown parameter"))
                if len(errors) >= MAX_ERRORS:
                    break  # more would not be shown (data.errors is capped)
    for f in fields:
        path = prefix + f.name
        if f.name not in raw:
            if f.default is attrs.NOTHING:
                errors.append(FieldError(path, "is required"))
            continue
        value = raw[f.name]
        meta = f.metadata.get(_META_KEY)
        if meta and meta["identifier"] and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        try:
            value = _convert(f.type, value, path)
            _check_constraints(f, value, path)
            kwargs[f.name] = value
        except _Invalid as e:
            errors.extend(e.errors)
    if errors:
        raise _Invalid(errors)
    return cls(**kwargs)


ParamsT = TypeVar("ParamsT")


def validate_params(cls: type[ParamsT], raw: dict[str, Any]) -> ParamsT:
    """
    Build C{cls} from the JSON object C{raw}, or raise -32602 listing every
    problem found (PROTOCOL.md section 3: C{data.errors}).
    """
    try:
        return typing.cast(ParamsT, _build(cls, raw))
    except _Invalid as e:
        raise invalid_params(e.errors) from None


def validate_params_with_extras(
    cls: type[ParamsT], raw: dict[str, Any]
) -> tuple[ParamsT, dict[str, Any]]:
    """
    Like L{validate_params}, but unknown names are kept and returned apart
    (the event catalogue passes extra fields through in C{data}).
    """
    try:
        instance = typing.cast(ParamsT, _build(cls, raw, extra=True))
    except _Invalid as e:
        raise invalid_params(e.errors) from None
    names = {f.name for f in attrs.fields(cls)}  # type: ignore[arg-type]
    return instance, {k: v for k, v in raw.items() if k not in names}


_SCALARS = (str, int, float, bool, type(None))


@functools.cache
def attrs_names(cls: type) -> tuple[str, ...] | None:
    """The field names of an attrs class (None for any other type), once per type."""
    return tuple(f.name for f in attrs.fields(cls)) if attrs.has(cls) else None


class JSONValues(list[Any]):
    """
    A list whose items are JSON values already (decoded from JSON text, or
    L{unrealon.jsoncodec.RawJSON}, like a join's replayed events): L{to_json} takes it as it is instead of
    walking every nested dict, which was a third of a rejoin's CPU in a
    reconnect storm with 20 replayed events.
    """


def to_json(value: Any) -> Any:
    """Turn a result (attrs instances, enums, tuples) into JSON values."""
    if isinstance(value, _SCALARS):
        return value
    if value.__class__ is JSONValues:
        return list(value)  # a plain list: the encoder passes subclasses through
    names = attrs_names(value.__class__)
    if names is not None:
        return {name: to_json(getattr(value, name)) for name in names}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


# -- JSON Schema ------------------------------------------------------------


def _is_text(tp: Any) -> bool:
    """Whether a declared type is a string, optional or not (its lengths are maxLength)."""
    return tp is str or _is_optional(tp) == (True, str)


def schema_for(tp: Any, field: attrs.Attribute | None = None) -> dict[str, Any]:  # type: ignore[type-arg]
    """JSON Schema (draft 2020-12 subset OpenRPC uses) for a declared type."""
    schema: dict[str, Any]
    optional, inner = _is_optional(tp)
    if optional:
        schema = {"oneOf": [schema_for(inner), {"type": "null"}]}
    elif tp is Any or tp is object:
        schema = {}
    elif tp is str:
        schema = {"type": "string"}
    elif tp is bool:
        schema = {"type": "boolean"}
    elif tp is int:
        schema = {"type": "integer"}
    elif tp is float:
        schema = {"type": "number"}
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        schema = {"type": "string", "enum": [m.value for m in tp]}
    elif typing.get_origin(tp) is typing.Literal:
        schema = {"enum": list(typing.get_args(tp))}
    elif typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        schema = {"type": "array", "items": schema_for(args[0]) if args else {}}
    elif typing.get_origin(tp) is dict or tp is dict:
        schema = {"type": "object"}
    elif attrs.has(tp):
        schema = object_schema(tp)
    else:
        schema = {}
    if field is not None:
        meta = field.metadata.get(_META_KEY) or {}
        if meta.get("description"):
            schema["description"] = meta["description"]
        if meta.get("pattern") is not None:
            # JSON Schema patterns search; the server full-matches: anchor them
            schema["pattern"] = f"^(?:{meta['pattern'].pattern})$"
        for key, name in (
            ("minimum", "minimum"),
            ("maximum", "maximum"),
            ("min_length", "minLength" if _is_text(tp) else "minItems"),
            ("max_length", "maxLength" if _is_text(tp) else "maxItems"),
        ):
            if meta.get(key) is not None:
                schema[name] = meta[key]
        if field.default is not attrs.NOTHING and not isinstance(
            field.default, attrs.Factory  # type: ignore[arg-type]
        ):
            schema["default"] = to_json(field.default)
    return schema


def object_schema(
    cls: type, additional: bool = False, defaults_present: bool = False
) -> dict[str, Any]:
    """
    The schema of an attrs class.  With C{defaults_present} (event data, which
    carries every field that has a value) a field with a non-null default is
    required too: it is always there.
    """
    attrs.resolve_types(cls)
    props = {f.name: schema_for(f.type, f) for f in attrs.fields(cls)}
    required = [
        f.name
        for f in attrs.fields(cls)
        if f.default is attrs.NOTHING
        or (defaults_present and f.default is not None and not isinstance(f.default, attrs.Factory))  # type: ignore[arg-type]
    ]
    schema: dict[str, Any] = {
        "type": "object",
        "title": cls.__name__,
        "properties": props,
        "additionalProperties": additional,
    }
    if required:
        schema["required"] = required
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split())
    return schema


# -- the registry -----------------------------------------------------------

ContextT = TypeVar("ContextT")
Handler = Callable[[Any, Any], Any | Deferred[Any] | Awaitable[Any]]


@attrs.frozen
class MethodSpec(Generic[ContextT]):
    """One registered method."""

    name: str
    params: type
    result: type | None
    handler: Handler
    callers: Caller
    summary: str = ""
    requires_auth: bool = True
    #: extra params are kept and handed over (the event catalogue's C{data})
    extra_params: bool = False


class Registry:
    """
    The methods this server answers, by name.

    Applications register their own methods with L{Registry.method}; they are
    typed the same way as the built-in ones and appear in C{rpc.discover}.
    """

    def __init__(self) -> None:
        # A name may have one method for clients and another for the backend
        # (presence.list differs in who asks and what it may see).
        self._methods: dict[tuple[str, Caller], MethodSpec[Any]] = {}

    def add(self, spec: MethodSpec[Any]) -> None:
        if spec.name.startswith("rpc.") and spec.name not in ("rpc.discover", "rpc.cancel"):
            raise ValueError("names starting with 'rpc.' are reserved")
        for caller in (Caller.CLIENT, Caller.BACKEND):
            if spec.callers & caller and (spec.name, caller) in self._methods:
                raise ValueError(f"method {spec.name!r} is registered twice")
        for caller in (Caller.CLIENT, Caller.BACKEND):
            if spec.callers & caller:
                self._methods[(spec.name, caller)] = spec

    def method(
        self,
        name: str,
        *,
        params: type = NoParams,
        result: type | None = None,
        callers: Caller = Caller.CLIENT,
        summary: str = "",
        requires_auth: bool = True,
        extra_params: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Decorator registering C{handler(context, params)} under C{name}."""

        def register(handler: Handler) -> Handler:
            self.add(
                MethodSpec(
                    name=name,
                    params=params,
                    result=result,
                    handler=handler,
                    callers=callers,
                    summary=summary or (handler.__doc__ or "").strip().split("\n")[0],
                    requires_auth=requires_auth,
                    extra_params=extra_params,
                )
            )
            return handler

        return register

    def lookup(self, name: str, caller: Caller) -> MethodSpec[Any]:
        """The method C{caller} may call under C{name}, else -32601."""
        spec = self._methods.get((name, caller))
        if spec is None:
            raise RPCError(METHOD_NOT_FOUND)
        return spec

    def has(self, name: str) -> bool:
        """Whether C{name} is a method of the server, for any caller."""
        return any((name, caller) in self._methods for caller in (Caller.CLIENT, Caller.BACKEND))

    def methods(self, caller: Caller) -> list[MethodSpec[Any]]:
        """The methods C{caller} may call, by name."""
        return sorted(
            (s for (_, c), s in self._methods.items() if c == caller),
            key=lambda s: s.name,
        )

    def invoke(
        self, spec: MethodSpec[Any], context: Any, raw_params: dict[str, Any] | list[Any]
    ) -> Any:
        """
        Validate params and run the handler: the JSON result at once for a
        synchronous handler, else a Deferred of it.

        Raises (or fails with) L{RPCError} only.  Positional params (a list)
        are -32602: params are by name.  Anything else a handler raises is
        logged here and becomes -32603 with no detail.  Synchronous handlers
        never touch a Deferred: this is the per-call hot path.
        """
        if not isinstance(raw_params, dict):
            raise invalid_params([FieldError("params", "params must be given by name")])
        if spec.extra_params:
            params: Any = validate_params_with_extras(spec.params, raw_params)
        else:
            params = validate_params(spec.params, raw_params)
        try:
            out = spec.handler(context, params)
        except RPCError:
            raise
        except Exception:
            log.failure("handler for {method} failed", method=spec.name)
            raise RPCError(INTERNAL_ERROR) from None
        if inspect.iscoroutine(out):  # (typing.Coroutine's isinstance costs an ABC walk)
            out = ensureDeferred(out)
        if isinstance(out, Deferred):
            out.addCallback(to_json)
            out.addErrback(_internal_error, spec.name)
            return out
        return to_json(out)

    def dispatch(
        self, spec: MethodSpec[Any], context: Any, raw_params: dict[str, Any] | list[Any]
    ) -> Deferred[Any]:
        """L{invoke}, always as a Deferred."""
        return maybeDeferred(self.invoke, spec, context, raw_params)


def _failed(error: RPCError) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def _internal_error(failure: Failure, method: str) -> Failure:
    # A cancelled call (a caller's deadline) is the caller's business, not a
    # handler failure: pass it on unlogged.
    if failure.check(RPCError, CancelledError):
        return failure
    log.failure("handler for {method} failed", failure, method=method)
    return Failure(RPCError(INTERNAL_ERROR))


def openrpc_document(
    registry: Registry,
    caller: Caller,
    *,
    title: str,
    version: str,
    events: Iterable[tuple[str, type, str, str]] = (),
) -> dict[str, Any]:
    """
    The OpenRPC document of the methods C{caller} may call.

    Events pushed to clients are not methods in OpenRPC's sense; they go in
    the C{x-events} extension (name, summary, kind, schema) so the client
    generator can type its event handlers from the same document: a "room"
    event's schema is that of C{params.data}, a "direct" event's that of
    C{params}.
    """
    methods = []
    for spec in registry.methods(caller):
        params_cls = spec.params
        attrs.resolve_types(params_cls)
        method: dict[str, Any] = {
            "name": spec.name,
            "summary": spec.summary,
            "paramStructure": "by-name",
            "params": [
                {
                    "name": f.name,
                    "required": f.default is attrs.NOTHING,
                    "schema": schema_for(f.type, f),
                }
                for f in attrs.fields(params_cls)
            ],
            "result": {
                "name": "result",
                "schema": object_schema(spec.result) if spec.result else {"type": "object"},
            },
        }
        if not spec.requires_auth:
            method["x-requires-auth"] = False
        methods.append(method)
    doc: dict[str, Any] = {
        "openrpc": "1.3.2",
        "info": {"title": title, "version": version},
        "methods": methods,
    }
    event_list = [
        {
            "name": name,
            "summary": summary,
            "kind": kind,
            "schema": object_schema(cls, additional=kind == "room", defaults_present=True),
        }
        for name, cls, summary, kind in sorted(events, key=lambda e: e[0])
    ]
    if event_list:
        doc["x-events"] = event_list
    return doc
