"""
Client generation (unrealon.codegen): deterministic, up to date in the
repository, faithful to the registry (every client method, no backend one),
and every pushed event typed in both clients.  Also the dev token helper.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jwt
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from unrealon.codegen import __main__ as cli
from unrealon.codegen import python as pygen
from unrealon.codegen import typescript as tsgen
from unrealon.codegen.openrpc import client_document, dump_json, read_model
from unrealon.devtoken import mint
from unrealon.events import client_events
from unrealon.rpc import Caller
from unrealon.service import build_registry

ROOT = Path(__file__).resolve().parents[1]
TS_INDEX = Path("clients/typescript/src/index.ts")
PY_API = Path("clients/python/unrealon_client/api.py")


def _extension_with(name: str) -> Any:
    def extend(registry: Any) -> None:
        registry.method(name)(lambda call, params: {})

    return extend


class DocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.doc = client_document()

    def test_every_client_method_and_no_backend_method(self) -> None:
        registry = build_registry()
        client = {s.name for s in registry.methods(Caller.CLIENT)}
        backend_only = {s.name for s in registry.methods(Caller.BACKEND)} - client
        names = [m["name"] for m in self.doc["methods"]]
        self.assertEqual(set(names), client)
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual(set(names) & backend_only, set())
        self.assertIn("connections.disconnect", backend_only)  # the check is not vacuous
        self.assertFalse([n for n in names if n.startswith("test.")])

    def test_committed_document_is_the_registry_one(self) -> None:
        committed = json.loads((ROOT / "clients/openrpc.json").read_text())
        self.assertEqual(committed, json.loads(dump_json(self.doc)))

    def test_events_are_the_catalogue(self) -> None:
        self.assertEqual(
            [(e["name"], e["kind"]) for e in self.doc["x-events"]],
            sorted((name, kind) for name, _, _, kind in client_events()),
        )

    def test_json_is_sorted_and_stable(self) -> None:
        text = dump_json(self.doc)
        self.assertEqual(text, dump_json(json.loads(text)))
        self.assertTrue(text.endswith("}\n"))
        self.assertEqual(text, dump_json(client_document()))


class GeneratedSourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.doc = json.loads(dump_json(client_document()))
        self.files = cli.sources(client_document(), ROOT)

    def test_generation_is_deterministic(self) -> None:
        again = cli.sources(client_document(), ROOT)
        self.assertEqual(self.files, again)
        for text in self.files.values():
            self.assertNotRegex(text, r"20\d\d-\d\d-\d\dT")  # no timestamps

    def test_every_event_is_typed_in_typescript(self) -> None:
        ts = self.files[TS_INDEX]
        model = read_model(self.doc, tsgen.RUNTIME_TYPES)
        for event in model.events:
            meta = "RoomEventMeta" if event.kind == "room" else "DirectEventMeta"
            self.assertRegex(ts, rf'"{re.escape(event.name)}": \(\w+: {event.data.name}, meta: {meta}\) => void;')
            self.assertIn(f'  "{event.name}": "{event.kind}",', ts)
            block = ts[ts.index(f"export interface {event.data.name} {{"):]
            block = block[: block.index("\n}\n")]
            for field in event.data.fields:
                self.assertIn(f"  {field.name}{'' if field.required else '?'}: ", block)

    def test_every_event_is_typed_in_python(self) -> None:
        py = self.files[PY_API]
        model = read_model(self.doc, pygen.RUNTIME_NAMES)
        for event in model.events:
            meta = "RoomEventMeta" if event.kind == "room" else "DirectEventMeta"
            self.assertIn(
                f"def on(self, event: Literal[{event.name!r}], "
                f"handler: Callable[[{event.data.name}, {meta}], object])",
                py,
            )
            block = py[py.index(f"class {event.data.name}(TypedDict):"):]
            block = block[: block.index("\n\n\n")]
            for field in event.data.fields:
                self.assertRegex(block, rf"\n    {field.name}: " + ("" if field.required else "NotRequired\\["))

    def test_every_method_is_typed_in_both_clients(self) -> None:
        ts, py = self.files[TS_INDEX], self.files[PY_API]
        for method in self.doc["methods"]:
            self.assertIn(f'this.call("{method["name"]}", ', ts)
            self.assertIn(f"self._core.call({method['name']!r}, ", py)
        self.assertIn("join: (params: RoomsJoinParams, options?: CallOptions): Promise<JoinResult> =>", ts)
        self.assertIn("async def join(self, *, room: str, since: str | None = None, token: str | None = None", py)

    def test_generated_python_imports(self) -> None:
        namespace: dict[str, Any] = {}
        sys.path.insert(0, str(ROOT / "clients/python"))
        self.addCleanup(sys.path.remove, str(ROOT / "clients/python"))
        exec("import unrealon_client as m", namespace)
        module = namespace["m"]
        self.assertEqual(set(module.EVENT_KINDS), {e["name"] for e in self.doc["x-events"]})

    def test_extension_methods_reach_the_clients(self) -> None:
        files = cli.sources(client_document([_extension_with("billing.usage")]), ROOT)
        self.assertIn("readonly billing = {", files[TS_INDEX])
        self.assertIn("def billing(self) -> _BillingMethods:", files[PY_API])

    def test_a_namespace_shadowing_the_client_is_refused(self) -> None:
        doc = client_document([_extension_with("on.something")])
        with self.assertRaises(ValueError):
            cli.sources(doc, ROOT)


class PythonTypesTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_mypy_strict_accepts_right_and_refuses_wrong_use(self) -> Any:
        """The client passes mypy --strict; typecheck/usage.py's expected errors all occur."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "mypy", "--strict", "--python-version", "3.11", "--no-incremental",
             "unrealon_client", "typecheck/usage.py"],
            path=str(ROOT / "clients/python"),
            env=None,
        )
        self.assertEqual(code, 0, (out + err).decode())


class CheckTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not (ROOT / "node_modules/typescript/package.json").exists():
            raise AssertionError("node_modules/typescript missing: run `npm ci` (make install does)")

    @inlineCallbacks
    def test_check_passes_on_the_committed_output(self) -> Any:
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "unrealon.codegen", "--check"], path=str(ROOT), env=None
        )
        self.assertEqual(code, 0, (out + err).decode())
        self.assertIn(b"up to date", out)

    def test_check_lists_stale_files(self) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            shutil.copytree(ROOT / "clients", root / "clients")
            (root / "node_modules").symlink_to(ROOT / "node_modules")
            (root / "clients/openrpc.json").write_text("{}\n")
            with (root / "clients/typescript/dist/index.js").open("a") as f:
                f.write("// edited by hand\n")
            (root / PY_API).unlink()
            stale = cli.check(root, cli.sources(client_document(), root), compile_ts=True)
            self.assertEqual(
                sorted(stale),
                ["clients/openrpc.json", str(PY_API), "clients/typescript/dist/index.js"],
            )
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                self.assertEqual(cli.main(["--check", "--root", str(root), "--no-compile"]), 1)
                self.assertEqual(cli.main(["--root", str(root)]), 0)  # regenerate...
                self.assertEqual(cli.main(["--check", "--root", str(root)]), 0)  # ...and it is fresh
            self.assertIn("stale: clients/openrpc.json", printed.getvalue())


class DevTokenTests(SynchronousTestCase):
    """unrealon.devtoken (make token): HS256, rooms ["*"], one hour."""

    def test_dev_token(self) -> None:
        token = mint("bob", "s" * 32, now=1_000_000)
        claims = jwt.decode(token, "s" * 32, algorithms=["HS256"], options={"verify_exp": False})
        self.assertEqual(claims, {"sub": "bob", "iat": 1_000_000, "exp": 1_003_600, "rooms": ["*"]})


