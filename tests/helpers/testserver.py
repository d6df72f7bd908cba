"""
A node for the client tests: memory engine, free ports, TEST-ONLY methods,
and the example page and compiled TypeScript client over HTTP.

    JWT_SECRET=... python -m tests.helpers.testserver [--history-size N]

prints one JSON line when ready -- C{ws_url}, C{http_url} (static files and
C{/token}), C{health_url}, C{example_url}, C{pid} -- and stops (closing
connections with 1001) and exits 0 on SIGTERM.  Without C{JWT_SECRET} it uses
the test secret of L{tests.helpers.node}.  The trial tests use the same pieces
in-process (L{start_test_node}).

The extension below is for tests only: it is never part of the production
registry (L{unrealon.service.build_registry} does not know it), so neither
C{rpc.discover} nor the generated clients ever show these methods:

- C{test.publish {room, event, data, count}}: publish through
  C{node.broker.publish}, as the backend would; with C{count} > 1, C{count}
  events whose data carry C{n} = 0..count-1.  Result C{{room, cursor}}.
- C{test.stream {room, event, count, interval_ms, data}}: publish C{count}
  events (C{n} = 0..count-1) one every C{interval_ms}, in the background.
- C{test.drop {code, reason, delay_ms}}: after the reply, abort this
  connection's TCP (no C{code}), or close it with C{code} (1001 as a server
  going away does, or 4001, 4003, 4009, ...).
- C{test.sleep {ms}}: reply after C{ms} milliseconds (call timeouts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import jwt
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from unrealon.backendapi import PublishParams
from unrealon.config import load_config
from unrealon.dispatch import ClientCall
from unrealon.names import ROOM_NAME
from unrealon.rpc import Caller, Registry, param
from unrealon.service import makeService

ROOT = Path(__file__).resolve().parents[2]


@attrs.frozen
class RepeatedPublishParams(PublishParams):
    """The backend's publish params, and how many times to publish."""

    count: int = param(default=1, minimum=1, maximum=10000)


@attrs.frozen
class StreamParams:
    room: str = param(pattern=ROOM_NAME)
    event: str = param(min_length=1)
    count: int = param(minimum=1, maximum=10000)
    interval_ms: int = param(default=10, minimum=0)
    data: dict[str, Any] = param(factory=dict)


@attrs.frozen
class DropParams:
    code: int | None = param(default=None)
    reason: str = param(default="test drop")
    delay_ms: int = param(default=20, minimum=0)


@attrs.frozen
class SleepParams:
    ms: int = param(minimum=0, maximum=60000)


async def publish(call: ClientCall, p: RepeatedPublishParams) -> dict[str, Any]:
    cursor = ""
    for n in range(p.count):
        data = dict(p.data, n=n) if p.count > 1 else p.data
        cursor = await call.node.broker.publish(p.room, p.event, data)
    return {"room": p.room, "cursor": cursor}


class TestExtension:
    """
    The TEST-ONLY methods (never in the production registry), with the
    timers they start, so L{TestServer.stop} leaves a clean reactor.
    """

    def __init__(self) -> None:
        self.loops: set[task.LoopingCall] = set()
        self.sleeps: dict[Deferred[Any], Any] = {}

    def __call__(self, registry: Registry) -> None:
        registry.method("test.publish", params=RepeatedPublishParams, callers=Caller.CLIENT)(publish)
        registry.method("test.stream", params=StreamParams, callers=Caller.CLIENT)(self.stream)
        registry.method("test.drop", params=DropParams, callers=Caller.CLIENT)(drop)
        registry.method("test.sleep", params=SleepParams, callers=Caller.CLIENT)(self.sleep)

    def stream(self, call: ClientCall, p: StreamParams) -> dict[str, Any]:
        broker, sent = call.node.broker, iter(range(p.count))

        def one() -> None:
            n = next(sent, None)
            if n is None:
                loop.stop()
                self.loops.discard(loop)
            else:
                broker.publish(p.room, p.event, dict(p.data, n=n))

        loop = task.LoopingCall(one)
        loop.clock = call.node.reactor
        self.loops.add(loop)
        loop.start(p.interval_ms / 1000, now=False)
        return {"room": p.room, "count": p.count}

    def sleep(self, call: ClientCall, p: SleepParams) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        timer = call.node.reactor.callLater(p.ms / 1000, d.callback, {})
        self.sleeps[d] = timer
        d.addBoth(lambda r: (self.sleeps.pop(d, None), r)[1])
        return d

    def stop(self) -> None:
        for loop in list(self.loops):
            if loop.running:
                loop.stop()
        for d, timer in list(self.sleeps.items()):
            if timer.active():
                timer.cancel()
                d.callback({})  # answered early rather than cancelled: no logged error


def drop(call: ClientCall, p: DropParams) -> dict[str, Any]:
    session, reactor = call.session, call.node.reactor

    def act() -> None:
        if p.code is None:
            if session.transport is not None:
                session.transport.abortConnection()  # type: ignore[attr-defined]
        elif p.code == 1001:
            session.close_going_away(p.reason)
        else:
            session.close_with(p.code, p.reason)

    call.after_reply(lambda: reactor.callLater(p.delay_ms / 1000, act))
    return {}


