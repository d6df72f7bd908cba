"""
The TypeScript client: C{src/index.ts} (types, typed methods, typed events)
from the OpenRPC model, on top of the hand-written runtime C{src/core.ts}
(and C{src/messages.ts}, the streamed messages of PROTOCOL.md section 5.1,
which core.ts re-exports).

C{tsc} compiles both to C{dist/} (see L{unrealon.codegen.__main__}).

A backend method (C{x-backend}, PROTOCOL.md section 9) takes
C{BackendCallOptions<Progress>}: C{onProgress(item, seq)}, an C{AbortSignal},
and a timeout that defaults to its declared deadline plus
L{BACKEND_TIMEOUT_MARGIN}, so the node's -32012 arrives before the client
gives up on its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from unrealon.codegen.openrpc import Method, Model, Type, groups, read_model

#: names the runtime already exports (a schema title must not shadow them)
RUNTIME_TYPES = (
    "AnyEventHandler", "BackendCallOptions", "BackoffOptions", "CallCancelledError",
    "CallOptions", "ProgressHandler", "CallTimeoutError",
    "ClientCore", "ClientOptions", "CloseCodes", "ConnectionClosedError", "ConnectionState",
    "DirectEventMeta", "ErrorCodes", "EventMeta", "GapRange", "LifecycleEvents",
    "MessageFeed", "MessageHandler", "MessageSnapshot", "MessageStreamError", "RecoveryInfo",
    "RoomEventMeta", "RpcError", "StateChange", "TokenProvider", "WebSocketConstructor",
    "WebSocketLike", "decodeJwtPayload", "UnrealonClient", "ServerEvents", "EventName",
    "EventData", "EVENT_KINDS", "API_VERSION",
)

_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
#: seconds a backend call's client timeout adds to its deadline (x-timeout)
BACKEND_TIMEOUT_MARGIN = 5.0


def core_members(core_ts: str) -> set[str]:
    """Member names of the runtime's ClientCore (a method group must not reuse one)."""
    start = core_ts.index("export class ClientCore")
    body = core_ts[start:core_ts.index("\n}\n", start)]
    return set(re.findall(
        r"^  (?:(?:private|readonly|get|async|static)\s+)*([A-Za-z_$][\w$]*)\s*[(:<=!?]",
        body, re.M,
    )) | {"constructor"}


def camel(name: str) -> str:
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", name) if p]
    text = parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:]) if parts else "_"
    return "_" + text if text[0].isdigit() else text


def _key(name: str) -> str:
    return name if _IDENT.match(name) else json.dumps(name)


def render(t: Type) -> str:
    if t.kind in ("string", "boolean", "null"):
        return t.kind
    if t.kind in ("integer", "number"):
        return "number"
    if t.kind == "enum":
        return " | ".join(json.dumps(v) for v in t.values) or "never"
    if t.kind == "array":
        assert t.items is not None
        inner = render(t.items)
        return f"({inner})[]" if " | " in inner else f"{inner}[]"
    if t.kind == "map":
        return "Record<string, unknown>"
    if t.kind == "object":
        return t.name
    if t.kind == "union":
        seen: list[str] = []
        for option in t.options:
            text = render(option)
            if text not in seen:
                seen.append(text)
        return " | ".join(seen)
    return "unknown"


def _doc(text: str, indent: str = "") -> list[str]:
    text = " ".join(text.split()).replace("*/", "*\\/")
    return [f"{indent}/** {text} */"] if text else []


def _interface(t: Type) -> list[str]:
    if not t.fields and not t.extra:
        return [*_doc(t.description), f"export type {t.name} = Record<string, never>;", ""]
    lines = [*_doc(t.description), f"export interface {t.name} {{"]
    for f in t.fields:
        lines += _doc(f.description, "  ")
        lines.append(f"  {_key(f.name)}{'' if f.required else '?'}: {render(f.type)};")
    if t.extra:
        lines.append("  /** other fields the producer sent */")
        lines.append("  [key: string]: unknown;")
    return [*lines, "}", ""]


def _method(name: str, m: Method, indent: str = "    ", end: str = ",") -> list[str]:
    """One typed method, as an object member (or, with end ";", a class field)."""
    result = render(m.result)
    kind, options = "CallOptions", "options"
    if m.backend:
        kind = (f"BackendCallOptions<{render(m.progress)}>" if m.progress
                else 'Omit<BackendCallOptions, "onProgress">')  # it sends no progress
        if m.timeout is not None:
            ms = round((m.timeout + BACKEND_TIMEOUT_MARGIN) * 1000)
            options = f"{{ ...options, timeoutMs: options?.timeoutMs ?? {ms} }}"
    if not m.takes_params:
        args, params = f"options?: {kind}", "{}"
    elif all(not f.required for f in m.params.fields):
        args, params = f"params: {m.params.name} = {{}}, options?: {kind}", "params"
    else:
        args, params = f"params: {m.params.name}, options?: {kind}", "params"
    head = f"readonly {_key(name)} =" if end == ";" else f"{_key(name)}:"
    return [
        *_doc(m.summary, indent),
        f"{indent}{head} ({args}): Promise<{result}> =>",
        f"{indent}  this.call({json.dumps(m.name)}, {params}, {options}) as Promise<{result}>{end}",
    ]


