"""
Backend methods as a worker serves them: the C{@method} decorator that
checks a declaration when it is made (PROTOCOL.md section 9.2), the registry
that holds the methods of one worker (or the process-wide default one the
CLI and the Django command serve), and the code that runs the four kinds of
handlers (sync functions, coroutines, sync and async generators).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from unrealon_backend._call import Call, Cancelled, Result
from unrealon_backend._schema import FORBIDDEN_CLAIMS, check_method_name, check_schema
from unrealon_backend._streams import run_in_thread

__all__ = ["Method", "MethodRegistry", "default_registry", "method"]

F = TypeVar("F", bound=Callable[..., Any])

#: params=None: any params object; the handler's signature is the only check
DEFAULT_PARAMS: dict[str, Any] = {"type": "object", "additionalProperties": True}
#: result=None: any JSON value
DEFAULT_RESULT: dict[str, Any] = {}
#: progress=None on a generator handler: any JSON value per item
DEFAULT_GENERATOR_PROGRESS: dict[str, Any] = {}


@dataclass(frozen=True)
class Method:
    """One declared backend method and its handler; C{kind} is sync, async, gen or asyncgen."""

    name: str
    description: str
    params: dict[str, Any]
    result: dict[str, Any]
    progress: dict[str, Any] | None
    timeout: float | None
    idempotent: bool
    pass_claims: tuple[str, ...]
    handler: Callable[..., Any]
    kind: str

    def declaration(self) -> dict[str, Any]:
        """The declaration object of PROTOCOL.md section 9.2 (C{timeout} absent when None)."""
        declared: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "params": self.params,
            "result": self.result,
            "progress": self.progress,
            "idempotent": self.idempotent,
            "pass_claims": list(self.pass_claims),
        }
        if self.timeout is not None:
            declared["timeout"] = self.timeout
        return declared

    @functools.cached_property
    def _signature(self) -> inspect.Signature:
        # once per method: inspect.signature costs more than a small handler
        return inspect.signature(self.handler)

    def bind_problem(self, params: Mapping[str, Any]) -> str | None:
        """None when the handler accepts C{params} as keyword arguments, else why not."""
        try:
            self._signature.bind(None, **params)
        except TypeError as e:
            return str(e)
        return None

    async def run(self, call: Call, thread_cleanup: Callable[[], None] | None = None) -> Any:
        """
        Run the handler for C{call}; its result, or the exception it raised.
        C{thread_cleanup} runs on the thread of a sync handler once it ends.
        """
        handler, params = self.handler, call.params
        if self.kind == "async":
            return await handler(call, **params)
        if self.kind == "asyncgen":
            return await _drive_async_generator(handler(call, **params), call)
        if self.kind == "gen":
            return await run_in_thread(lambda: _drive_generator(handler(call, **params), call),
                                       thread_cleanup)
        return await run_in_thread(lambda: handler(call, **params), thread_cleanup)


def _kind(handler: Callable[..., Any]) -> str:
    target = inspect.unwrap(handler)
    if inspect.isasyncgenfunction(target):
        return "asyncgen"
    if inspect.iscoroutinefunction(target):
        return "async"
    if inspect.isgeneratorfunction(target):
        return "gen"
    return "sync"


def _drive_generator(gen: Generator[Any, None, Any], call: Call) -> Any:
    """Each yielded value is a progress item; C{return value} (or C{yield Result(v)}) the result."""
    try:
        item = next(gen)
        while not isinstance(item, Result):
            try:
                call.progress(item)
            except Cancelled as cancelled:
                # Cancelled at its yield; a generator that yields on regardless is closed
                gen.throw(cancelled)
                raise cancelled from None
            item = next(gen)
        return item.value
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()


async def _drive_async_generator(agen: AsyncGenerator[Any, None], call: Call) -> Any:
    """Each yielded value is a progress item; C{yield Result(value)} gives the result (else None)."""
    try:
        async for item in agen:
            if isinstance(item, Result):
                return item.value
            try:
                await call.aprogress(item)
            except Cancelled as cancelled:
                # Cancelled at its yield; one that yields on regardless is closed
                try:
                    await agen.athrow(cancelled)
                except StopAsyncIteration:
                    return None
                raise cancelled from None
        return None
    finally:
        await agen.aclose()


def _check_signature(name: str, handler: Callable[..., Any], params: Mapping[str, Any]) -> None:
    """The params schema and the handler's keyword arguments must agree."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot read the handler's signature ({e})") from None
    parameters = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if not parameters or parameters[0].kind not in positional:
        raise ValueError(f"{name}: the handler must take the call as its first argument")
    rest = {p.name: p for p in parameters[1:]
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)
    for prop in params.get("properties", {}):
        if prop not in rest and not takes_any:
            raise ValueError(f"{name}: params declares {prop!r} but the handler has no such argument")
    required = set(params.get("required", []))
    for arg, parameter in rest.items():
        if parameter.default is inspect.Parameter.empty and arg not in required:
            raise ValueError(
                f"{name}: the handler's argument {arg!r} has no default: list it in "
                "params['required'] or give it a default"
            )


