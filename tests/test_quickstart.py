"""
The README's first steps, walked for real, as the README writes them: the
lines between its C{<!-- quickstart -->} markers are read from README.md and
run (C{make dev} on free ports, given through the environment; C{make token};
the publish command), with a WebSocket client in the room in between: the
event must reach it.  The publish command C{make dev} prints is run too.

C{make dev} runs in a session of its own (C{setsid}), so the cleanup ends
make, its shell and the node together, by that session's process group.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import jwt
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers.node import SECRET, connect
from tests.helpers.process import ChildProcess, base_env, free_port, http_get
from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
#: the room examples/browser joins by default (its workspace field is 42)
ROOM = "workspace:42"


def readme_quickstart() -> list[str]:
    """The command lines of the README's quickstart block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- quickstart\b.*?-->\s*```sh\n(.*?)```\s*<!-- /quickstart -->",
                      text, re.DOTALL)
    if match is None:
        raise AssertionError("README.md has no quickstart block")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line]


def shell(command: str, **env: str) -> Deferred[tuple[bytes, bytes, int]]:
    """C{command} run by sh in the repository, as a reader would paste it."""
    if VENV != ROOT / ".venv":  # the suite runs from another venv: use that one
        command = command.replace(".venv/", f"{VENV}/")
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        "/bin/sh", ["-c", command], env=base_env(VENV=str(VENV), **env), path=str(ROOT),
        reactor=reactor,
    )
    d.addTimeout(30, reactor)  # type: ignore[arg-type]
    return d


def make(args: list[str], **env: str) -> Deferred[tuple[bytes, bytes, int]]:
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        "make", ["-s", f"VENV={VENV}", *args], env=base_env(**env), path=str(ROOT),
        reactor=reactor,
    )
    d.addTimeout(30, reactor)  # type: ignore[arg-type]
    return d


class QuickstartTests(TestCase):
    timeout = 60

    def start_dev(self, command: str, ws_port: int, http_port: int) -> ChildProcess:
        for tool in ("make", "setsid", "sh"):
            if not any(os.access(os.path.join(d, tool), os.X_OK)
                       for d in os.environ.get("PATH", "").split(os.pathsep)):
                raise SkipTest(f"{tool} is not installed")
        log_file = os.path.abspath(self.mktemp()) + ".json"
        env = base_env(VENV=str(VENV), WS_PORT=str(ws_port), HTTP_PORT=str(http_port),
                       LOG_FILE=log_file)
        proc = ChildProcess()
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            proc, "/usr/bin/env", ["env", "setsid", "sh", "-c", command], env=env, path=str(ROOT)
        )
        self.addCleanup(self.stop_group, proc, transport.pid)
        return proc

    @inlineCallbacks
    def stop_group(self, proc: ChildProcess, pgid: int) -> Any:
        """SIGTERM the session make dev runs in, SIGKILL what is left after 10 s."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                yield proc.wait_ended(wait)
                break
            except Exception:  # still running: the next signal
                continue

    @inlineCallbacks
    def test_readme_quickstart(self) -> Any:
        dev, token_line, publish = readme_quickstart()
        self.assertEqual(dev, "make dev")
        ws_port, http_port = free_port(), free_port()
        proc = self.start_dev(dev, ws_port, http_port)

        def printed() -> Deferred[str]:
            match = re.search(rb"^\s*publish:\s*(.+)$", proc.stdout, re.MULTILINE)
            if match is None:
                return Deferred.fromCoroutine(_fail("make dev printed no publish command"))
            return http_get(http_port, "/live").addCallback(lambda _: match.group(1).decode())

        printed_publish = yield wait_until(printed, timeout=20, what="make dev's publish command")
        self.assertIn(f"{VENV}/bin/unrealon publish", printed_publish)
        self.assertIn(ROOM, printed_publish)
        out, err, code = yield shell(token_line)
        self.assertEqual(code, 0, err)
        token = out.decode().strip()
        self.assertEqual(jwt.decode(token, options={"verify_signature": False})["sub"], "alice")
        client = yield connect(f"ws://127.0.0.1:{ws_port}/ws?token={token}", port=ws_port)
        self.addCleanup(client.drop)
        yield client.call("rooms.join", {"room": ROOM})
        # the README's line as written (the port is the only difference, and the
        # command reads it from the environment), then the one make dev printed
        for command, env in ((publish, {"UNREALON_API_URL": f"http://127.0.0.1:{http_port}"}),
                             (printed_publish, {})):
            out, err, code = yield shell(command, **env)
            self.assertEqual(code, 0, (command, err))
            while True:
                event = yield client.next()
                if not event.get("method", "").startswith("presence."):
                    break
            self.assertEqual(event["method"], "demo.hello")
            self.assertEqual(event["params"]["room"], ROOM)
            self.assertEqual(event["params"]["data"], {"text": "hi"})


class MakeTokenTests(TestCase):
    @inlineCallbacks
    def test_make_token_options(self) -> Any:
        """make token takes USER_ID, TTL, ROOMS (space- or comma-separated) and INFO."""
        out, err, code = yield make(
            ["token", "USER_ID=bob", "TTL=90", "ROOMS=workspace:1 session:*",
             'INFO={"name":"Bob"}'],
            JWT_SECRET=SECRET,
        )
        self.assertEqual(code, 0, err)
        claims = jwt.decode(out.decode().strip(), SECRET, algorithms=["HS256"])
        self.assertEqual(claims["sub"], "bob")
        self.assertEqual(claims["exp"] - claims["iat"], 90)
        self.assertEqual(claims["rooms"], ["workspace:1", "session:*"])
        self.assertEqual(claims["info"], {"name": "Bob"})
        out, err, code = yield make(["token", "USER_ID=not valid"], JWT_SECRET=SECRET)
        self.assertNotEqual(code, 0)
        self.assertIn(b"not a valid sub", err)


async def _fail(message: str) -> str:
    raise AssertionError(message)
