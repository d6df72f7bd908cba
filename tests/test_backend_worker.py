"""
The backend package's worker side of PROTOCOL.md section 9: real worker and
event consumer processes (C{python -m unrealon_backend ...}, handlers from
L{tests.backend_handlers}) against a private Redis, with the test acting as
the node (it appends call entries to C{stream:backend}, reads the replies on
C{reply_to}, sets cancel keys and publishes cancels).  Also the declaration
checks made at decoration time, in process.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from unrealon_backend import (
    Call,
    MethodError,
    MethodRegistry,
    Worker,
)

from tests.helpers.backend import CLAIM_IDLE, METHODS, WORKERS, backend_env, spawn_backend
from tests.helpers.backend import BackendProcess as Process
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
STREAM = "stream:backend"
GROUP = "backend_workers"
REPLY_TO = "unrealon:backend:replies:test-node"

HANDLER_METHODS = sorted([
    "test.acount", "test.aecho", "test.app_error", "test.bad_result", "test.count", "test.crash",
    "test.echo", "test.gen_cancel", "test.progress_calls", "test.slow", "test.slow_once",
    "test.wait_cancel",
])


class BackendTestBase(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield start_redis(self)
        self.url = self.server.url
        self.r = redis.Redis.from_url(self.url, decode_responses=True)
        self.addCleanup(self.r.close)

    def env(self) -> dict[str, str]:
        return backend_env(self.url)

    def spawn(self, *args: str) -> Process:
        return spawn_backend(self, self.url, *args)

    def marks(self, call_id: str) -> list[str]:
        return self.r.lrange(f"test:marks:{call_id}", 0, -1)

    def redis_now_ms(self) -> int:
        seconds, micros = self.r.time()
        return int(seconds) * 1000 + int(micros) // 1000


class WorkerTestBase(BackendTestBase):
    @inlineCallbacks
    def start_worker(self, worker_id: str = "w1", *extra: str) -> Any:
        """A worker process, once its heartbeat is in Redis."""
        process = self.spawn("worker", "--redis", self.url, "--handlers", "tests.backend_handlers",
                             "--worker-id", worker_id, "--claim-idle", CLAIM_IDLE, *extra)
        yield wait_until(lambda: self.r.hget(WORKERS, worker_id), timeout=15,
                         what=f"heartbeat of {worker_id}", stop_if=process.exited)
        return process

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             deadline_in_ms: int = 15000, idempotent: bool = False,
             reply_to: str | None = REPLY_TO) -> tuple[str, str]:
        """Append a call entry as a node does; (call_id, entry id)."""
        call_id = f"test-node/{uuid.uuid4().hex[:8]}"
        payload: dict[str, Any] = {
            "call_id": call_id, "method": method, "params": params or {}, "user_id": "7",
            "connection_id": "test-node/1", "node_id": "test-node",
            "claims": {"info": {"plan": "pro"}}, "deadline": self.redis_now_ms() + deadline_in_ms,
            "idempotent": idempotent,
        }
        if reply_to is not None:
            payload["reply_to"] = reply_to
        entry_id = self.r.xadd(STREAM, {"payload": json.dumps(payload)})
        return call_id, entry_id

    def replies(self, call_id: str) -> list[dict[str, Any]]:
        """The reply entries for C{call_id}, in stream order."""
        found = []
        for _id, fields in self.r.xrange(REPLY_TO):
            payload = json.loads(fields["payload"])
            if payload["call_id"] == call_id:
                found.append(payload)
        return found

    @inlineCallbacks
    def final(self, call_id: str, process: Process | None = None, timeout: float = 10) -> Any:
        """Wait for the call's result or error; (progress items, final reply)."""

        def check() -> Any:
            replies = self.replies(call_id)
            return replies if replies and replies[-1]["type"] in ("result", "error") else None

        replies = yield wait_until(check, timeout=timeout, what=f"the reply to {call_id}",
                                   stop_if=process.exited if process else None)
        return replies[:-1], replies[-1]

    def pending(self) -> int:
        return int(self.r.xpending(STREAM, GROUP)["pending"])

    def delivered_up_to(self, entry_id: str) -> bool:
        """The group has read up to entry_id, and nothing it read is pending: all decided."""
        groups = {g["name"]: g for g in self.r.xinfo_groups(STREAM)}
        last = groups[GROUP]["last-delivered-id"]
        as_tuple = lambda i: tuple(int(p) for p in i.split("-"))  # noqa: E731
        return as_tuple(last) >= as_tuple(entry_id) and self.pending() == 0

    def cancel(self, call_id: str, *, key: bool = True, publish: bool = True) -> None:
        """What a node does to cancel a call (section 9.3): both, unless told otherwise."""
        if key:
            self.r.set(f"unrealon:backend:cancel:{call_id}", "client", px=60000)
        if publish:
            self.r.publish("unrealon:backend:cancel", call_id)


