"""
The compiled TypeScript client in a real browser: headless Chromium opens the
example page (examples/browser) served by the test node, joins
``workspace:42``, and must show who is present and an event the "backend"
publishes from a separate connection.

Chromium is Debian's (``apt-get install -y chromium``), driven by
playwright-core (an npm devDependency; it downloads no browser) from
clients/typescript/e2e/browser.mjs, which prints what the DOM showed; the
assertions on the DOM are here.  Skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers.backendnode import start_backend_node
from tests.helpers.node import SECRET
from tests.helpers.testserver import require_node_modules, run_node, start_test_node

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


class BrowserExampleTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_example_page_shows_presence_and_live_events(self) -> Any:
        if not os.path.exists(CHROMIUM):
            raise SkipTest(f"{CHROMIUM} is absent: apt-get update && apt-get install -y chromium")
        require_node_modules("playwright-core", "ws")
        server = yield start_test_node(reactor, SECRET)
        self.addCleanup(server.stop)
        info = server.info()
        with tempfile.TemporaryDirectory() as scratch:
            env = {
                "UNREALON_TEST_WS_URL": info["ws_url"],
                "UNREALON_TEST_HTTP_URL": info["http_url"],
                "CHROMIUM": CHROMIUM,
                "HOME": scratch,  # Chromium's profile and crash files stay out of the real home
            }
            out, err, code = yield run_node(["clients/typescript/e2e/browser.mjs"], env)
        lines = out.decode("utf-8", "replace").strip().splitlines()
        report = (out + err).decode("utf-8", "replace")[-4000:]
        self.assertTrue(lines, report)
        dom = json.loads(lines[-1])
        self.assertEqual((code, dom.get("ok")), (0, True), report)
        self.assertEqual(dom["state"], "open")
        self.assertIn("alice", dom["status"])
        self.assertEqual(dom["presenceWithBob"], ["alice", "bob"])
        self.assertEqual(dom["presence"], ["alice"])  # bob left: presence.left reached the page
        self.assertEqual([e["event"] for e in dom["events"]], ["workspace.file_changed"])
        self.assertIn("src/main.py", dom["events"][0]["text"])
        self.assertEqual([line for line in dom["logs"] if "error" in line.lower()], [])


class BrowserBackendTaskTests(TestCase):
    """
    The example page's "Backend task" panel against a node with Redis and a
    worker serving examples/backend_methods.py (clients/typescript/e2e/browser-backend.mjs).
    """

    timeout = 120

    @inlineCallbacks
    def test_backend_task_shows_progress_and_cancels(self) -> Any:
        if not os.path.exists(CHROMIUM):
            raise SkipTest(f"{CHROMIUM} is absent: apt-get update && apt-get install -y chromium")
        require_node_modules("playwright-core")
        backend = yield start_backend_node(self)
        with tempfile.TemporaryDirectory() as scratch:
            env = {**backend.env(), "CHROMIUM": CHROMIUM, "HOME": scratch}
            out, err, code = yield run_node(["clients/typescript/e2e/browser-backend.mjs"], env)
        lines = out.decode("utf-8", "replace").strip().splitlines()
        report = (out + err).decode("utf-8", "replace")[-4000:] + "\n" + backend.worker.output()
        self.assertTrue(lines, report)
        dom = json.loads(lines[-1])
        self.assertEqual((code, dom.get("ok")), (0, True), report)
        self.assertGreaterEqual(dom["progressBeforeCancel"], 3)
        self.assertRegex(dom["runningText"], r"^\d+ / 1000$")
        self.assertEqual(dom["cancelled"], {"state": "cancelled", "text": "cancelled"})
        self.assertLess(dom["progressAtCancel"], 1000)
        self.assertEqual(dom["progressAfterCancel"], dom["progressAtCancel"])  # nothing after the cancel
        self.assertEqual(dom["done"], {"state": "done", "text": "done: counted 3"})
        self.assertEqual(dom["progressDone"], [3, 3])
        self.assertEqual([line for line in dom["logs"] if "error" in line.lower()], [])