# -- a project's backend methods (--backend-methods) -------------------------------

#: declarations as ``python -m unrealon_backend declarations`` prints them (PROTOCOL.md 9.2)
DECLARATIONS: list[dict[str, Any]] = [
    {
        "name": "demo.count",
        "description": "Count to `to`.",
        "params": {
            "type": "object",
            "properties": {"to": {"type": "integer", "minimum": 1, "maximum": 1000},
                           "delay": {"type": "number", "minimum": 0}},
            "required": ["to"],
            "additionalProperties": False,
        },
        "result": {"type": "object", "properties": {"counted": {"type": "integer"}},
                   "required": ["counted"], "additionalProperties": False},
        "progress": {"type": "object", "properties": {"n": {"type": "integer"}},
                     "required": ["n"], "additionalProperties": False},
        "timeout": 60,
        "idempotent": False,
        "pass_claims": [],
    },
    {"name": "demo.echo", "params": {"type": "object"}, "result": {}, "progress": None,
     "timeout": 1000, "idempotent": True},
]

TS_USAGE = """\
import { UnrealonClient, type DemoCountProgress, type DemoCountResult } from "./dist/index.js";

export async function usage(client: UnrealonClient): Promise<void> {
  const controller = new AbortController();
  const seen: number[] = [];
  const done: DemoCountResult = await client.demo.count(
    { to: 3, delay: 0.1 },
    { signal: controller.signal, timeoutMs: 1000, onProgress: (item: DemoCountProgress, seq: number) => seen.push(item.n + seq) },
  );
  const counted: number = done.counted;
  const echoed: unknown = await client.demo.echo({ anything: [1, 2] }, { signal: controller.signal });
  // @ts-expect-error: `to` is required
  await client.demo.count({});
  // @ts-expect-error: a progress item is {n: number}
  await client.demo.count({ to: 1 }, { onProgress: (item: string) => item });
  // @ts-expect-error: demo.echo sends no progress
  await client.demo.echo({}, { onProgress: () => undefined });
  // @ts-expect-error: demo.count's params are closed
  await client.demo.count({ to: 1, extra: true });
  void counted;
  void echoed;
}
"""

PY_USAGE = '''\
from __future__ import annotations

from unrealon_client import DemoCountProgress, DemoCountResult, UnrealonClient


async def usage(client: UnrealonClient) -> None:
    def progress(item: DemoCountProgress, seq: int) -> None:
        print(item["n"], seq)

    done: DemoCountResult = await client.demo.count(to=3, delay=0.1, on_progress=progress)
    print(done["counted"])
    async with client.demo.stream_count(to=3) as stream:
        async for item in stream:
            n: int = item["n"]
            print(n)
    result: DemoCountResult = stream.result
    print(result, await client.demo.echo(anything=[1, 2]))
    await client.demo.count()  # type: ignore[call-arg]
    await client.demo.count(to="3")  # type: ignore[arg-type]

    def wrong(item: str, seq: int) -> None:
        print(item, seq)

    await client.demo.count(to=3, on_progress=wrong)  # type: ignore[arg-type]
    client.demo.stream_echo()  # type: ignore[attr-defined]
'''


def _backend_root(scratch: str) -> Path:
    """A copy of clients/ (and the pinned node_modules) to generate into."""
    root = Path(scratch)
    shutil.copytree(ROOT / "clients", root / "clients")
    (root / "node_modules").symlink_to(ROOT / "node_modules")
    (root / "decls.json").write_text(json.dumps(DECLARATIONS))
    return root


