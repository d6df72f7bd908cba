"""
The C{unrealon} command (the console script in the test's virtualenv) against
a running node, C{unrealon token}, and C{--version} of the command and of
both runners (real processes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jwt
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.helpers.apiclient import API_KEY
from tests.helpers.node import SECRET, connect, start_node
from tests.helpers.process import base_env, free_port, spawn
from unrealon import __version__
from unrealon.rpc import Caller

ROOT = Path(__file__).resolve().parent.parent
UNREALON = Path(sys.executable).parent / "unrealon"
ROOM = "workspace:42"


def run_cli(args: list[str], **env: str) -> Deferred[tuple[bytes, bytes, int]]:
    """(stdout, stderr, exit code) of C{unrealon args}, with a minimal environment."""
    if not UNREALON.exists():
        raise AssertionError(f"{UNREALON} is missing: run make install (console_scripts)")
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        str(UNREALON), args, env=base_env(**env), path=str(ROOT), reactor=reactor
    )
    d.addTimeout(30, reactor)  # type: ignore[arg-type]
    return d


class CommandTests(TestCase):
    """unrealon publish / call / methods against a node in this process."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.running = yield start_node(self, api_keys=API_KEY)
        self.url = f"http://127.0.0.1:{self.running.http_port}"
        self.client = yield self.running.connect(self._token("alice"))
        yield self.client.call("rooms.join", {"room": ROOM})

    def _token(self, user: str) -> str:
        return jwt.encode({"sub": user, "exp": 2**31 - 1, "rooms": ["*"]}, SECRET,
                          algorithm="HS256")

    @inlineCallbacks
    def next_event(self) -> Any:
        while True:
            message = yield self.client.next()
            if not message.get("method", "").startswith("presence."):
                return message

    @inlineCallbacks
    def test_publish(self) -> Any:
        """publish ROOM EVENT --data JSON plus fields: the result on stdout, the event in the room."""
        out, err, code = yield run_cli(
            ["publish", "--url", self.url, ROOM, "demo.hello", "--data", '{"text": "hi"}',
             "who=cli", "n:=2"],
            UNREALON_API_KEY=API_KEY,
        )
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        self.assertEqual(result["room"], ROOM)
        event = yield self.next_event()
        self.assertEqual(event["method"], "demo.hello")
        self.assertEqual(event["params"], {"room": ROOM, "cursor": result["cursor"],
                                           "data": {"text": "hi", "who": "cli", "n": 2}})

    @inlineCallbacks
    def test_call(self) -> Any:
        """call METHOD with KEY=VALUE params; --api-key on the command line."""
        out, err, code = yield run_cli(
            ["call", "workspace.file_changed", "workspace_id=42", "path=src/a.py",
             "change=modified", "--url", self.url, "--api-key", API_KEY,
             "--idempotency-key", "cli-1"],
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["room"], ROOM)
        event = yield self.next_event()
        self.assertEqual(event["params"]["data"],
                         {"workspace_id": "42", "path": "src/a.py", "change": "modified"})
        out, err, code = yield run_cli(
            ["call", "presence.online", 'user_ids:=["alice", "bob"]', "--url", self.url],
            UNREALON_API_KEY=f"{API_KEY},another-key-0123456789",
        )
        self.assertEqual((code, json.loads(out)), (0, {"online": ["alice"]}), err)

    @inlineCallbacks
    def test_errors(self) -> Any:
        """Each failure: exit 1 and one line on stderr saying what went wrong."""
        cases: list[tuple[list[str], dict[str, str], str]] = [
            (["call", "workspace.file_changed", "workspace_id=42", "--url", self.url],
             {"UNREALON_API_KEY": API_KEY}, "HTTP 400 invalid_params: Invalid params: path"),
            (["publish", ROOM, "e", "--url", self.url, "--api-key", "wrong-key-0123456789"],
             {}, "HTTP 401 unauthorized"),
            (["call", "rooms.join", "room=x", "--url", self.url], {"UNREALON_API_KEY": API_KEY},
             "HTTP 404 method_not_found"),
            (["publish", ROOM, "e", "--url", self.url], {}, "no API key"),
            (["publish", ROOM, "e", "--url", f"http://127.0.0.1:{free_port()}"],
             {"UNREALON_API_KEY": API_KEY}, "cannot reach"),
            (["publish", ROOM, "e", "--data", "{oops", "--url", self.url],
             {"UNREALON_API_KEY": API_KEY}, "--data is not JSON"),
            (["publish", ROOM, "e", "--data", "[1]", "--url", self.url],
             {"UNREALON_API_KEY": API_KEY}, "--data must be a JSON object"),
            (["call", "publish", "oops", "--url", self.url], {"UNREALON_API_KEY": API_KEY},
             "is not KEY=VALUE"),
        ]
        for args, env, expected in cases:
            out, err, code = yield run_cli(args, **env)
            lines = err.decode().strip().splitlines()
            self.assertEqual((code, out), (1, b""), (args, err))
            self.assertEqual(len(lines), 1, (args, err))
            self.assertIn(expected, lines[0])
            self.assertNotIn(API_KEY, lines[0])
        out, err, code = yield run_cli(["token", "alice", "--bogus"])
        self.assertEqual(code, 2, err)

    @inlineCallbacks
    def test_methods_and_help(self) -> Any:
        """`unrealon methods` lists the server's backend methods; --help lists the catalogue."""
        names = [s.name for s in self.running.node.registry.methods(Caller.BACKEND)]
        out, err, code = yield run_cli(["methods", "--url", self.url])
        self.assertEqual(code, 0, err)
        self.assertEqual([line.split()[0] for line in out.decode().splitlines()], names)
        for args in (["--help"], ["call", "--help"]):
            out, err, code = yield run_cli(args)
            self.assertEqual(code, 0, err)
            for name in names:
                self.assertIn(name, out.decode())


