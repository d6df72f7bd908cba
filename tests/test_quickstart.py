"""
The README's first steps, walked for real: C{make dev} (on free ports), a
token from C{make token}, a WebSocket client in the browser example's room,
then the publish command C{make dev} printed, run as printed: the event must
reach the client.

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
from tests.helpers.process import NodeProcess, base_env, free_port, http_get, sleep, wait_for

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
#: the room examples/browser joins by default (its workspace field is 42)
ROOM = "workspace:42"


def make(args: list[str], **env: str) -> Deferred[tuple[bytes, bytes, int]]:
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        "make", ["-s", f"VENV={VENV}", *args], env=base_env(**env), path=str(ROOT),
        reactor=reactor,
    )
    d.addTimeout(30, reactor)  # type: ignore[arg-type]
    return d


class QuickstartTests(TestCase):
    timeout = 60

    def start_dev(self, ws_port: int, http_port: int) -> NodeProcess:
        for tool in ("make", "setsid", "sh"):
            if not any(os.access(os.path.join(d, tool), os.X_OK)
                       for d in os.environ.get("PATH", "").split(os.pathsep)):
                raise SkipTest(f"{tool} is not installed")
        log_file = os.path.abspath(self.mktemp()) + ".json"
        argv = ["setsid", "make", "dev", f"VENV={VENV}", f"WS_PORT={ws_port}",
                f"HTTP_PORT={http_port}", f"LOG_FILE={log_file}"]
        proc = NodeProcess()
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            proc, "/usr/bin/env", ["env", *argv], env=base_env(), path=str(ROOT)
        )
        self.addCleanup(self.stop_group, proc, transport.pid)
        return proc

    @inlineCallbacks
    def stop_group(self, proc: NodeProcess, pgid: int) -> Any:
        """SIGTERM the session make dev runs in, SIGKILL what is left after 10 s."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            waited = 0.0
            while proc.running and waited < wait:
                yield sleep(0.1)
                waited += 0.1
            if not proc.running:
                break

    @inlineCallbacks
    def test_make_dev_then_printed_publish(self) -> Any:
        ws_port, http_port = free_port(), free_port()
        proc = self.start_dev(ws_port, http_port)

        def printed() -> Deferred[str]:
            match = re.search(rb"^\s*publish:\s*(.+)$", proc.stdout, re.MULTILINE)
            if match is None:
                return Deferred.fromCoroutine(_fail("make dev printed no publish command"))
            return http_get(http_port, "/live").addCallback(lambda _: match.group(1).decode())

        command = yield wait_for(printed, None, timeout=20)
        self.assertIn(f"{VENV}/bin/unrealon publish", command)
        self.assertIn(ROOM, command)
        out, err, code = yield make(["token", "USER_ID=alice"])
        self.assertEqual(code, 0, err)
        token = out.decode().strip()
        client = yield connect(f"ws://127.0.0.1:{ws_port}/ws?token={token}", port=ws_port)
        self.addCleanup(client.drop)
        yield client.call("rooms.join", {"room": ROOM})
        out, err, code = yield getProcessOutputAndValue(
            "/bin/sh", ["-c", command], env=base_env(), path=str(ROOT), reactor=reactor
        )
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