class BackendMethodsDocumentTests(SynchronousTestCase):
    def test_declarations_become_openrpc_methods(self) -> None:
        doc = client_document(backend=DECLARATIONS)
        names = [m["name"] for m in doc["methods"]]
        self.assertEqual(names, sorted(names))
        count = next(m for m in doc["methods"] if m["name"] == "demo.count")
        self.assertEqual(
            {k: count[k] for k in ("x-backend", "x-progress", "x-timeout", "x-idempotent")},
            {"x-backend": True, "x-progress": DECLARATIONS[0]["progress"], "x-timeout": 60.0,
             "x-idempotent": False},
        )
        self.assertNotIn("x-additional-params", count)
        echo = next(m for m in doc["methods"] if m["name"] == "demo.echo")
        self.assertEqual((echo["x-timeout"], echo["x-additional-params"]), (300.0, True))  # capped
        short = client_document(backend=DECLARATIONS, backend_timeout=5, backend_max_timeout=20)
        self.assertEqual([m["x-timeout"] for m in short["methods"] if m.get("x-backend")], [20.0, 20.0])

    def test_without_declarations_the_document_is_unchanged(self) -> None:
        self.assertEqual(client_document(backend=[]), client_document())
        self.assertFalse([m for m in client_document()["methods"] if m.get("x-backend")])

    def test_bad_declarations_fail_the_build(self) -> None:
        for bad in (
            [{"name": "Demo.Count"}],
            [{"name": "rooms.shout"}],  # the server's namespace
            [{"name": "demo.count", "params": {"type": "object", "oneOf": []}}],  # not in the subset
            [DECLARATIONS[0], DECLARATIONS[0]],  # twice
            ["demo.count"],
        ):
            with self.assertRaises(ValueError, msg=str(bad)):
                client_document(backend=bad)
        with self.assertRaisesRegex(ValueError, "server's own"):
            client_document([_extension_with("billing.usage")], [{"name": "billing.usage"}])

    def test_typed_calls_in_both_clients(self) -> None:
        files = cli.sources(client_document(backend=DECLARATIONS), ROOT)
        ts, py = files[TS_INDEX], files[PY_API]
        self.assertIn("import type { BackendCallOptions, CallOptions,", ts)
        self.assertIn(
            "count: (params: DemoCountParams, options?: BackendCallOptions<DemoCountProgress>): "
            "Promise<DemoCountResult> =>\n"
            '      this.call("demo.count", params, { ...options, timeoutMs: options?.timeoutMs ?? 65000 })',
            ts,
        )
        self.assertIn('echo: (params: DemoEchoParams = {}, options?: Omit<BackendCallOptions, "onProgress">)', ts)
        self.assertIn("from .streams import BackendStream", py)
        self.assertIn(
            "async def count(self, *, to: int, delay: float | None = None, rpc_timeout: float | None = None, "
            "on_progress: Callable[[DemoCountProgress, int], object] | None = None) -> DemoCountResult:", py)
        self.assertIn("65.0 if rpc_timeout is None else rpc_timeout, on_progress=on_progress)", py)
        self.assertIn("def stream_count(self, *, to: int, delay: float | None = None, "
                      "rpc_timeout: float | None = None) -> BackendStream[DemoCountProgress, DemoCountResult]:", py)
        self.assertIn("async def echo(self, *, rpc_timeout: float | None = None, **extra: Any) -> Any:", py)
        self.assertNotIn("stream_echo", py)

    def test_clashing_python_names_are_refused(self) -> None:
        clash = dict(DECLARATIONS[0], name="demo.stream_count")
        with self.assertRaisesRegex(ValueError, "stream_count"):
            cli.sources(client_document(backend=[DECLARATIONS[0], clash]), ROOT)
        param = dict(DECLARATIONS[0], params={"type": "object", "properties": {"on_progress": {}}})
        with self.assertRaisesRegex(ValueError, "on_progress"):
            cli.sources(client_document(backend=[param]), ROOT)