class DeclarationTests(WorkerTestBase):
    @inlineCallbacks
    def test_declared_with_a_heartbeat_removed_on_sigterm(self) -> Any:
        worker = yield self.start_worker("w1")
        echo = json.loads(self.r.hget(METHODS, "test.echo"))
        self.assertEqual(echo, {
            "name": "test.echo", "description": "sync: the text back, with who asked",
            "params": {"type": "object", "required": ["text"], "additionalProperties": False,
                       "properties": {"text": {"type": "string"}}},
            "result": {"type": "object", "required": ["echo"]}, "progress": None,
            "idempotent": False, "pass_claims": ["info"],
        })
        self.assertEqual(json.loads(self.r.hget(METHODS, "test.acount"))["timeout"], 20)
        self.assertEqual(sorted(self.r.hkeys(METHODS)), HANDLER_METHODS)
        beat = json.loads(self.r.hget(WORKERS, "w1"))
        self.assertEqual(sorted(beat["methods"]), HANDLER_METHODS)
        now = self.redis_now_ms()
        self.assertGreater(beat["expires"], now + 5000)
        self.assertLessEqual(beat["expires"], now + 10000)
        # renewed every 3 s
        yield wait_until(lambda: json.loads(self.r.hget(WORKERS, "w1"))["expires"]
                         > beat["expires"], timeout=6, what="a second heartbeat",
                         stop_if=worker.exited)
        worker.signal(signal.SIGTERM)
        yield wait_until(lambda: worker.popen.poll() is not None, timeout=15, what="exit")
        self.assertEqual(worker.popen.returncode, 0, worker.output)
        self.assertIsNone(self.r.hget(WORKERS, "w1"))
        self.assertIn("test.echo", self.r.hkeys(METHODS))

    @inlineCallbacks
    def test_sigterm_lets_a_call_in_flight_finish(self) -> Any:
        worker = yield self.start_worker("w1")
        call_id, _ = self.call("test.slow", {"seconds": 1.5}, idempotent=True)
        yield wait_until(lambda: self.marks(call_id), what="the call started",
                         stop_if=worker.exited)
        worker.signal(signal.SIGTERM)
        yield wait_until(lambda: worker.popen.poll() is not None, timeout=15, what="exit")
        self.assertEqual(worker.popen.returncode, 0, worker.output)
        _progress, final = yield self.final(call_id)
        self.assertEqual(final["result"], {"delivery": 1})
        self.assertEqual(self.pending(), 0)
        self.assertIsNone(self.r.hget(WORKERS, "w1"))

    @inlineCallbacks
    def test_declarations_command(self) -> Any:
        done = yield deferToThread(
            subprocess.run,
            [sys.executable, "-m", "unrealon_backend", "declarations", "--handlers",
             "tests.backend_handlers"], capture_output=True, text=True, env=self.env(),
            cwd=str(ROOT), timeout=30,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        declared = json.loads(done.stdout)
        self.assertEqual([d["name"] for d in declared], HANDLER_METHODS)
        by_name = {d["name"]: d for d in declared}
        self.assertEqual(by_name["test.count"]["progress"], {"type": "integer"})
        self.assertEqual(by_name["test.gen_cancel"]["progress"], {})  # a generator: any item
        self.assertEqual(by_name["test.app_error"]["params"],
                         {"type": "object", "additionalProperties": True})
        self.assertTrue(by_name["test.slow"]["idempotent"])
        self.assertNotIn("timeout", by_name["test.echo"])
        self.assertIn('\n  {\n    "name": "test.acount"', done.stdout)  # indent 2


class DecoratorTests(TestCase):
    """Declarations the servers would ignore are refused when they are made."""

    def refuses(self, message: str, name: str = "app.thing", **options: Any) -> None:
        registry = MethodRegistry()
        with self.assertRaises(ValueError) as caught:
            registry.method(name, **options)(lambda call: None)
        self.assertIn(message, str(caught.exception))

    def test_names(self) -> None:
        self.refuses("must match", name="thing")
        self.refuses("must match", name="App.thing")
        self.refuses("must match", name="app.")
        for prefix in ("auth", "system", "rpc", "rooms", "presence", "connections"):
            self.refuses("is the server's", name=f"{prefix}.mine")

    def test_schemas(self) -> None:
        self.refuses("oneOf", params={"type": "object", "oneOf": []})
        self.refuses("format", result={"type": "string", "format": "email"})
        self.refuses("additionalProperties must be true or false",
                     params={"type": "object", "additionalProperties": {"type": "string"}})
        self.refuses("type must be one of", progress={"type": "text"})
        self.refuses("must have type 'object'", params={"type": "array"})
        self.refuses("not a valid regular expression",
                     params={"type": "object", "properties": {"x": {"type": "string",
                                                                    "pattern": "("}}})

    def test_options(self) -> None:
        self.refuses("never passed", pass_claims=["sub"])
        self.refuses("timeout must be a positive number", timeout=0)
        self.refuses("idempotent must be", idempotent="yes")

    def test_signature_must_match_params(self) -> None:
        registry = MethodRegistry()
        schema = {"type": "object", "properties": {"prompt": {"type": "string"}}}
        with self.assertRaises(ValueError) as caught:
            registry.method("app.ask", params=schema)(lambda call: None)
        self.assertIn("no such argument", str(caught.exception))

        def ask(call: Call, prompt: str) -> None: ...

        with self.assertRaises(ValueError) as caught:
            registry.method("app.ask", params=schema)(ask)
        self.assertIn("has no default", str(caught.exception))
        registry.method("app.ask", params={**schema, "required": ["prompt"]})(ask)
        with self.assertRaises(ValueError) as caught:
            registry.method("app.ask")(ask)
        self.assertIn("already declared", str(caught.exception))

    def test_worker_declarations(self) -> None:
        worker = Worker("redis://127.0.0.1:1/0")

        @worker.method("app.sum", params={"type": "object", "required": ["a", "b"],
                                          "properties": {"a": {"type": "number"},
                                                         "b": {"type": "number"}}},
                       result={"type": "number"}, timeout=5, idempotent=True)
        async def add(call: Call, a: float, b: float) -> float:
            return a + b

        self.assertEqual(worker.declarations(), [{
            "name": "app.sum", "description": "",
            "params": {"type": "object", "required": ["a", "b"],
                       "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
            "result": {"type": "number"}, "progress": None, "timeout": 5, "idempotent": True,
            "pass_claims": [],
        }])

    def test_method_error_codes(self) -> None:
        for code in (-32768, -32603, -32015, -32000):
            with self.assertRaises(ValueError):
                MethodError(code, "no")
        error = MethodError(-31999, "fine", {"x": 1})
        self.assertEqual((error.code, error.message, error.data), (-31999, "fine", {"x": 1}))
        self.assertEqual(MethodError(4001, "quota").code, 4001)


class CallTests(WorkerTestBase):
    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.worker = yield self.start_worker("w1")

    @inlineCallbacks
    def test_sync_and_async_results(self) -> Any:
        echo_id, _ = self.call("test.echo", {"text": "hi"})
        aecho_id, _ = self.call("test.aecho", {"text": "ho"})
        progress, final = yield self.final(echo_id, self.worker)
        self.assertEqual(progress, [])
        self.assertEqual(final, {"call_id": echo_id, "type": "result", "result": {
            "echo": "hi", "user_id": "7", "claims": {"info": {"plan": "pro"}}, "delivery": 1}})
        _, final = yield self.final(aecho_id, self.worker)
        self.assertEqual(final["result"], {"echo": "ho", "async": True})
        yield wait_until(lambda: self.pending() == 0, what="both acknowledged")
        self.assertLessEqual(self.r.ttl(REPLY_TO), 3600)
        self.assertGreater(self.r.ttl(REPLY_TO), 3500)

    @inlineCallbacks
    def test_progress_in_order_with_seq(self) -> Any:
        calls = {method: self.call(method, {"n": 5})[0]
                 for method in ("test.count", "test.acount", "test.progress_calls")}
        expected_results = {"test.count": {"total": 5},
                            "test.acount": {"total": 5, "async": True},
                            "test.progress_calls": "done"}
        for method, call_id in calls.items():
            progress, final = yield self.final(call_id, self.worker)
            self.assertEqual([p["seq"] for p in progress], [1, 2, 3, 4, 5], method)
            self.assertEqual({p["type"] for p in progress}, {"progress"})
            data = [p["data"] for p in progress]
            if method == "test.progress_calls":
                self.assertEqual(data, [f"item {i}" for i in range(5)])
            else:
                self.assertEqual(data, [0, 1, 2, 3, 4])
            self.assertEqual(final["type"], "result")
            self.assertEqual(final["result"], expected_results[method])

    @inlineCallbacks
    def test_errors(self) -> Any:
        app_id, _ = self.call("test.app_error")
        crash_id, _ = self.call("test.crash")
        bad_id, _ = self.call("test.bad_result")
        unknown_id, _ = self.call("test.nobody_serves_this")
        invalid_id, _ = self.call("test.echo", {"text": 5})
        _, final = yield self.final(app_id, self.worker)
        self.assertEqual(final["error"], {"code": 4001, "message": "quota exceeded",
                                          "data": {"limit": 3}})
        _, final = yield self.final(crash_id, self.worker)
        self.assertEqual(final["error"], {"code": -32603, "message": "internal error"})
        # no exception text leaves the worker; it is logged with its traceback
        self.assertNotIn("secret", json.dumps(self.replies(crash_id)))
        yield wait_until(lambda: "RuntimeError: secret detail" in self.worker.output,
                         what="the traceback in the log")
        _, final = yield self.final(bad_id, self.worker)
        self.assertEqual(final["error"], {"code": -32603, "message": "internal error"})
        _, final = yield self.final(unknown_id, self.worker)
        self.assertEqual(final["error"]["code"], -32601)
        _, final = yield self.final(invalid_id, self.worker)
        self.assertEqual(final["error"]["code"], -32602)
        self.assertEqual(final["error"]["data"]["errors"],
                         [{"field": "text", "message": "must be of type string"}])
        yield wait_until(lambda: self.pending() == 0, what="all acknowledged")

    @inlineCallbacks
    def test_notification_runs_without_replies(self) -> Any:
        call_id, entry_id = self.call("test.echo", {"text": "quiet"}, reply_to=None)
        yield wait_until(lambda: self.delivered_up_to(entry_id), what="acknowledged")
        self.assertEqual(self.marks(call_id), ["ran"])
        self.assertEqual(self.replies(call_id), [])

    @inlineCallbacks
    def test_cancel_seen_by_a_polling_handler(self) -> Any:
        call_id, _ = self.call("test.wait_cancel")
        yield wait_until(lambda: self.marks(call_id) == ["started"], what="started",
                         stop_if=self.worker.exited)
        self.cancel(call_id)
        # the handler marks "flag" then the reason: wait for both (under load
        # the second can come a moment after the first)
        yield wait_until(lambda: len(self.marks(call_id)) >= 3, timeout=5,
                         what="the handler saw call.cancelled")
        self.assertEqual(self.marks(call_id), ["started", "flag", "reason client"])
        # the handler returned at once; its entry is acknowledged with no reply
        yield wait_until(lambda: self.pending() == 0, what="acknowledged")
        self.assertEqual(self.replies(call_id), [])

    @inlineCallbacks
    def test_cancel_by_pubsub_alone(self) -> Any:
        """Without the key, only the Pub/Sub message can tell the worker."""
        call_id, _ = self.call("test.wait_cancel")
        yield wait_until(lambda: self.marks(call_id) == ["started"], what="started",
                         stop_if=self.worker.exited)
        self.cancel(call_id, key=False)
        yield wait_until(lambda: "flag" in self.marks(call_id), timeout=5,
                         what="the handler saw call.cancelled")
        # the handler returned at once; its entry is acknowledged with no reply
        yield wait_until(lambda: self.pending() == 0, what="acknowledged")
        self.assertEqual(self.replies(call_id), [])

    @inlineCallbacks
    def test_cancel_thrown_into_a_generator(self) -> Any:
        call_id, _ = self.call("test.gen_cancel")
        yield wait_until(lambda: len(self.replies(call_id)) >= 2, what="progress",
                         stop_if=self.worker.exited)
        # no Pub/Sub message (as if it was lost while reconnecting)
        self.cancel(call_id, publish=False)  # only the key: the refresh loop finds it
        yield wait_until(lambda: "thrown" in self.marks(call_id), timeout=5,
                         what="Cancelled thrown in at a yield")
        yield wait_until(lambda: self.pending() == 0, what="acknowledged")
        replies = self.replies(call_id)
        self.assertEqual({r["type"] for r in replies}, {"progress"})
        self.assertEqual([r["seq"] for r in replies], list(range(1, len(replies) + 1)))

    @inlineCallbacks
    def test_cancelled_before_start_is_not_run(self) -> Any:
        call_id = "test-node/cancelled-early"
        self.r.set(f"unrealon:backend:cancel:{call_id}", "client", px=60000)
        payload = {"call_id": call_id, "method": "test.echo", "params": {"text": "no"},
                   "deadline": self.redis_now_ms() + 10000, "reply_to": REPLY_TO}
        entry_id = self.r.xadd(STREAM, {"payload": json.dumps(payload)})
        yield wait_until(lambda: self.delivered_up_to(entry_id), what="acknowledged")
        self.assertEqual(self.marks(call_id), [])
        self.assertEqual(self.replies(call_id), [])

    @inlineCallbacks
    def test_past_deadline_is_acknowledged_not_run(self) -> Any:
        call_id, entry_id = self.call("test.echo", {"text": "late"}, deadline_in_ms=-1000)
        yield wait_until(lambda: self.delivered_up_to(entry_id), what="acknowledged")
        self.assertEqual(self.marks(call_id), [])
        self.assertEqual(self.replies(call_id), [])

    @inlineCallbacks
    def test_invalid_entries(self) -> Any:
        not_json = self.r.xadd(STREAM, {"payload": "{nope"})
        yield wait_until(lambda: self.delivered_up_to(not_json), what="not JSON acknowledged")
        no_deadline = {"call_id": "test-node/x", "method": "test.echo", "params": {"text": "x"},
                       "reply_to": REPLY_TO}
        entry_id = self.r.xadd(STREAM, {"payload": json.dumps(no_deadline)})
        _, final = yield self.final("test-node/x", self.worker)
        self.assertEqual(final["error"]["code"], -32600)
        yield wait_until(lambda: self.delivered_up_to(entry_id), what="acknowledged")
        self.assertEqual(self.marks("test-node/x"), [])


class RedisRestartTests(WorkerTestBase):
    @inlineCallbacks
    def test_worker_survives_a_redis_restart(self) -> Any:
        worker = yield self.start_worker("w1")
        yield self.server.restart()  # comes back empty: no group, no declarations
        self.r.connection_pool.disconnect()
        yield wait_until(lambda: self.r.hget(WORKERS, "w1") and self.r.hget(METHODS, "test.echo"),
                         timeout=15, what="declared again", stop_if=worker.exited)
        # the group is created again; calls and cancels work as before
        call_id, _ = self.call("test.echo", {"text": "again"})
        _, final = yield self.final(call_id, worker, timeout=15)
        self.assertEqual(final["result"]["echo"], "again")
        waiting_id, _ = self.call("test.wait_cancel")
        yield wait_until(lambda: self.marks(waiting_id) == ["started"], what="started",
                         stop_if=worker.exited)
        self.cancel(waiting_id, key=False)
        yield wait_until(lambda: "flag" in self.marks(waiting_id), timeout=10,
                         what="cancelled through the new subscription")
        self.assertIn("Redis unavailable", worker.output)


class LostWorkerTests(WorkerTestBase):
    @inlineCallbacks
    def test_idempotent_call_is_run_again(self) -> Any:
        first = yield self.start_worker("w1")
        call_id, _ = self.call("test.slow", idempotent=True)
        yield wait_until(lambda: self.marks(call_id) == ["delivery 1"], what="first run",
                         stop_if=first.exited)
        first.signal(signal.SIGKILL)
        second = yield self.start_worker("w2")
        _progress, final = yield self.final(call_id, second, timeout=15)
        self.assertEqual(final["result"], {"delivery": 2})
        self.assertEqual(self.marks(call_id), ["delivery 1", "delivery 2"])
        yield wait_until(lambda: self.pending() == 0, what="acknowledged")

    @inlineCallbacks
    def test_other_call_is_answered_worker_lost(self) -> Any:
        first = yield self.start_worker("w1")
        call_id, _ = self.call("test.slow_once")
        yield wait_until(lambda: self.marks(call_id) == ["delivery 1"], what="first run",
                         stop_if=first.exited)
        first.signal(signal.SIGKILL)
        second = yield self.start_worker("w2")
        _progress, final = yield self.final(call_id, second, timeout=15)
        self.assertEqual(final["error"], {"code": -32015, "message": "backend worker lost",
                                          "data": {"retryable": False}})
        self.assertEqual(self.marks(call_id), ["delivery 1"])
        yield wait_until(lambda: self.pending() == 0, what="acknowledged")

    @inlineCallbacks
    def test_at_most_three_deliveries(self) -> Any:
        call_id, entry_id = self.call("test.slow", idempotent=True)
        # a consumer that took it three times and died each time
        self.r.xgroup_create(STREAM, GROUP, id="0")
        self.r.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=1)
        self.r.xclaim(STREAM, GROUP, "ghost", 0, [entry_id])
        self.r.xclaim(STREAM, GROUP, "ghost", 0, [entry_id])
        info = self.r.xpending_range(STREAM, GROUP, min=entry_id, max=entry_id, count=1)
        self.assertEqual(info[0]["times_delivered"], 3)
        worker = yield self.start_worker("w1")
        _progress, final = yield self.final(call_id, worker, timeout=15)
        self.assertEqual(final["error"]["code"], -32015)
        self.assertEqual(self.marks(call_id), [])

    @inlineCallbacks
    def test_live_workers_keep_their_calls(self) -> Any:
        """A call running longer than claim_idle is not taken over by another worker."""
        first = yield self.start_worker("w1")
        call_id, _ = self.call("test.slow", {"seconds": 5.0}, idempotent=True)
        yield wait_until(lambda: self.marks(call_id), what="first run", stop_if=first.exited)
        second = yield self.start_worker("w2")
        _progress, final = yield self.final(call_id, second, timeout=15)
        self.assertEqual(final["result"], {"delivery": 1})
        self.assertEqual(self.marks(call_id), ["delivery 1"])


class EventConsumerTests(BackendTestBase):
    def event(self, event_type: str, **fields: Any) -> str:
        payload = {"type": event_type, "node_id": "n1", "time": self.redis_now_ms(), **fields}
        return self.r.xadd("stream:events", {"payload": json.dumps(payload)})

    @inlineCallbacks
    def test_handlers_get_events_and_failures_are_retried(self) -> Any:
        # appended before the group exists: read all the same (group created at id 0)
        first = self.event("user.online", user_id="7")
        consumer = self.spawn("events", "--redis", self.url, "--handlers",
                              "tests.backend_handlers", "--consumer", "c1", "--claim-idle", "1",
                              "--max-deliveries", "3")
        self.event("room.occupied", room="workspace:1", user_id="7")
        self.event("test.flaky", n=1)
        self.event("test.broken")
        yield wait_until(lambda: self.r.llen("test:events:online") == 1, timeout=15,
                         what="user.online handled", stop_if=consumer.exited)
        online = json.loads(self.r.lindex("test:events:online", 0))
        self.assertEqual((online["type"], online["user_id"]), ("user.online", "7"))
        self.assertEqual(online["event_id"], first, "the stream id, for ordering and de-duplication")
        # the flaky handler fails twice, then succeeds on its third delivery
        yield wait_until(lambda: self.r.lrange("test:events:flaky", 0, -1) == ["1"], timeout=15,
                         what="the flaky event retried", stop_if=consumer.exited)
        self.assertEqual(self.r.get("test:events:tries:1"), "3")
        # the broken one is run max-deliveries times, then moved to the dead stream
        yield wait_until(lambda: self.r.xlen("stream:events:dead") == 1, timeout=15,
                         what="the broken event dead-lettered", stop_if=consumer.exited)
        self.assertEqual(self.r.get("test:events:broken"), "3")
        _id, dead = self.r.xrange("stream:events:dead")[0]
        self.assertEqual(json.loads(dead["payload"])["type"], "test.broken")
        self.assertIn("max_deliveries", dead["reason"])
        yield wait_until(lambda: self.r.xpending("stream:events", "backend_events")["pending"]
                         == 0, what="all acknowledged")
        seen = self.r.lrange("test:events:all", 0, -1)
        self.assertEqual(seen[:2], ["user.online", "room.occupied"])
        self.assertIn("test.flaky", seen)
        self.assertIn("failed on test.broken", consumer.output)
        consumer.signal(signal.SIGTERM)
        yield wait_until(lambda: consumer.popen.poll() is not None, timeout=15, what="exit")
        self.assertEqual(consumer.popen.returncode, 0, consumer.output)


    @inlineCallbacks
    def test_a_dead_consumers_entries_are_taken_over(self) -> Any:
        self.event("user.online", user_id="8")
        self.r.xgroup_create("stream:events", "backend_events", id="0")
        self.r.xreadgroup("backend_events", "ghost", {"stream:events": ">"}, count=1)
        consumer = self.spawn("events", "--redis", self.url, "--handlers",
                              "tests.backend_handlers", "--consumer", "c1", "--claim-idle", "1")
        yield wait_until(lambda: self.r.llen("test:events:online") == 1, timeout=15,
                         what="the ghost's event handled", stop_if=consumer.exited)
        self.assertEqual(json.loads(self.r.lindex("test:events:online", 0))["user_id"], "8")
        yield wait_until(lambda: self.r.xpending("stream:events", "backend_events")["pending"]
                         == 0, what="acknowledged")


DJANGO_WORKER = """
import sys
import django
from django.conf import settings
from django.core.management import call_command

settings.configure(
    INSTALLED_APPS=["unrealon_backend"],
    UNREALON_REDIS_URL=sys.argv[1],
    UNREALON_BACKEND_HANDLERS=["tests.backend_handlers"],
    UNREALON_BACKEND_WORKER_ID="django-worker",
    UNREALON_EVENT_HANDLERS=["tests.backend_handlers"],
)
django.setup()
call_command(sys.argv[2])
"""


class DjangoCommandTests(WorkerTestBase):
    def setUp(self) -> Any:
        if importlib.util.find_spec("django") is None:
            raise SkipTest("Django is not installed (it is not a dependency of the package; "
                           "pip install django to run the management command tests)")
        return super().setUp()

    @inlineCallbacks
    def test_unrealon_worker_command(self) -> Any:
        command = Process(self, [sys.executable, "-c", DJANGO_WORKER, self.url, "unrealon_worker"],
                          self.env())
        yield wait_until(lambda: self.r.hget(WORKERS, "django-worker"), timeout=20,
                         what="the Django worker's heartbeat", stop_if=command.exited)
        call_id, _ = self.call("test.echo", {"text": "from django"})
        _, final = yield self.final(call_id, command)
        self.assertEqual(final["result"]["echo"], "from django")
        command.signal(signal.SIGTERM)
        yield wait_until(lambda: command.popen.poll() is not None, timeout=15, what="exit")
        self.assertEqual(command.popen.returncode, 0, command.output)
        self.assertIsNone(self.r.hget(WORKERS, "django-worker"))

    @inlineCallbacks
    def test_unrealon_events_command(self) -> Any:
        command = Process(self, [sys.executable, "-c", DJANGO_WORKER, self.url, "unrealon_events"],
                          self.env())
        self.r.xadd("stream:events", {"payload": json.dumps({"type": "user.online",
                                                              "user_id": "9"})})
        yield wait_until(lambda: self.r.llen("test:events:online") == 1, timeout=20,
                         what="the event handled", stop_if=command.exited)
        command.signal(signal.SIGTERM)
        yield wait_until(lambda: command.popen.poll() is not None, timeout=15, what="exit")
        self.assertEqual(command.popen.returncode, 0, command.output)