class MethodRegistry:
    """The methods one worker serves, by name."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def method(self, name: str, *, params: Mapping[str, Any] | None = None,
               result: Mapping[str, Any] | None = None,
               progress: Mapping[str, Any] | None = None, description: str = "",
               timeout: float | None = None, idempotent: bool = False,
               pass_claims: Iterable[str] = ()) -> Callable[[F], F]:
        """
        Declare backend method C{name}, served by the decorated handler
        C{handler(call, **params)}; see L{unrealon_backend.worker} for the
        rules.  Raises C{ValueError} for a declaration the servers would
        ignore (bad name, reserved prefix, schema keyword outside the subset,
        forbidden claim, a params schema the handler's signature disagrees
        with) or a name already declared here.
        """
        check_method_name(name)
        if name in self.methods:
            raise ValueError(f"backend method {name!r} is already declared")
        if not isinstance(description, str):
            raise ValueError(f"{name}: description must be a string")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"{name}: timeout must be a positive number of seconds (or None)")
        if not isinstance(idempotent, bool):
            raise ValueError(f"{name}: idempotent must be True or False")
        claims = tuple(pass_claims) if not isinstance(pass_claims, str) else (pass_claims,)
        for claim in claims:
            if not isinstance(claim, str) or not claim:
                raise ValueError(f"{name}: pass_claims must be claim names (strings)")
            if claim in FORBIDDEN_CLAIMS:
                raise ValueError(f"{name}: the claim {claim!r} is never passed to workers")
        params_schema = dict(params) if params is not None else dict(DEFAULT_PARAMS)
        check_schema(params_schema, f"{name} params")
        types = params_schema.get("type")
        if "object" not in (types if isinstance(types, list) else [types]):
            raise ValueError(f"{name} params: the params schema must have type 'object'")
        result_schema = dict(result) if result is not None else dict(DEFAULT_RESULT)
        check_schema(result_schema, f"{name} result")
        progress_schema = dict(progress) if progress is not None else None
        if progress_schema is not None:
            check_schema(progress_schema, f"{name} progress")

        def register(handler: F) -> F:
            if not callable(handler):
                raise ValueError(f"{name}: the handler must be callable")
            kind = _kind(handler)
            if params is not None:
                _check_signature(name, handler, params_schema)
            item_schema = progress_schema
            if item_schema is None and kind in ("gen", "asyncgen"):
                item_schema = dict(DEFAULT_GENERATOR_PROGRESS)
            self.methods[name] = Method(
                name=name, description=description, params=params_schema, result=result_schema,
                progress=item_schema, timeout=timeout,
                idempotent=idempotent, pass_claims=claims, handler=handler, kind=kind,
            )
            return handler

        return register

    def declarations(self) -> list[dict[str, Any]]:
        """Every declaration, sorted by name."""
        return [self.methods[name].declaration() for name in sorted(self.methods)]


#: the registry C{unrealon_backend.method} adds to; the CLI and the Django command serve it
default_registry = MethodRegistry()
#: C{from unrealon_backend import method}: declare a method of the default registry
method = default_registry.method