class BackendMethodsBuildTests(TestCase):
    """Generated with --backend-methods: tsc and mypy --strict accept it, and --check agrees."""

    timeout = 180

    def setUp(self) -> None:
        if not (ROOT / "node_modules/typescript/package.json").exists():
            raise AssertionError("node_modules/typescript missing: run `npm ci` (make install does)")

    @inlineCallbacks
    def test_typescript_compiles_and_types_the_backend_calls(self) -> Any:
        with tempfile.TemporaryDirectory() as scratch:
            root = _backend_root(scratch)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                args = ["--root", str(root), "--backend-methods", str(root / "decls.json")]
                self.assertEqual(cli.main(args), 0)  # writes and compiles (tsc failing raises)
                self.assertEqual(cli.main(["--check", *args]), 0)
                self.assertEqual(cli.main(["--check", "--no-compile", "--root", str(root)]), 1)
            self.assertIn("readonly demo: {", (root / "clients/typescript/dist/index.d.ts").read_text())
            ts_dir = root / "clients/typescript"
            (ts_dir / "usage.ts").write_text(TS_USAGE)
            (ts_dir / "usage.json").write_text(json.dumps({
                "extends": "./tsconfig.json",
                "compilerOptions": {"noEmit": True, "rootDir": "."},
                "include": ["usage.ts"],
            }))
            out, err, code = yield getProcessOutputAndValue(
                shutil.which("node") or "node",
                [str(ROOT / "node_modules/typescript/bin/tsc"), "--strict", "-p", str(ts_dir / "usage.json")],
                path=str(ts_dir), env=None,
            )
            self.assertEqual(code, 0, (out + err).decode())

    @inlineCallbacks
    def test_python_api_imports_and_passes_mypy_strict(self) -> Any:
        with tempfile.TemporaryDirectory() as scratch:
            root = _backend_root(scratch)
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(cli.main(["--root", str(root), "--no-compile",
                                           "--backend-methods", str(root / "decls.json")]), 0)
            package = root / "clients/python"
            (package / "backend_usage.py").write_text(PY_USAGE)
            out, err, code = yield getProcessOutputAndValue(
                sys.executable,
                ["-c", "import unrealon_client as m; print(m.UnrealonClient.__name__, "
                       "m.UnrealonClient('ws://x', token='t').demo.stream_count(to=1).__class__.__name__)"],
                path=str(package), env=None,
            )
            self.assertEqual((code, out.split()), (0, [b"UnrealonClient", b"BackendStream"]), err.decode())
            out, err, code = yield getProcessOutputAndValue(
                sys.executable,
                ["-m", "mypy", "--strict", "--python-version", "3.11", "--no-incremental",
                 "unrealon_client", "backend_usage.py"],
                path=str(package), env=None,
            )
            self.assertEqual(code, 0, (out + err).decode())

    @inlineCallbacks
    def test_the_examples_declarations_generate_typed_calls(self) -> Any:
        """``python -m unrealon_backend declarations`` output is what --backend-methods reads."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "unrealon_backend", "declarations", "--handlers", "examples.backend_methods"],
            path=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.assertEqual(code, 0, (out + err).decode())
        files = cli.sources(client_document(backend=json.loads(out)), ROOT)
        self.assertIn("count: (params: DemoCountParams, options?: BackendCallOptions<DemoCountProgress>)",
                      files[TS_INDEX])
        self.assertIn("def stream_count(self, *, to: int, delay: float | None = None", files[PY_API])


class DevTokenMethodsTests(SynchronousTestCase):
    """unrealon.devtoken's methods claim (the browser example's backend task needs it)."""

    def test_methods_claim_only_when_given(self) -> None:
        with_methods = mint("bob", "s" * 32, now=1_000_000, methods=["demo.*"])
        claims = jwt.decode(with_methods, "s" * 32, algorithms=["HS256"], options={"verify_exp": False})
        self.assertEqual(claims["methods"], ["demo.*"])
        plain = jwt.decode(mint("bob", "s" * 32), "s" * 32, algorithms=["HS256"])
        self.assertNotIn("methods", plain)

    def test_a_pattern_that_matches_no_method_is_refused(self) -> None:
        from unrealon.devtoken import TokenError

        with self.assertRaises(TokenError):
            mint("bob", "s" * 32, methods=["Demo Count"])
