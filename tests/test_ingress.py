"""
The backend ingress end to end (PROTOCOL.md section 6): a private
redis-server, real nodes, real WebSocket clients, and entries appended the
way backends append them (the producer library, unrealon_backend, or raw
XADDs of the documented payload).
"""

from __future__ import annotations

import calendar
import json
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from unrealon_backend import Publisher

from tests.helpers import ingress_support as support
from tests.helpers.ingress_support import (
    DEAD,
    GROUP,
    STREAM,
    TIMESTAMP_RE,
    group_info,
    sync_redis,
    wait_reply,
    xadd_payload,
)
from tests.helpers.node import mint_token, start_node
from tests.helpers.process import NodeProcess
from tests.helpers.redis_server import start_redis
from tests.helpers.waiting import wait_until

ROOMS = ["workspace:*", "session:*"]


class IngressTestCase(TestCase):
    """A private Redis, a producer connection to it, and node/client helpers."""

    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Any:
        self._clients: list[tuple[Any, Any]] = []
        self.server = yield self.start_server()
        self.r = sync_redis(self.server.url)
        self.addCleanup(self.r.close)
        self.publisher = Publisher(self.r)

    def start_server(self) -> Any:
        return start_redis(self)

    def node(self, **overrides: Any) -> Any:
        overrides.setdefault("redis_url", self.server.url)
        return start_node(self, **overrides)

    @inlineCallbacks
    def client(self, running: Any, user: str = "7", rooms: list[str] | None = None,
               join: tuple[str, ...] = ()) -> Any:
        client = yield running.connect(mint_token(user, rooms=ROOMS if rooms is None else rooms))
        if not self._clients:
            self.addCleanup(self.close_clients)
        self._clients.append((running, client))
        for room in join:
            yield client.call("rooms.join", {"room": room})
        return client

    @inlineCallbacks
    def close_clients(self) -> Any:
        """
        Close, and wait until each node has seen its connections go (their
        presence clean-up is then on its way; stopping the node waits for it).
        """
        for _, client in self._clients:
            yield client.close()
        for running, _ in self._clients:
            yield wait_until(lambda r=running: r.node.hub.connection_count == 0, what="closed")

    def request(self, method: str, params: Any, **extra: Any) -> tuple[str, str]:
        """XADD a request with a fresh reply_to; (entry id, reply_to)."""
        cid = f"c-{time.monotonic_ns()}"
        reply_to = f"list:response:{cid}"
        payload = {"method": method, "params": params, "correlation_id": cid,
                   "reply_to": reply_to, **extra}
        return xadd_payload(self.r, payload), reply_to

    @inlineCallbacks
    def reply(self, reply_to: str, timeout: float = 5.0) -> Any:
        reply, _ = yield wait_reply(self.r, reply_to, timeout)
        return reply

    @inlineCallbacks
    def error_code(self, method: str, params: Any, **extra: Any) -> Any:
        _, reply_to = self.request(method, params, **extra)
        reply = yield self.reply(reply_to)
        self.assertFalse(reply["success"], reply)
        self.assertEqual(reply["type"], "error")
        self.assertIsNone(reply["result"])
        return reply["error_code"]

    @inlineCallbacks
    def assert_quiet(self, client: Any) -> Any:
        """
        Nothing more arrives on C{client}: once every entry is acknowledged
        (none can be handled, so publish, again), a marker published behind
        them on the one ordered cluster feed is the next thing it receives.
        """
        yield wait_until(lambda: self.pending() == 0 and group_info(self.r)["lag"] == 0,
                         what="every entry acknowledged")
        running = self._clients[0][0]
        yield running.node.broker.publish("broadcast", "test.barrier", {})
        message = yield client.next()
        self.assertEqual(message.get("method"), "test.barrier", message)

    def pending(self) -> int:
        return int(group_info(self.r)["pending"])


