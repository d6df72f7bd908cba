"""
L{unrealon.extensions}: an extension that cannot load says why -- the
module that is missing, the error its import raised -- for the node (one
line, exit 2) and for the client generator alike.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers.process import base_env, spawn
from unrealon.extensions import ExtensionError, load_extension


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        sys.path.insert(0, self.directory)
        self.addCleanup(sys.path.remove, self.directory)

    def module(self, name: str, source: str) -> None:
        with open(os.path.join(self.directory, f"{name}.py"), "w") as f:
            f.write(source)
        self.addCleanup(sys.modules.pop, name, None)

    def test_a_missing_module_inside_the_extension_is_named(self) -> None:
        self.module("ext_missing_dep", "import nosuchmodule_xyz\ndef register(r): pass\n")
        with self.assertRaises(ExtensionError) as caught:
            load_extension("ext_missing_dep:register")
        self.assertIn("nosuchmodule_xyz", str(caught.exception))
        self.assertIn("ModuleNotFoundError", str(caught.exception))

    def test_an_error_raised_by_the_import_is_shown(self) -> None:
        self.module("ext_broken", "x = 1\nraise RuntimeError('bad config in the extension')\n")
        with self.assertRaises(ExtensionError) as caught:
            load_extension("ext_broken:register")
        self.assertIn("RuntimeError: bad config in the extension", str(caught.exception))
        self.assertIn("line 2", str(caught.exception))

    def test_a_missing_function(self) -> None:
        self.module("ext_nofunc", "def other(r): pass\n")
        with self.assertRaises(ExtensionError) as caught:
            load_extension("ext_nofunc:register")
        self.assertIn("has no register", str(caught.exception))

    def test_a_good_extension(self) -> None:
        self.module("ext_good", "def register(registry): registry.seen = True\n")
        self.assertTrue(callable(load_extension("ext_good:register")))


class NodeStartTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_the_node_names_the_real_cause_in_one_line(self) -> Any:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "ext_for_node.py"), "w") as f:
            f.write("import missing_dependency_abc\ndef register(r): pass\n")
        env = base_env(JWT_SECRET="x" * 40, UNREALON_EXTENSIONS="ext_for_node:register",
                       PYTHONPATH=directory)
        proc = spawn(self, "twist", ["--ws", "tcp:0", "--http", "tcp:0"], env=env)
        status = yield proc.wait_ended(20)
        self.assertEqual(status, (2, None), proc.output())
        err = proc.stderr.decode()
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("UNREALON_EXTENSIONS", err)
        self.assertIn("missing_dependency_abc", err)