class TokenTests(TestCase):
    @inlineCallbacks
    def test_token(self) -> Any:
        """unrealon token: sub, ttl, rooms (space- or comma-separated), info; a node accepts it."""
        out, err, code = yield run_cli(
            ["token", "alice", "--ttl", "120", "--rooms", "workspace:*,session:1", "user:alice",
             "--info", '{"name": "Alice"}', "--secret", SECRET],
        )
        self.assertEqual(code, 0, err)
        token = out.decode().strip()
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        self.assertEqual(claims["sub"], "alice")
        self.assertEqual(claims["exp"] - claims["iat"], 120)
        self.assertEqual(claims["rooms"], ["workspace:*", "session:1", "user:alice"])
        self.assertEqual(claims["info"], {"name": "Alice"})
        running = yield start_node(self)
        client = yield connect(running.url(token), port=running.ws_port)
        self.addCleanup(client.drop)
        joined = yield client.call("rooms.join", {"room": "workspace:7"})
        self.assertEqual(joined["room"], "workspace:7")
        out, err, code = yield run_cli(["token"], JWT_SECRET=SECRET)
        self.assertEqual(code, 0, err)
        claims = jwt.decode(out.decode().strip(), SECRET, algorithms=["HS256"])
        self.assertEqual((claims["sub"], claims["rooms"]), ("dev", ["*"]))
        self.assertNotIn("info", claims)

    @inlineCallbacks
    def test_token_refusals(self) -> Any:
        """What the server would refuse is refused here: exit 1, one line."""
        cases: list[tuple[list[str], str]] = [
            (["token", "bad user"], "not a valid sub"),
            (["token", "x" * 129], "not a valid sub"),
            (["token", "alice", "--info", "[1, 2]"], "must be a JSON object"),
            (["token", "alice", "--info", "{nope"], "--info is not JSON"),
            (["token", "alice", "--info", json.dumps({"bio": "x" * 1100})], "at most 1024"),
            (["token", "alice", "--ttl", "0"], "--ttl must be a positive"),
            (["token", "alice", "--rooms", "work space"], ""),
            (["token", "alice", "--rooms", "bad/room"], "can match no room"),
        ]
        for args, expected in cases:
            out, err, code = yield run_cli(args, JWT_SECRET=SECRET)
            if not expected:  # space-separated patterns are two patterns: fine
                self.assertEqual(code, 0, err)
                continue
            lines = err.decode().strip().splitlines()
            self.assertEqual((code, out, len(lines)), (1, b"", 1), (args, err))
            self.assertIn(expected, lines[0])
        out, err, code = yield run_cli(["token", "alice"])
        self.assertEqual(code, 1)
        self.assertIn("JWT_SECRET", err.decode())

    @inlineCallbacks
    def test_python_m(self) -> Any:
        """python -m unrealon is the unrealon command (where its script is not on the PATH)."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "unrealon", "token", "bob"], env=base_env(JWT_SECRET=SECRET),
            path=str(ROOT), reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(jwt.decode(out.strip(), SECRET, algorithms=["HS256"])["sub"], "bob")


class VersionTests(TestCase):
    @inlineCallbacks
    def test_versions(self) -> Any:
        """unrealon --version, twist unrealon-ws --version and twistd unrealon-ws --version."""
        out, err, code = yield run_cli(["--version"])
        self.assertEqual((code, out.decode().strip()), (0, f"unrealon {__version__}"), err)
        for runner in ("twist", "twistd"):
            proc = spawn(self, runner, ["--version"])
            status = yield proc.wait_ended(30)
            self.assertEqual(status, (0, None), proc.output())
            self.assertEqual(proc.stdout.decode().strip(), f"unrealon-ws {__version__}")

    @inlineCallbacks
    def test_bad_api_key_stops_startup(self) -> Any:
        """
        A key under 16 characters: both runners exit non-zero with one line
        naming UNREALON_API_KEY and --api-key, never the key.
        """
        for runner in ("twist", "twistd"):
            proc = spawn(
                self, runner,
                ["--ws", f"tcp:{free_port()}:interface=127.0.0.1",
                 "--http", f"tcp:{free_port()}:interface=127.0.0.1"],
                env=base_env(JWT_SECRET=SECRET, UNREALON_API_KEY=f"{API_KEY},tiny-key-9"),
            )
            code, _ = yield proc.wait_ended(30)
            lines = proc.stderr.decode().strip().splitlines()
            self.assertNotEqual(code, 0, proc.output())
            self.assertEqual(len(lines), 1, proc.output())
            self.assertIn("UNREALON_API_KEY", lines[0])
            self.assertIn("--api-key", lines[0])
            self.assertNotIn("tiny-key-9", proc.output())
            self.assertNotIn(API_KEY, proc.output())