class DeliveryTests(IngressTestCase):
    @inlineCallbacks
    def test_producer_event_reaches_client_and_reply_layout(self) -> Any:
        """
        An event appended by the producer library reaches a joined browser as
        the catalogue notification (numbers as strings, extras kept); a
        request with reply_to gets the documented reply, with a 60 s TTL.
        """
        running = yield self.node()
        client = yield self.client(running, join=("workspace:42",))
        entry_id = self.publisher.file_changed(42, "src/a.py", "modified", size=120,
                                               author={"id": 5})
        self.assertRegex(entry_id, r"^\d+-\d+$")
        event = yield client.next()
        self.assertEqual(event["jsonrpc"], "2.0")
        self.assertNotIn("id", event)
        self.assertEqual(event["method"], "workspace.file_changed")
        params = event["params"]
        self.assertEqual(params["room"], "workspace:42")
        self.assertIsInstance(params["cursor"], str)
        self.assertEqual(
            params["data"],
            {"workspace_id": "42", "path": "src/a.py", "change": "modified", "size": 120,
             "author": {"id": 5}},
        )

        # the same through a raw XADD with correlation_id and reply_to
        before = time.time()
        payload = {"method": "workspace.file_changed",
                   "params": {"workspace_id": 42, "path": "b.txt", "change": "created"},
                   "correlation_id": "corr-1", "reply_to": "list:response:corr-1",
                   "timeout": 30}
        xadd_payload(self.r, payload)
        reply, ttl = yield wait_reply(self.r, "list:response:corr-1")
        event = yield client.next()
        self.assertEqual(event["params"]["data"]["path"], "b.txt")
        self.assertEqual(
            set(reply), {"type", "correlation_id", "success", "result", "error", "error_code",
                         "timestamp"})
        self.assertEqual(reply["type"], "response")
        self.assertEqual(reply["correlation_id"], "corr-1")
        self.assertIs(reply["success"], True)
        self.assertEqual(reply["result"], {"room": "workspace:42",
                                           "cursor": event["params"]["cursor"]})
        self.assertIsNone(reply["error"])
        self.assertIsNone(reply["error_code"])
        self.assertRegex(reply["timestamp"], TIMESTAMP_RE)
        stamp = calendar.timegm(time.strptime(reply["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
        self.assertLess(abs(stamp - before), 5)
        self.assertTrue(55 <= ttl <= 60, ttl)
        # acknowledged, and nothing else was sent
        yield wait_until(lambda: self.pending() == 0, what="pending 0")
        yield self.assert_quiet(client)

    @inlineCallbacks
    def test_every_catalogue_event_goes_to_its_room(self) -> Any:
        running = yield self.node()
        member = yield self.client(running, user="7", join=("workspace:9", "session:s-1"))
        other = yield self.client(running, user="8")
        p = self.publisher
        p.file_changed("9", "a", "renamed", old_path="b")
        p.snapshot_created(9, 77, label="nightly")
        p.state_changed(9, "running")
        p.session_message("s-1", 3, "assistant", "Hel", seq=0)
        p.session_message("s-1", 3, "assistant", "lo", seq=1, done=True)
        p.task_status("s-1", "t1", "running", progress=0.5)
        p.context_updated("s-1", files=["a"])
        p.notify(7, "Hi", "for seven", level="success", data={"k": 1})
        p.broadcast("All", "for everyone", level="warning")
        p.publish("workspace:9", "custom.thing", {"x": 1})
        expected = [
            ("workspace.file_changed", "workspace:9",
             {"workspace_id": "9", "path": "a", "change": "renamed", "old_path": "b"}),
            ("workspace.snapshot_created", "workspace:9",
             {"workspace_id": "9", "snapshot_id": "77", "label": "nightly"}),
            ("workspace.state_changed", "workspace:9", {"workspace_id": "9", "state": "running"}),
            ("session.message", "session:s-1",
             {"session_id": "s-1", "message_id": "3", "role": "assistant", "content": "Hel",
              "seq": 0, "last_seq": 0, "done": False}),
            ("session.message", "session:s-1",
             {"session_id": "s-1", "message_id": "3", "role": "assistant", "content": "lo",
              "seq": 1, "last_seq": 1, "done": True}),
            ("session.task_status", "session:s-1",
             {"session_id": "s-1", "task_id": "t1", "status": "running", "progress": 0.5}),
            ("session.context_updated", "session:s-1", {"session_id": "s-1", "files": ["a"]}),
            ("notification.send", "user:7",
             {"user_id": "7", "title": "Hi", "message": "for seven", "level": "success",
              "data": {"k": 1}}),
            ("notification.broadcast", "broadcast",
             {"title": "All", "message": "for everyone", "level": "warning"}),
            ("custom.thing", "workspace:9", {"x": 1}),
        ]
        got = []
        for _ in expected:
            event = yield member.next()
            got.append((event["method"], event["params"]["room"], event["params"]["data"]))
        self.maxDiff = None
        self.assertEqual(got, expected)
        # the other user is in none of those rooms but broadcast
        event = yield other.next()
        self.assertEqual((event["method"], event["params"]["room"]),
                         ("notification.broadcast", "broadcast"))
        yield self.assert_quiet(other)
        yield self.assert_quiet(member)

    @inlineCallbacks
    def test_defaults_and_raw_numbers(self) -> Any:
        """Defaults (level info) are filled in; numeric ids via raw XADD become strings."""
        running = yield self.node()
        client = yield self.client(running, user="12", join=("session:5",))
        _, reply_to = self.request("notification.send",
                                   {"user_id": 12, "title": "t", "message": "m"})
        reply = yield self.reply(reply_to)
        self.assertEqual(reply["result"]["room"], "user:12")
        event = yield client.next()
        self.assertEqual(event["params"]["data"],
                         {"user_id": "12", "title": "t", "message": "m", "level": "info"})
        _, reply_to = self.request("session.task_status",
                                   {"session_id": 5, "task_id": 6, "status": "queued"})
        reply = yield self.reply(reply_to)
        self.assertEqual(reply["result"]["room"], "session:5")
        event = yield client.next()
        self.assertEqual(event["params"]["data"],
                         {"session_id": "5", "task_id": "6", "status": "queued"})

    @inlineCallbacks
    def test_one_node_keeps_stream_order_per_room(self) -> Any:
        """
        Streamed chunks reach clients in seq order, contiguous, every one once
        (chunks that arrive together may come as one event: section 5.1).
        """
        running = yield self.node()
        client = yield self.client(running, join=("session:1",))
        count = 200
        for seq in range(count):
            self.publisher.session_message(1, "m", "assistant", f"c{seq},", seq=seq,
                                           done=seq == count - 1)
        ranges, text = [], ""
        while not ranges or ranges[-1][1] != count - 1:
            event = yield client.next()
            data = event["params"]["data"]
            ranges.append((data["seq"], data["last_seq"]))
            text += data["content"]
        self.assertEqual([first for first, _ in ranges],
                         [0] + [last + 1 for _, last in ranges[:-1]])
        self.assertEqual(text, "".join(f"c{seq}," for seq in range(count)))


class ValidationTests(IngressTestCase):
    @inlineCallbacks
    def test_invalid_params_replies(self) -> Any:
        """Bad enums, renamed without old_path, missing and mistyped fields: invalid_params."""
        running = yield self.node()
        client = yield self.client(running, join=("workspace:1", "session:1"))
        fc = {"workspace_id": "1", "path": "a"}
        sm = {"session_id": "1", "message_id": "m", "role": "user", "content": "x"}
        cases = [
            ("workspace.file_changed", {**fc, "change": "moved"}),
            ("workspace.file_changed", {**fc, "change": "renamed"}),
            ("workspace.file_changed", {**fc, "change": "renamed", "old_path": ""}),
            ("workspace.file_changed", {"workspace_id": "1", "change": "created"}),
            ("workspace.file_changed", {**fc, "change": "created", "path": 5}),
            ("workspace.file_changed", {**fc, "change": "created", "workspace_id": True}),
            ("workspace.file_changed", {**fc, "change": "created", "workspace_id": None}),
            ("workspace.snapshot_created", {"workspace_id": "1"}),
            ("workspace.state_changed", {"workspace_id": "1", "state": ["x"]}),
            ("session.message", {**sm, "role": "bot"}),
            ("session.message", {**sm, "seq": "1"}),
            ("session.message", {**sm, "seq": -1}),
            ("session.message", {**sm, "done": "yes"}),
            ("session.message", {k: v for k, v in sm.items() if k != "content"}),
            ("session.task_status", {"session_id": "1", "task_id": "t", "status": "done"}),
            ("session.task_status",
             {"session_id": "1", "task_id": "t", "status": "running", "progress": 1.5}),
            ("session.context_updated", {}),
            ("notification.send", {"user_id": "7", "title": "t", "message": "m",
                                   "level": "critical"}),
            ("notification.send", {"user_id": "7", "title": "t", "message": "m", "data": [1]}),
            ("notification.send", {"user_id": "a b", "title": "t", "message": "m"}),
            ("notification.broadcast", {"title": "t"}),
            ("notification.broadcast", {"title": "t", "message": "m", "level": "loud"}),
            ("publish", {"room": "bad room", "event": "e", "data": {}}),
            ("publish", {"room": "workspace:1", "data": {}}),
            ("publish", {"room": "workspace:1", "event": "e", "data": "x"}),
            ("presence.list", {}),
            ("presence.online", {"user_ids": "7"}),
            ("connections.disconnect", {}),
            ("presence.list", {"room": "workspace:1", "extra": 1}),
        ]
        sent = [(method, params, self.request(method, params)[1]) for method, params in cases]
        for method, params, reply_to in sent:
            reply = yield self.reply(reply_to)
            self.assertEqual(
                (reply["success"], reply["type"], reply["error_code"]),
                (False, "error", "invalid_params"), f"{method} {params}: {reply}")
            self.assertIsInstance(reply["error"], str)
        # the error names the field
        _, reply_to = self.request("workspace.file_changed", {**fc, "change": "moved"})
        reply = yield self.reply(reply_to)
        self.assertIn("change", reply["error"])
        _, reply_to = self.request("workspace.file_changed", {**fc, "change": "renamed"})
        reply = yield self.reply(reply_to)
        self.assertIn("old_path", reply["error"])
        # none of them reached a client, and all were acknowledged
        yield self.assert_quiet(client)
        self.assertEqual(self.pending(), 0)

    @inlineCallbacks
    def test_valid_enum_values(self) -> Any:
        running = yield self.node()
        client = yield self.client(running, join=("workspace:1", "session:1"))
        values = [
            ("workspace.file_changed", "change",
             {"workspace_id": "1", "path": "a", "old_path": "z"},
             ["created", "modified", "deleted", "renamed"]),
            ("session.message", "role",
             {"session_id": "1", "message_id": "m", "content": "x"},
             ["user", "assistant", "system", "tool"]),
            ("session.task_status", "status", {"session_id": "1", "task_id": "t"},
             ["queued", "running", "succeeded", "failed", "cancelled"]),
            ("notification.send", "level", {"user_id": "7", "title": "t", "message": "m"},
             ["info", "success", "warning", "error"]),
        ]
        count = 0
        for method, name, base, allowed in values:
            for value in allowed:
                xadd_payload(self.r, {"method": method, "params": {**base, name: value}})
                count += 1
        seen = []
        for _ in range(count):
            event = yield client.next()
            seen.append(event["method"])
        self.assertEqual(len(seen), count)

    @inlineCallbacks
    def test_error_codes(self) -> Any:
        """Unknown and client-only names: method_not_found; a refusal: forbidden."""
        yield self.node(extensions=(support.register,))
        for method in ("no.such.method", "rooms.join", "system.ping", "auth.authenticate"):
            code = yield self.error_code(method, {})
            self.assertEqual(code, "method_not_found", method)
        code = yield self.error_code("test.forbidden", {})
        self.assertEqual(code, "forbidden")
        # without a reply_to, a refused entry is dead-lettered (nobody else would hear of it)
        entry_id = xadd_payload(self.r, {"method": "no.such.method", "params": {}})
        dead = yield wait_until(lambda: self.r.xrange(DEAD), what="a dead letter")
        self.assertEqual(dead[-1][1]["entry_id"], entry_id)
        self.assertEqual(self.pending(), 0)

    @inlineCallbacks
    def test_backend_queries(self) -> Any:
        """presence.online / presence.list / connections.disconnect through call()."""
        from twisted.internet.threads import deferToThread

        running = yield self.node()
        client = yield self.client(running, user="7", join=("workspace:3",))
        online = yield deferToThread(self.publisher.presence_online, ["7", 8], 5.0)
        self.assertEqual(online, ["7"])
        users = yield deferToThread(self.publisher.presence_list, "workspace:3", 5.0)
        self.assertEqual(users, [{"user_id": "7", "info": {}, "connections": 1}])
        result = yield deferToThread(
            self.publisher.call, "connections.disconnect", {"user_id": 7, "reason": "bye"}, 5.0)
        self.assertEqual(result, {"user_id": "7"})
        code, _ = yield client.closed
        self.assertEqual(code, 4003)

    @inlineCallbacks
    def test_producer_call_errors(self) -> Any:
        """call() against a real node raises the typed error of each error_code."""
        import unrealon_backend as backend
        from twisted.internet.threads import deferToThread

        yield self.node(extensions=(support.register,))
        cases = [
            ("no.such.method", {}, backend.MethodNotFound),
            ("publish", {"room": "bad room", "event": "e", "data": {}}, backend.InvalidParams),
            ("test.forbidden", {}, backend.Forbidden),
        ]
        for method, params, cls in cases:
            d = deferToThread(self.publisher.call, method, params, 5.0)
            error = yield self.assertFailure(d, cls)
            self.assertEqual(error.error_code, cls.error_code)
        result = yield deferToThread(
            self.publisher.call, "publish", {"room": "workspace:1", "event": "e", "data": {}},
            5.0)
        self.assertEqual(result["room"], "workspace:1")


class MalformedTests(IngressTestCase):
    @inlineCallbacks
    def test_every_malformed_kind(self) -> Any:
        """
        Each kind of unreadable entry goes to the dead-letter stream with its
        reason and is acknowledged; those whose reply_to can be read also get
        an invalid_params reply; the consumer keeps going.
        """
        running = yield self.node()
        client = yield self.client(running, join=("workspace:1",))

        def raw(payload: Any, reply_to: str | None = None) -> str:
            if isinstance(payload, dict) and reply_to is not None:
                payload = {**payload, "reply_to": reply_to, "correlation_id": reply_to[-2:]}
            return xadd_payload(self.r, payload)

        ok_params = {"room": "workspace:1", "event": "e", "data": {}}
        cases = [
            # (entry id, reply_to the server can read or None, reason fragment)
            (raw("{not json"), None, "not JSON"),
            (raw("[1, 2, 3]"), None, "not a JSON object"),
            (raw('"a string"'), None, "not a JSON object"),
            (raw({"params": {}}, "list:response:m1"), "list:response:m1", "no method"),
            (raw({"method": 5, "params": {}}, "list:response:m2"), "list:response:m2",
             "no method"),
            (raw({"method": "", "params": {}}, "list:response:m3"), "list:response:m3",
             "no method"),
            (raw({"method": "publish", "params": [1]}, "list:response:m4"),
             "list:response:m4", "params"),
            (raw({"method": "publish", "params": "x"}, "list:response:m5"),
             "list:response:m5", "params"),
            (raw({"method": "publish", "params": ok_params, "reply_to": 5}), None, "reply_to"),
            (raw({"method": "publish", "params": ok_params, "timeout": -1},
                 "list:response:m6"), "list:response:m6", "timeout"),
            (raw({"method": "publish", "params": ok_params, "timeout": "5"},
                 "list:response:m7"), "list:response:m7", "timeout"),
            (raw({"method": "publish", "params": ok_params, "timeout": 0},
                 "list:response:m8"), "list:response:m8", "timeout"),
            (self.r.xadd(STREAM, {"data": "{}"}), None, "no payload"),
        ]
        # and after all of them, a good entry
        _, good_reply = self.request("publish", {**ok_params, "event": "after.malformed"})
        reply = yield self.reply(good_reply)
        self.assertTrue(reply["success"])
        event = yield client.next()
        self.assertEqual(event["method"], "after.malformed")

        for _, reply_to, _ in cases:
            if reply_to is None:
                continue
            reply = yield self.reply(reply_to)
            self.assertEqual((reply["type"], reply["success"], reply["error_code"]),
                             ("error", False, "invalid_params"))
            self.assertEqual(reply["correlation_id"], reply_to[-2:])
            self.assertIsNone(reply["result"])
        dead = yield wait_until(lambda: len(self.r.xrange(DEAD)) >= len(cases) and
                                self.r.xrange(DEAD), what="dead letters")
        by_entry = {fields["entry_id"]: fields for _, fields in dead}
        self.assertEqual(len(dead), len(cases))
        for entry_id, _, reason in cases:
            fields = by_entry[entry_id]
            self.assertIn(reason, fields["reason"])
            self.assertEqual(fields["stream"], STREAM)
            original = self.r.xrange(STREAM, entry_id, entry_id)[0][1]
            self.assertEqual(fields["payload"], original.get("payload", ""))
        self.assertEqual(self.pending(), 0)
        # nothing but the good event reached the client
        yield self.assert_quiet(client)
        # unanswerable ones have no reply list lying around
        self.assertEqual(self.r.keys("list:response:*"), [])


class DeadlineTests(IngressTestCase):
    @inlineCallbacks
    def test_stale_entry_is_not_delivered(self) -> Any:
        """An entry older than its timeout (by its id's time) gets deadline_exceeded only."""
        running = yield self.node()
        client = yield self.client(running, join=("workspace:1",))
        old_ms = int(time.time() * 1000) - 5000
        payload = {"method": "workspace.file_changed",
                   "params": {"workspace_id": "1", "path": "stale", "change": "created"},
                   "correlation_id": "old", "reply_to": "list:response:old", "timeout": 1}
        xadd_payload(self.r, payload, id=f"{old_ms}-0")
        reply = yield self.reply("list:response:old")
        self.assertEqual((reply["type"], reply["success"], reply["error_code"]),
                         ("error", False, "deadline_exceeded"))
        self.assertEqual(reply["correlation_id"], "old")
        # the same age without a timeout, and a fresh entry with one, are delivered
        xadd_payload(self.r, {**payload, "timeout": None, "reply_to": None,
                              "params": {**payload["params"], "path": "late-but-ok"}},
                     id=f"{old_ms + 1}-0")
        _, reply_to = self.request("workspace.file_changed",
                                   {"workspace_id": "1", "path": "fresh", "change": "created"},
                                   timeout=1)
        reply = yield self.reply(reply_to)
        self.assertTrue(reply["success"])
        paths = []
        for _ in range(2):
            event = yield client.next()
            paths.append(event["params"]["data"]["path"])
        self.assertEqual(paths, ["late-but-ok", "fresh"])
        yield self.assert_quiet(client)
        self.assertEqual(self.pending(), 0)
        self.assertEqual(self.r.xlen(DEAD), 0)

    @inlineCallbacks
    def test_handler_running_past_the_deadline(self) -> Any:
        """A handler still running when the entry's timeout passes: deadline_exceeded, acked."""
        from twisted.internet.defer import CancelledError

        support.SLOW.release_all()
        yield self.node(extensions=(support.register,), claim_idle=0.3)
        _, reply_to = self.request("test.slow", {"note": "late"}, timeout=0.5)
        reply = yield self.reply(reply_to)
        self.assertEqual(reply["error_code"], "deadline_exceeded")
        # acknowledged with its deadline reply: no claim can take it again, so
        # it is never retried (XAUTOCLAIM sees only pending entries)
        self.assertEqual(self.pending(), 0)
        self.assertEqual(support.SLOW.started, 1)
        self.assertEqual(self.r.xlen(DEAD), 0)
        self.flushLoggedErrors(CancelledError)  # unrealon.rpc logs the cancellation
        support.SLOW.release_all()

    def setUp(self) -> Any:
        support.SLOW = support.SlowCalls()
        return super().setUp()


class RecoveryTests(IngressTestCase):
    def setUp(self) -> Any:
        support.SLOW = support.SlowCalls()
        return super().setUp()

    @inlineCallbacks
    def test_poison_entry_is_dead_lettered(self) -> Any:
        """
        An entry whose handler always fails is retried (left pending, claimed
        again) until max_deliveries, then dead-lettered with the reason,
        answered internal_error and acknowledged.
        """
        yield self.node(extensions=(support.register,), claim_idle=0.2, max_deliveries=3)
        entry_id, reply_to = self.request("test.fail", {"note": "poison"})
        quiet_id = xadd_payload(self.r, {"method": "test.fail", "params": {}})
        dead = yield wait_until(lambda: len(self.r.xrange(DEAD)) == 2 and self.r.xrange(DEAD),
                                timeout=10, what="two dead letters")
        by_entry = {fields["entry_id"]: fields for _, fields in dead}
        self.assertEqual(set(by_entry), {entry_id, quiet_id})
        fields = by_entry[entry_id]
        self.assertIn("failed 3 times", fields["reason"])
        self.assertIn("Internal error", fields["reason"])
        self.assertEqual(fields["deliveries"], "3")
        self.assertEqual(fields["stream"], STREAM)
        self.assertEqual(json.loads(fields["payload"])["method"], "test.fail")
        reply = yield self.reply(reply_to)
        self.assertEqual((reply["success"], reply["error_code"]), (False, "internal_error"))
        # one reply only: the failed attempts before the last were not answered
        self.assertEqual(self.r.llen(reply_to), 0)
        yield wait_until(lambda: self.pending() == 0, what="pending 0")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 6)

    @inlineCallbacks
    def test_store_unavailable_is_retried_quietly(self) -> Any:
        """A handler that finds Redis unreachable is retried, then dead-lettered; no traceback."""
        yield self.node(extensions=(support.register,), claim_idle=0.2, max_deliveries=2)
        entry_id, reply_to = self.request("test.unavailable", {})
        reply = yield self.reply(reply_to, timeout=10)
        self.assertEqual(reply["error_code"], "internal_error")
        [(_, fields)] = self.r.xrange(DEAD)
        self.assertEqual(fields["entry_id"], entry_id)
        self.assertIn("failed 2 times: Backend unavailable", fields["reason"])
        self.assertEqual(self.pending(), 0)

    @inlineCallbacks
    def test_dead_consumer_entries_are_claimed(self) -> Any:
        """Entries a dead consumer read and never acknowledged are handled by a live node."""
        running = yield self.node(claim_idle=0.5)
        client = yield self.client(running, join=("workspace:1",))
        node_ingress = running.service.ingress
        yield node_ingress.stop()  # so the fake consumer reads them, not the node
        sent = [self.request("workspace.file_changed",
                             {"workspace_id": "1", "path": f"f{i}", "change": "created"})
                for i in range(3)]
        read = self.r.xreadgroup(GROUP, "dead-node", {STREAM: ">"}, count=10)
        self.assertEqual(len(read[0][1]), 3)
        self.assertEqual(self.r.xpending(STREAM, GROUP)["consumers"],
                         [{"name": "dead-node", "pending": 3}])
        started = time.monotonic()
        yield node_ingress.start()
        for _, reply_to in sent:
            reply = yield self.reply(reply_to)
            self.assertTrue(reply["success"])
        self.assertGreaterEqual(time.monotonic() - started, 0.4)  # only once idle
        paths = []
        for _ in sent:
            event = yield client.next()
            paths.append(event["params"]["data"]["path"])
        self.assertEqual(sorted(paths), ["f0", "f1", "f2"])
        yield wait_until(lambda: self.pending() == 0, what="pending 0")
        yield self.assert_quiet(client)

    @inlineCallbacks
    def test_restarted_node_handles_its_own_pending_entries(self) -> Any:
        """A node restarted under the same id takes back what it read before at once."""
        running = yield self.node(node_id="stable-node", claim_idle=30)
        yield running.service.ingress.stop()
        _, reply_to = self.request("presence.online", {"user_ids": ["x"]})
        self.r.xreadgroup(GROUP, "stable-node", {STREAM: ">"}, count=10)
        yield running.service.ingress.start()
        reply = yield self.reply(reply_to, timeout=3)
        self.assertEqual(reply["result"], {"online": []})

    @inlineCallbacks
    def test_backlog_and_claims_respect_the_bound(self) -> Any:
        """
        A restarted node's own backlog is taken first, then dead consumers'
        idle entries and new ones -- never more than max_in_flight at once.
        """
        running = yield self.node(node_id="stable-node", claim_idle=0.3, ingress_max_in_flight=2,
                                  extensions=(support.register,))
        ingress = running.service.ingress
        yield ingress.stop()
        own = [self.request("test.slow", {"note": f"own{i}"}) for i in range(4)]
        self.r.xreadgroup(GROUP, "stable-node", {STREAM: ">"}, count=10)
        dead = [self.request("test.slow", {"note": f"dead{i}"}) for i in range(3)]
        self.r.xreadgroup(GROUP, "dead-node", {STREAM: ">"}, count=10)
        new = [self.request("test.slow", {"note": f"new{i}"}) for i in range(2)]
        # the dead node's entries idle past claim_idle (XPENDING says so)
        yield wait_until(lambda: all(p["time_since_delivered"] >= 300 for p in
                                     self.r.xpending_range(STREAM, GROUP, "-", "+", 100,
                                                           consumername="dead-node")),
                         what="the dead node's entries idle")
        yield ingress.start()
        sent = own + dead + new
        for done in range(len(sent)):
            yield wait_until(lambda n=done: support.SLOW.waiting and
                             support.SLOW.started >= min(len(sent), n + 2),
                             what=f"call {done + 2}")
            # two in flight and the reader parked (or nothing left to read)
            yield wait_until(lambda n=done: ingress.waiting_for_a_slot or n + 2 >= len(sent),
                             what="the reader waiting for a slot")
            self.assertLessEqual(len(support.SLOW.waiting), 2)
            _, d = support.SLOW.waiting.pop(0)
            d.callback(None)
        notes = []
        for _, reply_to in sent:
            reply = yield self.reply(reply_to)
            notes.append(reply["result"]["note"])
        self.assertEqual(support.SLOW.most, 2)
        self.assertEqual(support.SLOW.started, len(sent))
        ids = [entry_id for entry_id, _ in sent]
        self.assertEqual(set(support.SLOW.order[:4]), set(ids[:4]))  # own backlog first
        yield wait_until(lambda: self.pending() == 0, what="pending 0")

    @inlineCallbacks
    def test_bounded_concurrency(self) -> Any:
        """With max_in_flight entries being handled, the node reads no more."""
        running = yield self.node(ingress_max_in_flight=2, extensions=(support.register,))
        ingress = running.service.ingress
        sent = [self.request("test.slow", {"note": str(i)}) for i in range(6)]
        yield wait_until(lambda: support.SLOW.started == 2, what="two calls started")
        # the reader parks until one finishes: nothing more is read meanwhile
        yield wait_until(lambda: ingress.waiting_for_a_slot, what="the reader waiting for a slot")
        self.assertEqual(support.SLOW.started, 2)
        info = group_info(self.r)
        self.assertEqual((info["pending"], info["lag"]), (2, 4))
        for finished in range(1, 7):
            _, d = support.SLOW.waiting.pop(0)
            d.callback(None)
            started = min(6, finished + 2)
            in_flight = min(2, 6 - finished)
            yield wait_until(lambda s=started, n=in_flight: support.SLOW.started == s and
                             self.pending() == n, what=f"{started} started")
            self.assertEqual(len(support.SLOW.waiting), in_flight)
            self.assertEqual(int(group_info(self.r)["lag"]), 6 - started)
        notes = []
        for _, reply_to in sent:
            reply = yield self.reply(reply_to)
            notes.append(reply["result"]["note"])
        self.assertEqual(sorted(notes), [str(i) for i in range(6)])
        self.assertEqual(support.SLOW.started, 6)
        yield wait_until(lambda: self.pending() == 0, what="pending 0")


class HealthTests(IngressTestCase):
    def setUp(self) -> Any:
        support.SLOW = support.SlowCalls()
        return super().setUp()

    @inlineCallbacks
    def health(self, running: Any) -> Any:
        code, body = yield running.http_get("/health")
        return code, json.loads(body)

    @inlineCallbacks
    def test_health_and_metrics(self) -> Any:
        running = yield self.node(ingress_max_in_flight=1, extensions=(support.register,))
        code, body = yield self.health(running)
        self.assertEqual((code, body["status"]), (200, "ok"))
        self.assertEqual(body["ingress"], {"lag": 0, "pending": 0, "dead": 0})
        xadd_payload(self.r, "not json")
        sent = [self.request("test.slow", {}) for _ in range(3)]
        yield wait_until(lambda: support.SLOW.started == 1, what="a slow call")
        code, body = yield wait_until(
            lambda: self.health(running).addCallback(
                lambda r: r if r[1]["ingress"] == {"lag": 2, "pending": 1, "dead": 1} else None),
            timeout=5, what="/health reporting lag 2, pending 1, dead 1")
        self.assertEqual((code, body["status"]), (200, "ok"))
        code, metrics = yield running.http_get("/metrics")
        text = metrics.decode()
        self.assertEqual(code, 200)
        for line in ("unrealon_ingress_lag 2.0", "unrealon_ingress_pending 1.0",
                     "unrealon_ingress_dead_letters 1.0",
                     'unrealon_ingress_entries_total{outcome="malformed"} 1.0'):
            self.assertIn(line, text)
        support.SLOW.release_all()
        for _, reply_to in sent:
            support.SLOW.release_all()
            yield self.reply(reply_to)
        code, metrics = yield running.http_get("/metrics")
        self.assertIn('unrealon_ingress_entries_total{outcome="ok"} 3.0', metrics.decode())
        self.assertIn("\nunrealon_redis_up 1.0\n", metrics.decode())

        # Redis goes away: 503 degraded, and unrealon_redis_up says so
        yield self.server.stop()
        code, body = yield self.health(running)
        self.assertEqual((code, body["status"]), (503, "degraded"))
        self.assertFalse(body["redis"]["ok"])
        yield wait_until(lambda: not running.service.node.broker.feed_ok, what="the outage seen")
        code, metrics = yield running.http_get("/metrics")
        self.assertIn("\nunrealon_redis_up 0.0\n", metrics.decode())
        # it comes back empty (no persistence): the group is recreated, 200 again,
        # and entries appended afterwards are handled
        yield self.server.start()

        code, body = yield wait_until(
            lambda: self.health(running).addCallback(lambda r: r if r[0] == 200 else None),
            timeout=15, what="/health 200 again")
        self.assertEqual(body["status"], "ok")
        r = sync_redis(self.server.url)
        self.addCleanup(r.close)
        self.r = r
        _, reply_to = self.request("presence.online", {"user_ids": []})
        reply = yield self.reply(reply_to, timeout=10)
        self.assertTrue(reply["success"])


class RedisRestartTests(IngressTestCase):
    def start_server(self) -> Any:
        return start_redis(self, persistent=True)

    @inlineCallbacks
    def test_consumer_survives_redis_restart(self) -> Any:
        """
        Redis restarts while a producer keeps appending: the consumer resumes
        by itself, every entry Redis accepted is handled and answered, and the
        client sees every event exactly once.
        """
        from twisted.internet.threads import deferToThread

        running = yield self.node(claim_idle=0.5)
        client = yield self.client(running, join=("workspace:1",))
        total = 60
        accepted: list[tuple[int, str]] = []
        producer = sync_redis(self.server.url)
        self.addCleanup(producer.close)
        publisher = Publisher(producer)

        def produce() -> None:
            # A producer that rides out the outage by retrying what failed.  A
            # retried XADD may have reached Redis before the connection broke
            # (then the stream holds the request twice, as two entries); the
            # attempt number tells such twins apart.
            import redis

            for i in range(total):
                deadline = time.monotonic() + 15
                attempt = 0
                while True:
                    try:
                        publisher.send(
                            "workspace.file_changed",
                            {"workspace_id": "1", "path": f"f{i}", "change": "modified",
                             "attempt": attempt},
                            correlation_id=str(i), reply_to=f"list:response:r{i}")
                        break
                    except Exception as e:
                        if time.monotonic() > deadline or not isinstance(
                                e.__cause__, redis.RedisError):
                            raise
                        attempt += 1
                        time.sleep(0.05)
                accepted.append((i, f"list:response:r{i}"))
                time.sleep(0.01)

        producing = deferToThread(produce)
        yield wait_until(lambda: len(accepted) >= 15, what="some entries")
        yield self.server.restart()
        restarted_at = len(accepted)
        yield producing
        self.assertLess(restarted_at, total)  # the restart happened mid-stream
        self.assertEqual(len(accepted), total)
        # every entry in the stream (what Redis accepted, twins included) ...
        entries = [json.loads(fields["payload"]) for _, fields in self.r.xrange(STREAM)]
        expected = sorted((e["params"]["path"], e["params"]["attempt"]) for e in entries)
        self.assertEqual(sorted({path for path, _ in expected}),
                         sorted(f"f{i}" for i in range(total)))
        # ... reaches the client exactly once
        got = []
        cursors = set()
        while len(got) < len(entries):
            event = yield client.next(timeout=10)
            data = event["params"]["data"]
            got.append((data["path"], data["attempt"]))
            cursors.add(event["params"]["cursor"])
        self.assertEqual(sorted(got), expected)
        self.assertEqual(len(cursors), len(entries))
        # ... and, once all are acknowledged (each reply precedes its ack), is answered
        yield wait_until(lambda: self.pending() == 0 and group_info(self.r)["lag"] == 0,
                         timeout=10, what="all acknowledged")
        replies = []
        for i, reply_to in accepted:
            for raw in self.r.lrange(reply_to, 0, -1):
                reply = json.loads(raw)
                self.assertTrue(reply["success"], reply)
                self.assertEqual(reply["correlation_id"], str(i))
                replies.append(i)
        self.assertEqual(sorted(set(replies)), list(range(total)))
        # one reply per entry, except that an entry handled again after the
        # restart (its ack lost) is answered again: at least once
        self.assertGreaterEqual(len(replies), len(entries))
        yield self.assert_quiet(client)
        yield wait_until(lambda: self.pending() == 0, what="pending 0")


class CrashTests(IngressTestCase):
    @inlineCallbacks
    def test_crash_between_publish_and_ack(self) -> Any:
        """
        A node process dies (os._exit) after publishing an entry's event but
        before replying and acknowledging.  After claim_idle another node
        claims the entry and handles it again; the publish is idempotent, so
        the browser gets the event exactly once, and the producer its reply.
        """
        claim_idle = 0.5
        running = yield self.node(node_id="node-b", claim_idle=claim_idle,
                                  extensions=(support.register,))
        client = yield self.client(running, join=("workspace:1",))
        # node-b stands aside while node-a takes the entry
        yield running.service.ingress.stop()
        process = NodeProcess(self, self.server.url, "node-a", {
            "UNREALON_CLAIM_IDLE": str(claim_idle),
            "UNREALON_EXTENSIONS": "tests.helpers.ingress_support:register",
            support.EXIT_ENV: "1",
        })
        # node-a is the only reader left once it serves
        yield process.start()
        entry_id, reply_to = self.request(
            "test.publish_then_exit",
            {"room": "workspace:1", "event": "crash.test", "data": {"n": 1}})
        status = yield process.wait_ended(timeout=15)
        self.assertEqual(status, (17, None), process.output())
        event = yield client.next()
        self.assertEqual((event["method"], event["params"]["data"]), ("crash.test", {"n": 1}))
        # published, not answered, not acknowledged: pending for the dead node-a
        self.assertEqual(self.r.llen(reply_to), 0)
        pending = self.r.xpending_range(STREAM, GROUP, "-", "+", 10)
        self.assertEqual([(p["message_id"], p["consumer"]) for p in pending],
                         [(entry_id, "node-a")])

        yield running.service.ingress.start()
        reply = yield self.reply(reply_to, timeout=5)
        self.assertTrue(reply["success"], reply)
        # the second handling's publish was a no-op: same cursor as the first
        self.assertEqual(reply["result"],
                         {"room": "workspace:1", "cursor": event["params"]["cursor"]})
        yield wait_until(lambda: self.pending() == 0, what="pending 0")
        yield self.assert_quiet(client)
        # and the room's history holds it once
        joined = yield client.call("rooms.join", {"room": "workspace:1",
                                                  "since": _start_cursor(event)})
        self.assertEqual([m["params"]["data"] for m in joined["missed"]], [{"n": 1}])


def _start_cursor(event: Any) -> str:
    """The cursor of the position before the room's first event (<epoch>:0-0)."""
    epoch = event["params"]["cursor"].split(":", 1)[0]
    return f"{epoch}:0-0"
