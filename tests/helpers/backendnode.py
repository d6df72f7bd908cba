"""
A node with Redis and a backend worker, for the clients' end-to-end tests of
backend methods (PROTOCOL.md section 9).

L{start_backend_node} starts a private redis-server (L{start_redis}), the
test node of L{start_test_node} on it (the same static site and C{/token},
which takes C{methods=demo.*}), and ``python -m unrealon_backend worker
--handlers tests.backend_demo_handlers`` as a child process that appends what
it saw of each call to C{log_path}.  Everything is stopped in the test's
cleanup.  Waiting for the worker's declarations to reach the node is the
clients' job (they poll C{rpc.discover}), so each client test sees the
whole path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.node import SECRET
from tests.helpers.process import ChildProcess, base_env
from tests.helpers.redis_server import start_redis
from tests.helpers.testserver import ROOT, start_test_node

#: the worker's handlers: the example's demo.count and the logged demo.logged_count
HANDLERS = "tests.backend_demo_handlers"


@attrs.define
class BackendNode:
    ws_url: str
    http_url: str
    redis_url: str
    log_path: Path
    worker: ChildProcess

    def worker_log(self) -> list[dict[str, Any]]:
        """What the worker saw of each call, in order (L{tests.backend_demo_handlers})."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def env(self) -> dict[str, str]:
        return {"UNREALON_TEST_WS_URL": self.ws_url, "UNREALON_TEST_HTTP_URL": self.http_url,
                "UNREALON_TEST_BACKEND_LOG": str(self.log_path)}


@inlineCallbacks
def start_backend_node(testcase: TestCase) -> Any:
    """Redis, a node on it and a worker; fires with a L{BackendNode}."""
    redis = yield start_redis(testcase)
    redis_url = f"unix://{redis.socket_path}?db=0"
    server = yield start_test_node(reactor, SECRET, redis_url=redis_url)
    testcase.addCleanup(server.stop)
    info = server.info()
    log_path = Path(testcase.mktemp()).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    worker = ChildProcess()
    argv = [sys.executable, "-m", "unrealon_backend", "worker", "--redis", redis_url,
            "--handlers", HANDLERS]
    env = base_env(UNREALON_TEST_BACKEND_LOG=str(log_path),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    reactor.spawnProcess(worker, argv[0], argv, env=env, path=str(ROOT))  # type: ignore[attr-defined]

    @inlineCallbacks
    def stop_worker() -> Any:
        if worker.running and worker.transport is not None:
            worker.transport.signalProcess("TERM")  # it deletes its heartbeat field, ends its calls
        try:
            yield worker.wait_ended(timeout=10)
        except Exception:
            yield worker.signal("KILL")

    testcase.addCleanup(stop_worker)
    return BackendNode(info["ws_url"], info["http_url"], redis_url, log_path, worker)
