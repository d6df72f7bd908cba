"""
The Python client: C{unrealon_client/api.py} (TypedDicts, typed methods,
typed C{on()} overloads) from the OpenRPC model, on top of the hand-written
asyncio runtime C{unrealon_client/runtime.py}.

A backend method (C{x-backend}, PROTOCOL.md section 9) is an async method
with C{on_progress=(item, seq)} and, when it sends progress, a
C{stream_<name>} twin returning a L{BackendStream} of its progress items;
cancelling the awaiting task cancels the call.  Its default timeout is the
declared deadline plus L{BACKEND_TIMEOUT_MARGIN}, so the node's -32012 comes
first.  Params the schema allows beyond its properties go in C{**extra}.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from unrealon.codegen.openrpc import Method, Model, Type, groups, read_model
from unrealon.codegen.typescript import BACKEND_TIMEOUT_MARGIN

#: names the runtime and this module define (a schema title must not shadow them)
RUNTIME_NAMES = (
    "Any", "BackendStream", "Callable", "ClientCore", "DirectEventMeta", "EVENT_KINDS", "GapRange",
    "Literal", "MessageFeed", "MessageHandler", "MessageSnapshot", "MessageStreamError",
    "NotRequired", "RecoveryInfo", "RoomEventMeta", "StateChange", "TypedDict",
    "UnrealonClient", "API_VERSION", "cached_property", "cast", "drop_none", "overload",
)
#: keyword of the generated methods for the per-call timeout
TIMEOUT_ARG = "rpc_timeout"
#: keywords of backend methods: the progress callback, params beyond the schema's properties
PROGRESS_ARG, EXTRA_ARG = "on_progress", "extra"
#: a backend method's twin iterating its progress: stream_<name>
STREAM_PREFIX = "stream_"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def snake(name: str) -> str:
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    text = "_".join(p for p in re.split(r"[^A-Za-z0-9]+", text) if p).lower() or "_"
    if text[0].isdigit():
        text = "_" + text
    return text + "_" if keyword.iskeyword(text) else text


def render(t: Type, q: str = "") -> str:
    """A type annotation; C{q="builtins."} inside classes, where a method may be called list."""
    simple = {"string": "str", "integer": "int", "number": "float", "boolean": "bool",
              "null": "None", "map": f"{q}dict[str, Any]", "any": "Any"}
    if t.kind in simple:
        return simple[t.kind]
    if t.kind == "enum":
        return "Literal[" + ", ".join(repr(v) for v in t.values) + "]"
    if t.kind == "array":
        assert t.items is not None
        return f"{q}list[{render(t.items, q)}]"
    if t.kind == "object":
        return t.name
    seen: list[str] = []
    for option in t.options:
        text = render(option, q)
        if text not in seen:
            seen.append(text)
    return " | ".join(seen) or "Any"


def _doc(text: str, indent: str) -> list[str]:
    text = " ".join(text.split()).replace('"""', "'''").replace("\\", "\\\\")
    return [f'{indent}"""{text}"""'] if text else []


def _typed_dict(t: Type) -> list[str]:
    def annotation(required: bool, typ: Type) -> str:
        return render(typ) if required else f"NotRequired[{render(typ)}]"

    note = " Other keys the producer sent may be present." if t.extra else ""
    if all(_IDENT.match(f.name) and not keyword.iskeyword(f.name) for f in t.fields):
        lines = [f"class {t.name}(TypedDict):", *_doc(t.description + note, "    ")]
        for f in t.fields:
            lines.append(f"    {f.name}: {annotation(f.required, f.type)}")
            lines += _doc(f.description, "    ")
        if len(lines) == 1:
            lines.append("    pass")
        return [*lines, "", ""]
    items = ", ".join(f"{f.name!r}: {annotation(f.required, f.type)}" for f in t.fields)
    return [f"{t.name} = TypedDict({t.name!r}, {{{items}}})", *_doc(t.description + note, ""), "", ""]


def _method(name: str, m: Method) -> list[str]:
    args, passed = ["self", "*"], []
    reserved = {TIMEOUT_ARG, PROGRESS_ARG, EXTRA_ARG} if m.backend else {TIMEOUT_ARG}
    for f in sorted(m.params.fields, key=lambda f: not f.required):
        arg = snake(f.name) if not _IDENT.match(f.name) or keyword.iskeyword(f.name) else f.name
        if arg in reserved:
            raise ValueError(f"{m.name}: a param may not be called {arg!r}")
        typ = render(f.type, "builtins.")
        if f.required:
            args.append(f"{arg}: {typ}")
        else:
            args.append(f"{arg}: {typ if 'None' in typ.split(' | ') else typ + ' | None'} = None")
        passed.append(f"{f.name!r}: {arg}")
    args.append(f"{TIMEOUT_ARG}: float | None = None")
    result = render(m.result, "builtins.")
    timeout = TIMEOUT_ARG
    if m.backend and m.timeout is not None:
        timeout = f"{m.timeout + BACKEND_TIMEOUT_MARGIN!r} if {TIMEOUT_ARG} is None else {TIMEOUT_ARG}"
    if m.backend and m.params.extra:
        passed.append(f"**{EXTRA_ARG}")
    params = f"drop_none({{{', '.join(passed)}}})" if passed else "{}"
    if not m.backend:
        call = f"await self._core.call({m.name!r}, {params}, {TIMEOUT_ARG})"
        return [
            f"    async def {name}({', '.join(args)}) -> {result}:",
            *_doc(m.summary, "        "),
            f"        return cast({result!r}, {call})" if result != "Any" else f"        return {call}",
            "",
        ]
    extra = [f"**{EXTRA_ARG}: Any"] if m.params.extra else []
    if m.progress is None:
        call = f"await self._core.call({m.name!r}, {params}, {timeout})"
        lines = [f"    async def {name}({', '.join(args + extra)}) -> {result}:"]
    else:
        progress = render(m.progress, "builtins.")
        handler = f"{PROGRESS_ARG}: Callable[[{progress}, int], object] | None = None"
        call = f"await self._core.call({m.name!r}, {params}, {timeout}, {PROGRESS_ARG}={PROGRESS_ARG})"
        lines = [f"    async def {name}({', '.join([*args, handler, *extra])}) -> {result}:"]
    lines += [
        *_doc(" ".join([m.summary, "A backend method: cancel the awaiting task to cancel it."]),
              "        "),
        f"        return cast({result!r}, {call})" if result != "Any" else f"        return {call}",
        "",
    ]
    if m.progress is not None:
        stream = f"BackendStream[{progress}, {result}]"
        lines += [
            f"    def {STREAM_PREFIX}{name}({', '.join(args + extra)}) -> {stream}:",
            *_doc(f"{m.name}'s progress items as an async iterator, then .result", "        "),
            f"        return cast({stream!r}, self._core.stream({m.name!r}, {params}, {timeout}))",
            "",
        ]
    return lines


