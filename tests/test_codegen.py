"""
Client generation (unrealon.codegen): deterministic, up to date in the
repository, faithful to the registry (every client method, no backend one),
and every pushed event typed in both clients.  Also the dev token helper.
"""

from __future__ import annotations

import contextlib
import io
import json
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
