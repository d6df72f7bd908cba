"""
scripts/check-prereqs: what make install and make test need, one line per
missing piece, run with a PATH that lacks it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check-prereqs"


class PrereqTests(SynchronousTestCase):
    def bin_with(self, *names: str) -> str:
        """A directory holding links to just these commands (and sh for the script)."""
        directory = Path(self.mktemp())
        directory.mkdir()
        for name in ("sh", *names):
            found = sys.executable if name == "python3" else shutil.which(name)
            if found is None:
                self.skipTest(f"{name} is not on this machine")
            (directory / name).symlink_to(found)
        return str(directory)

    def run_check(self, stage: str, path: str, python: str = "python3") -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/sh", str(SCRIPT), stage], capture_output=True, text=True,
                              env={"PATH": path, "PYTHON": python}, timeout=30)

    def test_everything_there(self) -> None:
        done = self.run_check("test", self.bin_with("python3", "node", "npm", "redis-server"))
        self.assertEqual(done.returncode, 0, done.stderr)

    def test_no_npm(self) -> None:
        done = self.run_check("install", self.bin_with("python3", "node"))
        self.assertEqual(done.returncode, 1)
        lines = [line for line in done.stderr.splitlines() if line.startswith("missing")]
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertIn("missing: npm", lines[0])

    def test_no_redis_server(self) -> None:
        path = self.bin_with("python3", "node", "npm")
        install = self.run_check("install", path)
        self.assertEqual(install.returncode, 0, install.stderr)
        self.assertIn("note: redis-server is not installed", install.stderr)
        test = self.run_check("test", path)
        self.assertEqual(test.returncode, 1)
        self.assertIn("missing: redis-server", test.stderr)

    def test_old_python(self) -> None:
        fake = Path(self.mktemp())
        fake.mkdir()
        old = fake / "python3"
        old.write_text("#!/bin/sh\nexec " + sys.executable + ' -c "import sys; sys.exit(1)" "$@"\n')
        old.chmod(0o755)
        done = self.run_check("install", self.bin_with("node", "npm") + os.pathsep + str(fake),
                              python=str(old))
        self.assertEqual(done.returncode, 1)
        self.assertIn("too old", done.stderr)