def _group_methods(methods: list[tuple[str, Method]]) -> list[str]:
    """The methods of one namespace; a stream_<name> twin must not take another's name."""
    names = {snake(name) for name, _ in methods}
    out: list[str] = []
    for name, m in methods:
        if m.backend and m.progress is not None and STREAM_PREFIX + snake(name) in names:
            raise ValueError(f"{m.name}: its {STREAM_PREFIX}{snake(name)} would shadow a method")
        out += _method(snake(name), m)
    return out


def generate(doc: dict[str, object]) -> str:
    """The text of unrealon_client/api.py."""
    model: Model = read_model(doc, RUNTIME_NAMES)
    info = doc.get("info") or {}
    version = str(info.get("version", "")) if isinstance(info, dict) else ""
    out = [
        '"""',
        "The typed unrealon-ws client.",
        "",
        "Generated by ``python -m unrealon.codegen`` from clients/openrpc.json. Do not",
        "edit: change the server's registry or the runtime (runtime.py), then generate again.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import builtins",
        "from collections.abc import Callable",
        "from functools import cached_property",
        "from typing import Any, Literal, NotRequired, TypedDict, cast, overload",
        "",
        "from .runtime import (",
        "    ClientCore,",
        "    DirectEventMeta,",
        "    RecoveryInfo,",
        "    RoomEventMeta,",
        "    StateChange,",
        "    drop_none,",
        ")",
        *(["from .streams import BackendStream"] if any(
            m.backend and m.progress is not None for m in model.methods) else []),
        "",
        f"API_VERSION = {version!r}",
        "",
        "",
    ]
    declared = model.declared()
    for t in declared:
        out += _typed_dict(t)
    out.append("#: room: params are {room, cursor, data}; direct: params are the payload")
    out.append("EVENT_KINDS: dict[str, str] = {")
    out += [f"    {e.name!r}: {e.kind!r}," for e in model.events]
    out += ["}", "", ""]
    props: list[str] = []
    for group, methods in groups(model.methods).items():
        cls = "_" + "".join(p.title() for p in snake(group or "root").split("_")) + "Methods"
        out += [f"class {cls}:", "    def __init__(self, core: ClientCore) -> None:",
                "        self._core = core", ""]
        out += _group_methods(methods)
        out += [""]
        props.append(f"{group}:{cls}")
    out += [
        "class UnrealonClient(ClientCore):",
        '    """A typed unrealon-ws client: one method per client-callable RPC."""',
        "",
        "    _event_kinds = EVENT_KINDS",
        "",
    ]
    for entry in props:
        group, cls = entry.split(":")
        prop = snake(group) if group else "methods"
        out += ["    @cached_property", f"    def {prop}(self) -> {cls}:",
                f"        return {cls}(self)", ""]
    listeners = [(e.name, f"Callable[[{e.data.name}, "
                  f"{'RoomEventMeta' if e.kind == 'room' else 'DirectEventMeta'}], object]")
                 for e in model.events]
    listeners += [("state", "Callable[[StateChange], object]"),
                  ("recovery", "Callable[[RecoveryInfo], object]"),
                  ("error", "Callable[[Exception], object]")]
    for name, handler in listeners:
        out += ["    @overload", f"    def on(self, event: Literal[{name!r}], handler: {handler}) "
                "-> Callable[[], None]: ...", ""]
    out += [
        "    def on(self, event: str, handler: Callable[..., object]) -> Callable[[], None]:",
        '        """Listen to a server event or to state/recovery/error; returns the unsubscribe function."""',
        "        return self._subscribe(event, handler)",
        "",
        "",
        "__all__ = [",
        *(f"    {name!r}," for name in sorted(
            ["API_VERSION", "EVENT_KINDS", "UnrealonClient"]
            + [t.name for t in declared]
        )),
        "]",
        "",
    ]
    return "\n".join(out)


def write_sources(doc: dict[str, object], root: Path) -> dict[Path, str]:
    """The generated Python files (relative to root) and their text."""
    del root
    return {Path("clients/python/unrealon_client/api.py"): generate(doc)}

