"""
The generated TypeScript client: compiled with ``tsc --strict``, type-checked
usage, and Node's test runner (clients/typescript/test/) against a live node.

The node runs in this process (trial's reactor) with the TEST-ONLY extension;
``node --test`` runs as a child process and gets its URLs through
UNREALON_TEST_WS_URL / UNREALON_TEST_HTTP_URL.  node_modules is not optional
here: CI's ``make install`` runs ``npm ci``, so a missing compiler fails.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.backendnode import start_backend_node
from tests.helpers.node import SECRET
from tests.helpers.testserver import ROOT, require_node_modules, run_node, start_test_node

TSC = "node_modules/typescript/bin/tsc"
TEST_DIR = ROOT / "clients/typescript/test"


def _report(out: bytes, err: bytes, limit: int = 6000) -> str:
    text = (out + b"\n" + err).decode("utf-8", "replace")
    return text[-limit:]


class CompileTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        require_node_modules("typescript", "ws")

    @inlineCallbacks
    def test_tsc_strict_compiles_the_client(self) -> Any:
        """``tsc --strict -p clients/typescript`` succeeds (into a scratch dir)."""
        with tempfile.TemporaryDirectory() as scratch:
            out, err, code = yield run_node(
                [TSC, "--strict", "-p", "clients/typescript", "--outDir", scratch]
            )
            self.assertEqual(code, 0, _report(out, err))
            self.assertTrue((Path(scratch) / "index.js").exists())
            self.assertTrue((Path(scratch) / "index.d.ts").exists())

    @inlineCallbacks
    def test_types_accept_right_and_refuse_wrong_use(self) -> Any:
        """typecheck/usage.ts compiles: typed calls and events, and @ts-expect-error lines."""
        out, err, code = yield run_node([TSC, "--strict", "-p", "clients/typescript/typecheck"])
        self.assertEqual(code, 0, _report(out, err))


class NodeRuntimeTests(TestCase):
    """Each file of clients/typescript/test/ under ``node --test``."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        require_node_modules("typescript", "ws")
        server = yield start_test_node(reactor, SECRET, history_size=50)
        self.addCleanup(server.stop)
        info = server.info()
        self.env = {"UNREALON_TEST_WS_URL": info["ws_url"], "UNREALON_TEST_HTTP_URL": info["http_url"]}

    @inlineCallbacks
    def node_test(self, name: str) -> Any:
        out, err, code = yield run_node(["--test", f"clients/typescript/test/{name}"], self.env)
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, _report(out, err))
        self.assertIn("# fail 0", text)
        self.assertNotIn("# pass 0\n", text)

    def test_calls_and_events(self) -> Any:
        """Typed calls, errors, per-call timeouts, typed events, presence, chunk order."""
        return self.node_test("calls.test.mjs")

    def test_recovery(self) -> Any:
        """Drops under a steady stream: complete sequence, no duplicates; recovered: false."""
        return self.node_test("recovery.test.mjs")

    def test_auth_and_close_codes(self) -> Any:
        """Refresh before exp, 4001/4009 take a new token, 4003 stops, bad fixed token."""
        return self.node_test("auth.test.mjs")

    def test_backend_calls_runtime(self) -> Any:
        """rpc.progress routing and order, AbortSignal -> rpc.cancel, timeouts (scripted socket)."""
        return self.node_test("progress.test.mjs")

    def test_every_node_test_file_is_run_here(self) -> None:
        covered = {"calls.test.mjs", "recovery.test.mjs", "auth.test.mjs", "progress.test.mjs"}
        self.assertEqual({p.name for p in TEST_DIR.glob("*.mjs")}, covered)


class BackendEndToEndTests(TestCase):
    """
    clients/typescript/e2e/backend.test.mjs: backend methods through a node with
    Redis, served by a real worker (L{start_backend_node}).
    """

    timeout = 120

    @inlineCallbacks
    def test_backend_calls_through_node_and_worker(self) -> Any:
        """Discovery, progress in order then result, abort reaches the worker, refusals."""
        require_node_modules("typescript", "ws")
        backend = yield start_backend_node(self)
        out, err, code = yield run_node(["--test", "clients/typescript/e2e/backend.test.mjs"], backend.env())
        text = out.decode("utf-8", "replace")
        report = _report(out, err) + "\n--- worker ---\n" + backend.worker.output()
        self.assertEqual(code, 0, report)
        self.assertIn("# fail 0", text)
        self.assertIn("# pass 4", text, report)