class TokenResource(Resource):
    """GET /token?sub=alice&ttl=300&rooms=a,b[&methods=demo.*] -> a connection token (TEST ONLY)."""

    isLeaf = True

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def render_GET(self, request: Request) -> bytes:
        def arg(name: str, default: str) -> str:
            values = request.args.get(name.encode()) or [default.encode()]
            return values[0].decode()

        now = time.time()
        claims: dict[str, Any] = {
            "sub": arg("sub", "alice"),
            "iat": int(now),
            "exp": int(now + float(arg("ttl", "300"))),
            "rooms": [r for r in arg("rooms", "*").split(",") if r],
        }
        if request.args.get(b"methods"):
            claims["methods"] = [m for m in arg("methods", "").split(",") if m]
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"cache-control", b"no-store")
        return jwt.encode(claims, self.secret, algorithm="HS256").encode()


def static_site(secret: str) -> Site:
    """/examples/browser/, /clients/typescript/dist/ and /token."""
    root = Resource()
    examples, clients, typescript = Resource(), Resource(), Resource()
    root.putChild(b"examples", examples)
    examples.putChild(b"browser", File(str(ROOT / "examples/browser")))
    root.putChild(b"clients", clients)
    clients.putChild(b"typescript", typescript)
    typescript.putChild(b"dist", File(str(ROOT / "clients/typescript/dist")))
    root.putChild(b"token", TokenResource(secret))
    return Site(root)


def config_values(secret: str, **overrides: Any) -> dict[str, str]:
    values = {
        "ws_endpoint": "tcp:0:interface=127.0.0.1",
        "http_endpoint": "tcp:0:interface=127.0.0.1",
        "jwt_secret": secret,
        "node_id": "client-test-node",
        "shutdown_timeout": "3",
    }
    values.update({k: str(v) for k, v in overrides.items() if v is not None})
    return values


@attrs.define
class TestServer:
    service: Any
    http_port: Any
    extension: TestExtension

    def info(self) -> dict[str, Any]:
        ws = self.service.ws_port.getHost().port
        health = self.service.http_port.getHost().port
        http = f"http://127.0.0.1:{self.http_port.getHost().port}"
        return {
            "ws_url": f"ws://127.0.0.1:{ws}/ws",
            "http_url": http,
            "health_url": f"http://127.0.0.1:{health}/health",
            "example_url": f"{http}/examples/browser/index.html",
            "pid": os.getpid(),
        }

    @inlineCallbacks
    def stop(self) -> Any:
        self.extension.stop()
        yield self.http_port.stopListening()
        if self.service.running:
            yield self.service.stopService()


@inlineCallbacks
def start_test_node(reactor: Any, secret: str, environ: dict[str, str] | None = None,
                    **overrides: Any) -> Any:
    """Start the node, with the test extension, and the static site; fires with a TestServer."""
    env = {k: v for k, v in (environ or {}).items() if k != "REDIS_URL"}  # memory engine only
    config = load_config(cli=config_values(secret, **overrides), environ=env, dotenv={})
    extension = TestExtension()
    service = makeService(config, reactor, (extension,))
    service.startService()
    yield service.ready
    http_port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        static_site(secret)
    )
    return TestServer(service, http_port, extension)


# -- running Node for the client tests ------------------------------------------


def node_executable() -> str:
    """Node.js, or a failure naming what to install (CI has it: never a skip)."""
    import shutil

    node = shutil.which("node")
    if node is None:
        raise AssertionError("node is not on PATH: the client tests need Node.js 20+")
    return node


def require_node_modules(*packages: str) -> None:
    """Fail loudly (not skip) when `npm ci` was not run: CI's make install runs it."""
    missing = [p for p in packages if not (ROOT / "node_modules" / p / "package.json").exists()]
    if missing:
        raise AssertionError(
            f"node_modules/{{{','.join(missing)}}} missing: run `npm ci` in {ROOT} "
            "(make install does)"
        )


def run_node(args: list[str], env: dict[str, str] | None = None) -> Deferred[tuple[bytes, bytes, int]]:
    """Run node with args in the checkout without blocking the reactor: (out, err, code)."""
    from twisted.internet import reactor
    from twisted.internet.utils import getProcessOutputAndValue

    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("NODE_NO_WARNINGS", "1")
    d: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        node_executable(), args, env=full_env, path=str(ROOT), reactor=reactor
    )
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.testserver")
    parser.add_argument("--history-size", type=int, default=None)
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    from tests.helpers.node import SECRET

    secret = os.environ.get("JWT_SECRET") or SECRET
    failed: list[BaseException] = []

    def ready(server: TestServer) -> None:
        reactor.addSystemEventTrigger("before", "shutdown", server.stop)  # type: ignore[attr-defined]
        print(json.dumps(server.info(), sort_keys=True), flush=True)

    def fail(failure: Any) -> None:
        failed.append(failure.value)
        print(f"testserver failed to start: {failure.value}", file=sys.stderr, flush=True)
        reactor.stop()  # type: ignore[attr-defined]

    d = start_test_node(reactor, secret, dict(os.environ), history_size=args.history_size)
    d.addCallbacks(ready, fail)
    reactor.run()  # type: ignore[attr-defined]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
