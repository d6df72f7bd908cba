"""
Processes of the backend package (``python -m unrealon_backend worker|events``)
for tests: started with the handlers of L{tests.backend_handlers}, their
output in a file, killed by pid in the cleanup.

The handlers record what they saw in the test's private Redis (named by
C{BACKEND_TEST_REDIS}) under C{test:*} keys: L{marks} reads them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import redis
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent.parent
WORKERS = "unrealon:backend:workers"
METHODS = "unrealon:backend:methods"
#: small, so lost-worker tests are quick; above the worker's 1 s refresh with a margin
CLAIM_IDLE = "2"


class BackendProcess:
    """A child process of the backend CLI, its output in a file, killed in the cleanup."""

    def __init__(self, testcase: TestCase, args: list[str], env: dict[str, str]) -> None:
        self.log_path = Path(testcase.mktemp() + ".log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = self.log_path.open("wb")
        self.popen = subprocess.Popen(args, cwd=str(ROOT), env=env, stdout=self._log,
                                      stderr=subprocess.STDOUT)
        testcase.addCleanup(self.reap)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> str | None:
        """For wait_until's stop_if: why waiting is pointless (the process ended)."""
        code = self.popen.poll()
        return None if code is None else f"process exited {code}; output:\n{self.output}"

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)

    def reap(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._log.close()


def backend_env(redis_url: str) -> dict[str, str]:
    """The environment of a backend process: this checkout importable, no node settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNREALON_", "REDIS_URL"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["BACKEND_TEST_REDIS"] = redis_url
    return env


def spawn_backend(testcase: TestCase, redis_url: str, *args: str) -> BackendProcess:
    """C{python -m unrealon_backend <args>}."""
    return BackendProcess(testcase, [sys.executable, "-m", "unrealon_backend", *args],
                          backend_env(redis_url))


def start_worker(
    testcase: TestCase, redis_url: str, worker_id: str, *extra: str,
    handlers: str = "tests.backend_handlers",
) -> Deferred[BackendProcess]:
    """A worker process serving C{handlers}, once its heartbeat is in Redis."""
    process = spawn_backend(testcase, redis_url, "worker", "--redis", redis_url,
                            "--handlers", handlers, "--worker-id", worker_id,
                            "--claim-idle", CLAIM_IDLE, *extra)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    testcase.addCleanup(r.close)

    def heartbeat() -> Any:
        return r.hget(WORKERS, worker_id)

    d = wait_until(heartbeat, timeout=15, what=f"heartbeat of {worker_id}", stop_if=process.exited)
    return d.addCallback(lambda _: process)


def marks(r: redis.Redis, call_id: str) -> list[str]:
    """What the handler of C{call_id} recorded (L{tests.backend_handlers.mark})."""
    return list(r.lrange(f"test:marks:{call_id}", 0, -1))