def generate(doc: dict[str, object], core_ts: str) -> str:
    """The text of src/index.ts."""
    model: Model = read_model(doc, RUNTIME_TYPES)
    info = doc.get("info") or {}
    version = str(info.get("version", "")) if isinstance(info, dict) else ""
    members = core_members(core_ts)
    imported = ["CallOptions", "ClientOptions", "DirectEventMeta", "RoomEventMeta"]
    if any(m.backend for m in model.methods):
        imported.insert(0, "BackendCallOptions")
    out = [
        "// Generated by `python -m unrealon.codegen` from clients/openrpc.json. Do not edit:",
        "// change the server's registry or the runtime (core.ts), then generate again.",
        'import { ClientCore } from "./core.js";',
        f'import type {{ {", ".join(imported)} }} from "./core.js";',
        "",
        'export * from "./core.js";',
        "",
        "/** The server version the client was generated from. */",
        f"export const API_VERSION = {json.dumps(version)};",
        "",
    ]
    for t in model.declared():
        out += _interface(t)
    out.append("/** Handlers of the events the server pushes, by event name. */")
    out.append("export interface ServerEvents {")
    for e in model.events:
        meta = "RoomEventMeta" if e.kind == "room" else "DirectEventMeta"
        arg = "data" if e.kind == "room" else "params"
        out += _doc(f"{e.summary} ({e.kind} event)", "  ")
        out.append(f"  {json.dumps(e.name)}: ({arg}: {e.data.name}, meta: {meta}) => void;")
    out += [
        "}",
        "",
        "export type EventName = keyof ServerEvents;",
        "export type EventData<K extends EventName> = Parameters<ServerEvents[K]>[0];",
        "",
        "/** room: params are {room, cursor, data}; direct: params are the payload. */",
        'export const EVENT_KINDS: Readonly<Record<EventName, "room" | "direct">> = {',
        *(f"  {json.dumps(e.name)}: {json.dumps(e.kind)}," for e in model.events),
        "};",
        "",
        "/** A typed unrealon-ws client: one method per client-callable RPC. */",
        "export class UnrealonClient extends ClientCore<ServerEvents> {",
        "  constructor(options: ClientOptions) {",
        "    super(options, EVENT_KINDS);",
        "  }",
    ]
    for group, methods in groups(model.methods).items():
        if not group:
            for name, m in methods:
                prop = camel(name)
                if prop in members:
                    raise ValueError(f"method {m.name!r} would shadow the client's {prop!r}")
                out += ["", *_method(prop, m, "  ", ";")]
            continue
        prop = camel(group)
        if prop in members:
            raise ValueError(f"namespace {group!r} would shadow the client's {prop!r}")
        out += ["", f"  readonly {_key(prop)} = {{"]
        for name, m in methods:
            out += _method(camel(name), m)
        out.append("  } as const;")
    out += ["}", ""]
    return "\n".join(out)


def tsconfig() -> str:
    config = {
        "compilerOptions": {
            "target": "ES2020",
            "module": "ES2020",
            "moduleResolution": "bundler",
            "lib": ["ES2020", "DOM"],
            "types": [],
            "strict": True,
            "noUnusedLocals": True,
            "noImplicitReturns": True,
            "noFallthroughCasesInSwitch": True,
            "declaration": True,
            "newLine": "lf",
            "rootDir": "src",
            "outDir": "dist",
        },
        "include": ["src/*.ts"],
    }
    return json.dumps(config, indent=2) + "\n"


def package_json(version: str) -> str:
    package = {
        "name": "@unrealon/client",
        "version": version,
        "description": "Typed unrealon-ws WebSocket JSON-RPC client, generated from the "
        "server's OpenRPC document. No runtime dependencies.",
        "license": "MIT",
        "type": "module",
        "main": "./dist/index.js",
        "types": "./dist/index.d.ts",
        "exports": {".": {"types": "./dist/index.d.ts", "default": "./dist/index.js"}},
        "files": ["dist", "src"],
        "sideEffects": False,
    }
    return json.dumps(package, indent=2) + "\n"


def write_sources(doc: dict[str, object], root: Path) -> dict[Path, str]:
    """The generated TypeScript files (relative to root) and their text."""
    core = (root / "clients/typescript/src/core.ts").read_text(encoding="utf-8")
    info = doc.get("info") or {}
    version = str(info.get("version", "0.0.0")) if isinstance(info, dict) else "0.0.0"
    return {
        Path("clients/typescript/src/index.ts"): generate(doc, core),
        Path("clients/typescript/tsconfig.json"): tsconfig(),
        Path("clients/typescript/package.json"): package_json(version),
    }
