"""
Unit tests of the producer library (unrealon_backend, the backend package) against a private
redis-server: what each helper appends, client-side validation, and call()
with a stand-in responder (the end-to-end runs against real nodes are in
tests.test_ingress).

redis-py is synchronous: short commands run inline (well under a
millisecond on the fixture's Unix socket); call(), which blocks on BRPOP,
runs in a thread while the reactor plays the server.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import unrealon_backend as backend
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from unrealon_backend import (
    BackendCallError,
    BackendUnavailable,
    CallTimeout,
    DeadlineExceeded,
    Forbidden,
    InternalError,
    InvalidParams,
    MethodNotFound,
    Publisher,
)

from tests.helpers.publishing import STREAM, PublisherTestCase
from tests.helpers.waiting import wait_until


class SendTests(PublisherTestCase):
    def test_url_or_client(self) -> None:
        publisher = Publisher(self.server.url, stream="custom:stream")
        self.addCleanup(publisher.redis.close)
        entry_id = publisher.send("publish", {"room": "r", "event": "e", "data": {}})
        self.assertEqual([e for e, _ in self.entries("custom:stream")], [entry_id])
        self.assertEqual(self.r.xlen(STREAM), 0)

    def test_entry_layout(self) -> None:
        """One field, payload: a JSON object with method and params, nothing else by default."""
        entry_id = self.publisher.send("workspace.state_changed",
                                       {"workspace_id": "1", "state": "up"})
        [(got_id, fields)] = self.r.xrange(STREAM)
        self.assertEqual(got_id, entry_id)
        self.assertEqual(list(fields), ["payload"])
        self.assertEqual(json.loads(fields["payload"]),
                         {"method": "workspace.state_changed",
                          "params": {"workspace_id": "1", "state": "up"}})
        self.publisher.send("x.y", None, timeout=2.5, correlation_id="c", reply_to="list:r")
        self.assertEqual(self.last(), {"method": "x.y", "params": {}, "timeout": 2.5,
                                       "correlation_id": "c", "reply_to": "list:r"})

    def test_text_is_utf8_and_json_default(self) -> None:
        self.publisher.state_changed(1, "état ✓")
        self.assertEqual(self.last()["params"]["state"], "état ✓")
        with self.assertRaises(TypeError):
            self.publisher.publish("r", "e", {"when": datetime.date(2026, 1, 2)})

        def default(value: Any) -> Any:
            if isinstance(value, (datetime.date, uuid.UUID)):
                return str(value)
            raise TypeError(type(value).__name__)

        publisher = Publisher(self.r, json_default=default)
        publisher.publish("r", "e", {"when": datetime.date(2026, 1, 2)})
        self.assertEqual(self.last()["params"]["data"], {"when": "2026-01-02"})
        with self.assertRaises(ValueError):
            publisher.publish("r", "e", {"x": float("nan")})

    def test_event_timeout(self) -> None:
        Publisher(self.r, event_timeout=30).context_updated(5)
        self.assertEqual(self.last(), {"method": "session.context_updated",
                                       "params": {"session_id": "5"}, "timeout": 30})

    def test_maxlen(self) -> None:
        publisher = Publisher(self.r, maxlen=10)
        for i in range(600):
            publisher.context_updated(i)
        # approximate trimming: whole macro-nodes go, so "about" 10
        self.assertLess(self.r.xlen(STREAM), 600)
        unbounded = Publisher(self.r, stream="other", maxlen=None)
        for i in range(300):
            unbounded.context_updated(i)
        self.assertEqual(self.r.xlen("other"), 300)

    def test_redis_down(self) -> None:
        publisher = Publisher("unix:///nonexistent/redis.sock?db=0")
        self.addCleanup(publisher.redis.close)
        with self.assertRaises(BackendUnavailable) as caught:
            publisher.notify("1", "t", "m")
        self.assertIsInstance(caught.exception, backend.BackendError)

    def test_no_twisted(self) -> None:
        """The producer library runs in Django: it must not import Twisted."""
        code = ("import sys, unrealon_backend; "
                "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
                "('twisted', 'txredisapi', 'autobahn', 'zope')); "
                "print(bad); sys.exit(1 if bad else 0)")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=30)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)


class CatalogueTests(PublisherTestCase):
    def test_helpers(self) -> None:
        p = self.publisher
        cases = [
            (lambda: p.file_changed(42, "src/a.py", "modified", size=3),
             "workspace.file_changed",
             {"workspace_id": "42", "path": "src/a.py", "change": "modified", "size": 3}),
            (lambda: p.file_changed("w", "b", "renamed", old_path="a"),
             "workspace.file_changed",
             {"workspace_id": "w", "path": "b", "change": "renamed", "old_path": "a"}),
            (lambda: p.snapshot_created(1, 2), "workspace.snapshot_created",
             {"workspace_id": "1", "snapshot_id": "2"}),
            (lambda: p.state_changed("1", "running", since=5), "workspace.state_changed",
             {"workspace_id": "1", "state": "running", "since": 5}),
            (lambda: p.session_message(3, "m1", "assistant", "Hi"), "session.message",
             {"session_id": "3", "message_id": "m1", "role": "assistant", "content": "Hi"}),
            (lambda: p.session_message("3", 9, "tool", "", seq=0, done=False, model="x"),
             "session.message",
             {"session_id": "3", "message_id": "9", "role": "tool", "content": "", "seq": 0,
              "done": False, "model": "x"}),
            (lambda: p.task_status("s", "t", "succeeded", progress=1), "session.task_status",
             {"session_id": "s", "task_id": "t", "status": "succeeded", "progress": 1}),
            (lambda: p.task_status("s", "t", "queued"), "session.task_status",
             {"session_id": "s", "task_id": "t", "status": "queued"}),
            (lambda: p.context_updated("s", reason="upload"), "session.context_updated",
             {"session_id": "s", "reason": "upload"}),
            (lambda: p.notify(7, "T", "M"), "notification.send",
             {"user_id": "7", "title": "T", "message": "M", "level": "info"}),
            (lambda: p.notify("u", "T", "M", level="error", data={"a": [1]}),
             "notification.send",
             {"user_id": "u", "title": "T", "message": "M", "level": "error",
              "data": {"a": [1]}}),
            (lambda: p.broadcast("T", "M"), "notification.broadcast",
             {"title": "T", "message": "M", "level": "info"}),
            (lambda: p.broadcast("T", "M", "warning", {"b": 1}), "notification.broadcast",
             {"title": "T", "message": "M", "level": "warning", "data": {"b": 1}}),
            (lambda: p.publish("room:1", "my.event", {"n": 1}), "publish",
             {"room": "room:1", "event": "my.event", "data": {"n": 1}}),
            (lambda: p.publish("room:1", "my.event"), "publish",
             {"room": "room:1", "event": "my.event", "data": {}}),
            (lambda: p.disconnect(7), "connections.disconnect", {"user_id": "7"}),
            (lambda: p.disconnect("7", reason="banned"), "connections.disconnect",
             {"user_id": "7", "reason": "banned"}),
        ]
        for send, method, params in cases:
            entry_id = send()
            got_id, payload = self.entries()[-1]
            self.assertEqual(got_id, entry_id)
            self.assertEqual(payload, {"method": method, "params": params})

    def test_enum_members_are_accepted(self) -> None:
        from unrealon.events import Change, Level, Role, TaskState

        self.publisher.file_changed(1, "a", Change.deleted)
        self.assertEqual(self.last()["params"]["change"], "deleted")
        self.publisher.session_message(1, 1, Role.system, "x")
        self.publisher.task_status(1, 1, TaskState.cancelled)
        self.publisher.notify(1, "t", "m", level=Level.warning)
        self.assertEqual(self.last()["params"]["level"], "warning")
        # the library's lists are the catalogue's
        self.assertEqual(backend.CHANGES, {c.value for c in Change})
        self.assertEqual(backend.ROLES, {c.value for c in Role})
        self.assertEqual(backend.TASK_STATUSES, {c.value for c in TaskState})
        self.assertEqual(backend.LEVELS, {c.value for c in Level})

    def test_validation(self) -> None:
        """
        The catalogue's rules, checked before anything is sent: a missing
        required param, a value out of range or not allowed is a ValueError,
        a value of the wrong type a TypeError.
        """
        p = self.publisher
        bad: list[tuple[type[Exception], Any]] = [
            (ValueError, lambda: p.file_changed(1, "a", "moved")),
            (ValueError, lambda: p.file_changed(1, "a", "renamed")),
            (ValueError, lambda: p.file_changed(1, "a", "renamed", old_path="")),
            (ValueError, lambda: p.file_changed(None, "a", "created")),
            (TypeError, lambda: p.file_changed(True, "a", "created")),
            (TypeError, lambda: p.file_changed(1.5, "a", "created")),
            (ValueError, lambda: p.file_changed("", "a", "created")),
            (TypeError, lambda: p.file_changed(1, 5, "created")),
            (ValueError, lambda: p.session_message(1, 1, "bot", "x")),
            (ValueError, lambda: p.session_message(1, 1, "user", "x", seq=-1)),
            (TypeError, lambda: p.session_message(1, 1, "user", "x", seq="1")),
            (TypeError, lambda: p.session_message(1, 1, "user", "x", seq=True)),
            (TypeError, lambda: p.session_message(1, 1, "user", "x", done="yes")),
            (ValueError, lambda: p.session_message(1, 1, "user", None)),
            (ValueError, lambda: p.file_changed("x" * 129, "a", "created")),
            (ValueError, lambda: p.event("no.such.event")),
            (ValueError, lambda: p.task_status(1, 1, "done")),
            (ValueError, lambda: p.task_status(1, 1, "running", progress=1.5)),
            (ValueError, lambda: p.task_status(1, 1, "running", progress=-0.1)),
            (ValueError, lambda: p.notify(1, "t", "m", level="critical")),
            (TypeError, lambda: p.notify(1, "t", "m", data=[1])),
            (ValueError, lambda: p.broadcast("t", "m", level="loud")),
            (TypeError, lambda: p.publish("r", "e", "data")),
            (TypeError, lambda: p.disconnect(1, reason=5)),
            (ValueError, lambda: p.send("", {})),
            (TypeError, lambda: p.send("m", [1])),
            (ValueError, lambda: p.send("m", {}, timeout=0)),
            (ValueError, lambda: p.send("m", {}, timeout=-1)),
        ]
        for error, send in bad:
            self.assertRaises(error, send)
        # nothing was appended
        self.assertEqual(self.r.xlen(STREAM), 0)


class Responder:
    """Plays the server in the reactor: answers each request with C{answer(payload)}."""

    def __init__(self, r: Any, answer: Any) -> None:
        self.r = r
        self.answer = answer
        self.last_id = "0-0"
        self.seen: list[dict[str, Any]] = []
        self.loop = LoopingCall(self.poll)
        self.loop.clock = reactor

    def poll(self) -> None:
        for _, entries in self.r.xread({STREAM: self.last_id}, count=100) or []:
            for entry_id, fields in entries:
                self.last_id = entry_id
                payload = json.loads(fields["payload"])
                self.seen.append(payload)
                for reply in self.answer(payload):
                    self.r.lpush(payload["reply_to"], json.dumps(reply))
                    self.r.expire(payload["reply_to"], 60)


def reply(payload: dict[str, Any], *, result: Any = None, error: str | None = None,
          code: str | None = None) -> dict[str, Any]:
    return {"type": "error" if code else "response",
            "correlation_id": payload.get("correlation_id"), "success": code is None,
            "result": None if code else result, "error": error, "error_code": code,
            "timestamp": "2026-11-25T12:00:00.000Z"}


class CallTests(PublisherTestCase):
    def respond(self, answer: Any) -> Responder:
        responder = Responder(self.r, answer)
        responder.loop.start(0.01)
        self.addCleanup(lambda: responder.loop.running and responder.loop.stop())
        return responder

    @inlineCallbacks
    def test_success(self) -> Any:
        responder = self.respond(lambda p: [reply(p, result={"online": p["params"].get("user_ids")})])
        online = yield deferToThread(self.publisher.presence_online, [1, "2"], 3.0)
        self.assertEqual(online, ["1", "2"])
        [payload] = responder.seen
        self.assertEqual(payload["method"], "presence.online")
        self.assertEqual(payload["timeout"], 3.0)
        self.assertEqual(payload["reply_to"], "list:response:" + payload["correlation_id"])
        uuid.UUID(payload["correlation_id"])
        # the reply list is gone once read
        self.assertEqual(self.r.exists(payload["reply_to"]), 0)
        result = yield deferToThread(self.publisher.call, "anything", {"a": 1}, 3.0)
        self.assertEqual(result, {"online": None})

    @inlineCallbacks
    def test_errors_are_typed(self) -> Any:
        codes = {"m1": "method_not_found", "m2": "invalid_params", "m3": "forbidden",
                 "m4": "deadline_exceeded", "m5": "internal_error", "m6": "brand_new_code"}
        self.respond(lambda p: [reply(p, error=f"no: {p['method']}", code=codes[p["method"]])])
        expected = {"m1": MethodNotFound, "m2": InvalidParams, "m3": Forbidden,
                    "m4": DeadlineExceeded, "m5": InternalError, "m6": BackendCallError}
        for method, cls in expected.items():
            d = deferToThread(self.publisher.call, method, {}, 3.0)
            error = yield self.assertFailure(d, cls)
            self.assertIsInstance(error, BackendCallError)
            self.assertEqual(error.error_code, codes[method])
            self.assertEqual(str(error), f"no: {method}")
            self.assertEqual(error.reply["error_code"], codes[method])
            self.assertEqual(error.correlation_id, error.reply["correlation_id"])

    @inlineCallbacks
    def test_other_replies_are_skipped(self) -> Any:
        """A reply for another correlation id, or not an object, is not taken for ours."""
        self.respond(lambda p: [[1, 2], reply({"correlation_id": "someone-else"}, result=1),
                                reply(p, result=2)])
        result = yield deferToThread(self.publisher.call, "m", {}, 3.0)
        self.assertEqual(result, 2)

    @inlineCallbacks
    def test_timeout(self) -> Any:
        """No server: CallTimeout after the timeout, and the entry waits in the stream."""
        d = deferToThread(self.publisher.call, "presence.list", {"room": "r"}, 0.3)
        error = yield self.assertFailure(d, CallTimeout)
        self.assertIsInstance(error, TimeoutError)
        self.assertEqual(self.r.xlen(STREAM), 1)
        with self.assertRaises(ValueError):
            self.publisher.call("m", {}, timeout=0)

    @inlineCallbacks
    def test_late_server(self) -> Any:
        """A reply that comes while call() still waits is taken."""
        responder = Responder(self.r, lambda p: [reply(p, result="late")])
        d = deferToThread(self.publisher.call, "m", {}, 3.0)
        # the request is in the stream, and call() waits for the reply
        yield wait_until(lambda: self.r.xlen(STREAM) == 1, what="the request")
        responder.loop.start(0.01)
        self.addCleanup(lambda: responder.loop.running and responder.loop.stop())
        result = yield d
        self.assertEqual(result, "late")
