"""
The backend package (C{backend/}) as a Django project gets it: installed
with one command into a fresh virtual environment that has nothing else,
then publishing to a real node through a private Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers.cluster import Tap
from tests.helpers.node import mint_token, start_node
from tests.helpers.redis_server import start_redis

ROOT = Path(__file__).resolve().parent.parent

PUBLISH = """
import sys
from unrealon_backend import Publisher
publisher = Publisher(sys.argv[1])
print(publisher.file_changed(42, "src/app.py", "modified", size=3))
"""

NO_SERVER = """
import importlib.util, json, sys
print(json.dumps({name: importlib.util.find_spec(name) is not None
                  for name in ("twisted", "autobahn", "txredisapi", "attrs", "unrealon")}))
"""


class BackendPackageTests(TestCase):
    timeout = 240

    @inlineCallbacks
    def test_installs_alone_and_publishes_to_a_node(self) -> Any:
        venv = Path(self.mktemp()).absolute()
        yield deferToThread(subprocess.run, [sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        installed = yield deferToThread(
            subprocess.run,
            [str(python), "-m", "pip", "install", "--quiet", str(ROOT / "backend")],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
        )
        self.assertEqual(installed.returncode, 0, installed.stderr)
        # only redis-py came with it: none of the server's dependencies
        found = subprocess.run([str(python), "-c", NO_SERVER], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": ""}, check=True)
        self.assertEqual(json.loads(found.stdout), {
            "twisted": False, "autobahn": False, "txredisapi": False, "attrs": False,
            "unrealon": False,
        })
        # the catalogue it carries is the server's, a file of its own once installed
        catalogue = subprocess.run(
            [str(python), "-c", "import importlib.resources as r; "
             "print(r.files('unrealon_backend').joinpath('catalogue.json').read_text())"],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""},
        )
        self.assertEqual(json.loads(catalogue.stdout),
                         json.loads((ROOT / "unrealon" / "catalogue.json").read_text()))

        server = yield start_redis(self)
        running = yield start_node(self, redis_url=server.url)
        tap = Tap((yield running.connect(mint_token("dev", rooms=["workspace:*"]))))
        self.addCleanup(tap.client.drop)
        yield tap.join("workspace:42")
        published = yield deferToThread(
            subprocess.run, [str(python), "-c", PUBLISH, server.url],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
        )
        self.assertEqual(published.returncode, 0, published.stderr)
        event = yield tap.client.next(timeout=10)
        self.assertEqual(event["method"], "workspace.file_changed")
        self.assertEqual(event["params"]["data"],
                         {"workspace_id": "42", "path": "src/app.py", "change": "modified",
                          "size": 3})
