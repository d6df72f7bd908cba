"""
Streamed messages in the generated clients and the browser example
(PROTOCOL.md section 5.1): ``client.messages(room, handler)`` in TypeScript
and Python, and the example page's "Assistant" panel.

- L{TrackerRuleTests}: the Python client's rules alone (append at
  ``last_seq`` + 1, replace on ``seq`` 0, ignore ``last_seq`` <= held, whole
  messages, gaps, errors, contract breaks reported, lost messages, the feed's
  iterator), no server.
- L{ScriptedServerTests}: both clients against a scripted server that plays
  the contract exactly (a join's ``streaming``, a rejoin's ``missed`` and
  ``recovered: false``), so the client side is checked whatever the node does:
  clients/typescript/e2e/messages-rules.test.mjs and a websockets server here.
- L{EndToEndTests}: a real node on a private Redis (history of 5 events, API
  key on), chunks published the way a backend does: through the HTTP API
  (Node, Chromium) and by XADD to ``stream:requests`` (Python).  Each client
  must hold exactly the full text at the end, across a connection the node
  drops mid-answer, a rejoin that cannot recover (``streaming`` then gives the
  answer so far), and, in Chromium, a page reloaded mid-answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import redis.asyncio
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers.node import SECRET, mint_token
from tests.helpers.pyclient import answer_auth_and_joins, wait_for
from tests.helpers.redis_server import start_redis
from tests.helpers.testserver import require_node_modules, run_node, start_test_node

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from unrealon_client import (
    Backoff,
    MessageSnapshot,
    MessageStreamError,
    RecoveryInfo,
    UnrealonClient,
)
from unrealon_client.messages import MessageTracker

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
#: the HTTP API key of the end-to-end node (PROTOCOL.md section 8)
API_KEY = "message-streams-test-api-key"
#: the end-to-end node's UNREALON_HISTORY_SIZE: small, so a rejoin can be made to fail
HISTORY_SIZE = 5
INGRESS_STREAM = "stream:requests"


def _report(out: bytes, err: bytes, limit: int = 8000) -> str:
    return (out + b"\n" + err).decode("utf-8", "replace")[-limit:]


def chunks_of(count: int, label: str = "answer") -> list[str]:
    """An answer's chunks: ``count`` pieces whose concatenation is the full text."""
    return [f"{label}-{i}" + (".\n" if i % 7 == 6 else " ") for i in range(count)]


def event(room: str, cursor: str, data: dict[str, Any]) -> dict[str, Any]:
    """A ``session.message`` notification as the server sends it."""
    return {"jsonrpc": "2.0", "method": "session.message",
            "params": {"room": room, "cursor": cursor, "data": data}}


def chunk_data(message_id: str, chunks: list[str], first: int, last: int, *,
               session: str = "s1", **extra: Any) -> dict[str, Any]:
    """The data of one event covering chunks first..last (PROTOCOL.md 5.1)."""
    return {"session_id": session, "message_id": message_id, "role": "assistant",
            "content": "".join(chunks[first:last + 1]), "seq": first, "last_seq": last,
            "done": last == len(chunks) - 1, **extra}


def assert_growing(snapshots: list[MessageSnapshot], full: str) -> None:
    """Every text is a prefix of the full text and none is shorter than the one before."""
    previous = ""
    for m in snapshots:
        assert full.startswith(m.text), f"not a prefix of the answer: {m.text[-40:]!r}"
        assert len(m.text) >= len(previous), "the text shrank"
        previous = m.text


class Watch:
    """Every snapshot of one room's feed, and the latest per message."""

    def __init__(self, client: UnrealonClient, room: str) -> None:
        self.seen: list[MessageSnapshot] = []
        self.latest: dict[str, MessageSnapshot] = {}
        self.feed = client.messages(room, self._add)

    def _add(self, m: MessageSnapshot) -> None:
        self.seen.append(m)
        self.latest[m.message_id] = m

    def last_seq(self, message_id: str) -> int | None:
        m = self.latest.get(message_id)
        return None if m is None else m.last_seq

    def done(self, message_id: str) -> bool:
        m = self.latest.get(message_id)
        return m is not None and m.done


# -- the rules alone ------------------------------------------------------------------------


class TrackerRuleTests(TestCase):
    """L{MessageTracker}: section 5.1's client rules, event by event."""

    def setUp(self) -> None:
        self.errors: list[Exception] = []
        self.tracker = MessageTracker(self.errors.append, lambda handler, m: handler(m))
        self.seen: list[MessageSnapshot] = []
        self.tracker.subscribe("session:s1", self.seen.append)
        self.chunks = chunks_of(10)

    def apply(self, first: int, last: int, message_id: str = "m", **extra: Any) -> None:
        self.tracker.apply("session:s1", chunk_data(message_id, self.chunks, first, last, **extra))

    def test_append_replace_and_ignore(self) -> None:
        self.apply(0, 0)
        self.apply(1, 3)  # seq = held + 1: appended
        self.apply(2, 3)  # last_seq <= held: ignored
        self.apply(1, 1)  # older: ignored
        self.apply(0, 5)  # seq 0: replaces (the whole message so far)
        self.apply(0, 4)  # seq 0 but last_seq <= held: ignored, not a shorter text
        self.apply(6, 9)
        self.assertEqual([m.last_seq for m in self.seen], [0, 3, 5, 9])
        self.assertEqual(self.seen[-1].text, "".join(self.chunks))
        self.assertEqual([m.done for m in self.seen], [False, False, False, True])
        self.assertEqual(self.seen[-1].fields, {"session_id": "s1", "message_id": "m", "role": "assistant"})
        self.assertEqual((self.seen[-1].role, self.seen[-1].session_id), ("assistant", "s1"))
        self.assertEqual(self.errors, [])

    def test_nothing_after_done(self) -> None:
        self.apply(0, 9)
        self.apply(0, 9)  # a repeat of the finished message: ignored quietly
        self.apply(10, 10)  # past its last chunk: a contract break, reported and ignored
        self.assertEqual(len(self.seen), 1)
        self.assertEqual(len(self.errors), 1)
        self.assertIsInstance(self.errors[0], MessageStreamError)

    def test_whole_message(self) -> None:
        self.tracker.apply("session:s1", {"session_id": "s1", "message_id": 7, "role": "user",
                                          "content": "hello", "lang": "en"})
        [m] = self.seen
        self.assertEqual((m.message_id, m.text, m.last_seq, m.done, m.streamed),
                         ("7", "hello", None, True, False))
        self.assertEqual(m.fields["lang"], "en")

    def test_gaps_and_error(self) -> None:
        self.apply(0, 3)
        self.tracker.apply("session:s1", {**chunk_data("m", self.chunks, 4, 9, error="model failed"),
                                          "content": "x", "gaps": [[4, 5], [7, 7]]})
        m = self.seen[-1]
        self.assertEqual((m.text, m.gaps, m.error, m.done), ("".join(self.chunks[:4]) + "x",
                                                              ((4, 5), (7, 7)), "model failed", True))
        self.assertEqual(self.errors, [])

    def test_first_event_past_zero_lists_the_chunks_before_it(self) -> None:
        self.apply(4, 5)  # e.g. a join with a since the application kept
        self.assertEqual((self.seen[-1].gaps, self.seen[-1].text), (((0, 3),), "".join(self.chunks[4:6])))
        self.assertEqual(self.errors, [])

    def test_contract_breaks_are_reported(self) -> None:
        self.apply(0, 2)
        self.apply(5, 5)  # chunks 3..4 never came: appended, listed in gaps, reported
        self.apply(4, 6)  # overlaps what is held: ignored, reported
        self.assertEqual([m.last_seq for m in self.seen], [2, 5])
        self.assertEqual(self.seen[-1].gaps, ((3, 4),))
        self.assertEqual(len(self.errors), 2, self.errors)
        self.assertIn("breaks PROTOCOL.md 5.1", str(self.errors[0]))

    def test_lost_messages(self) -> None:
        self.apply(0, 2, "kept")
        self.apply(0, 1, "ended")
        self.tracker.lose("session:s1", {"kept"})
        self.assertEqual([(m.message_id, m.lost) for m in self.seen[-1:]], [("ended", True)])
        self.assertEqual(self.seen[-1].text, "".join(self.chunks[:2]))
        self.tracker.forget("session:s1")
        self.assertEqual([(m.message_id, m.lost) for m in self.seen[-1:]], [("kept", True)])
        self.apply(3, 3, "kept")  # no longer held: starts again, the chunks before it in gaps
        self.assertEqual(self.seen[-1].gaps, ((0, 2),))

    def test_a_new_feed_gets_the_messages_in_progress(self) -> None:
        self.apply(0, 2, "a")
        self.apply(0, 9, "b")  # done: not in progress any more
        later: list[MessageSnapshot] = []
        self.tracker.subscribe("session:s1", later.append)
        self.tracker.subscribe("session:other", later.append)
        self.assertEqual([(m.message_id, m.last_seq) for m in later], [("a", 2)])

    def test_feed_iterator(self) -> None:
        async def scenario() -> list[tuple[str, int | None]]:
            feed = self.tracker.subscribe("session:s1", None)
            self.apply(0, 0, "a")
            self.apply(1, 1, "a")  # not read yet: replaces a's queued snapshot
            self.apply(0, 0, "b")
            got = []
            async for m in feed:
                got.append((m.message_id, m.last_seq))
                if len(got) == 2:
                    self.apply(2, 9, "a")
                if len(got) == 3:
                    self.tracker.close()  # the client closed: the iteration ends
            return got

        self.assertEqual(asyncio.run(scenario()), [("a", 1), ("b", 0), ("a", 9)])


# -- a scripted server -------------------------------------------------------------------------


class ScriptedServerTests(TestCase):
    """Both clients against a server that plays section 5.1 exactly, whatever a node does."""

    timeout = 60

    @inlineCallbacks
    def test_typescript_client(self) -> Any:
        """clients/typescript/e2e/messages-scripted.test.mjs (a scripted in-memory WebSocket)."""
        require_node_modules("typescript")
        out, err, code = yield run_node(["--test", "clients/typescript/e2e/messages-scripted.test.mjs"])
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, _report(out, err))
        self.assertIn("# fail 0", text)
        self.assertIn("# pass 3", text, _report(out, err))

    def test_python_client(self) -> Any:
        """
        A join's ``streaming``, live chunks, a recovered rejoin's ``missed``,
        then a rejoin with ``recovered: false`` whose ``streaming`` replaces
        the text (and loses the message that ended meanwhile): exactly the text.
        """
        from websockets.asyncio.server import ServerConnection, serve

        room, chunks = "session:s1", chunks_of(10)

        def chunk(message_id: str, first: int, last: int, cursor: str) -> dict[str, Any]:
            return event(room, cursor, chunk_data(message_id, chunks, first, last))

        joins: list[dict[str, Any]] = []
        connections: list[ServerConnection] = []

        def join_result(index: int) -> dict[str, Any]:
            if index == 0:
                return {"room": room, "cursor": "c5", "recovered": False, "missed": [],
                        "streaming": [chunk("m1", 0, 2, "c4")]}
            if index == 1:
                return {"room": room, "cursor": "c9", "recovered": True,
                        "missed": [chunk("m1", 4, 6, "c9")], "streaming": []}
            return {"room": room, "cursor": "c20", "recovered": False, "missed": [],
                    "streaming": [chunk("m1", 0, 8, "c19")]}

        async def server(ws: ServerConnection) -> None:
            index = len(connections)
            connections.append(ws)

            def joined(params: dict[str, Any]) -> dict[str, Any]:
                joins.append(params)
                return join_result(index)

            await answer_auth_and_joins(ws, joined)

        async def scenario() -> None:
            async with serve(server, "127.0.0.1", 0) as listening:
                port = listening.sockets[0].getsockname()[1]
                c = UnrealonClient(f"ws://127.0.0.1:{port}/ws", token="t", track_implicit_rooms=False,
                                   heartbeat=0, backoff=Backoff(initial=0.01, maximum=0.01, jitter=0))
                errors: list[Exception] = []
                c.on("error", errors.append)
                recoveries: list[RecoveryInfo] = []
                c.on("recovery", recoveries.append)
                raw: list[tuple[Any, Any, bool, str]] = []
                c.on("session.message", lambda d, meta: raw.append((d.get("seq"), d.get("last_seq"),
                                                                    meta.replayed, meta.cursor)))
                watch = Watch(c, room)
                try:
                    await c.connect()
                    joined = await c.rooms.join(room=room)
                    assert len(joined["streaming"]) == 1
                    assert watch.latest["m1"].text == "".join(chunks[:3])
                    assert raw == [(0, 2, True, "c4")], raw
                    assert c.joined_rooms()[room] == "c5"  # the streaming event leaves the cursor alone

                    await connections[0].send(json.dumps(chunk("m1", 3, 3, "c6")))
                    await connections[0].send(json.dumps(event(room, "c7", {
                        "session_id": "s1", "message_id": "m2", "role": "assistant", "content": "other ",
                        "seq": 0, "last_seq": 0, "done": False})))
                    await wait_for(lambda: "m2" in watch.latest, what="m2")
                    await connections[0].close(1011)
                    await wait_for(lambda: len(joins) == 2 and watch.last_seq("m1") == 6, what="the missed chunks")
                    assert joins[1]["since"] == "c7", joins
                    assert watch.latest["m1"].text == "".join(chunks[:7])

                    await connections[1].send(json.dumps(chunk("m1", 7, 7, "c10")))
                    await wait_for(lambda: watch.last_seq("m1") == 7, what="chunk 7")
                    await connections[1].close(1011)
                    await wait_for(lambda: len(recoveries) == 2, what="the second rejoin")
                    assert joins[2]["since"] == "c10", joins
                    assert [r.recovered for r in recoveries] == [True, False], recoveries
                    lost = watch.latest["m2"]
                    assert (lost.lost, lost.done, lost.text) == (True, False, "other "), lost
                    assert watch.last_seq("m1") == 8

                    await connections[2].send(json.dumps(chunk("m1", 9, 9, "c21")))
                    await wait_for(lambda: watch.done("m1"), what="the last chunk")
                    m1 = [m for m in watch.seen if m.message_id == "m1"]
                    assert m1[-1].text == "".join(chunks), m1[-1]
                    assert [m.last_seq for m in m1] == [2, 3, 6, 7, 8, 9], m1
                    assert_growing(m1, "".join(chunks))
                    assert errors == [], errors
                finally:
                    await c.close()

        return deferToThread(asyncio.run, asyncio.wait_for(scenario(), 30))


# -- a real node on Redis ------------------------------------------------------------------


@attrs.frozen
class StreamNode:
    """A test node on a private Redis, with the HTTP API on."""

    ws_url: str
    http_url: str
    api_url: str
    redis_socket: str

    def env(self) -> dict[str, str]:
        return {"UNREALON_TEST_WS_URL": self.ws_url, "UNREALON_TEST_HTTP_URL": self.http_url,
                "UNREALON_TEST_API_URL": self.api_url, "UNREALON_TEST_API_KEY": API_KEY}


@inlineCallbacks
def start_stream_node(testcase: TestCase) -> Any:
    """Redis and a node on it (history of L{HISTORY_SIZE} events, API key on); fires with a L{StreamNode}."""
    redis = yield start_redis(testcase)
    server = yield start_test_node(reactor, SECRET, redis_url=f"unix://{redis.socket_path}?db=0",
                                   api_keys=API_KEY, history_size=HISTORY_SIZE)
    testcase.addCleanup(server.stop)
    info = server.info()
    return StreamNode(info["ws_url"], info["http_url"], info["health_url"].removesuffix("/health"),
                      redis.socket_path)


class Backend:
    """Publishes as a backend producer does: XADD to the ingress stream (PROTOCOL.md section 6)."""

    def __init__(self, redis_socket: str) -> None:
        self.redis = redis.asyncio.Redis(unix_socket_path=redis_socket, decode_responses=True)

    async def publish(self, method: str, params: dict[str, Any]) -> None:
        """XADD one request with a ``reply_to``, and wait for the node's reply (it was handled)."""
        reply_to = f"list:response:{uuid.uuid4()}"
        payload = {"method": method, "params": params, "reply_to": reply_to}
        await self.redis.xadd(INGRESS_STREAM, {"payload": json.dumps(payload)})
        answered = await self.redis.brpop([reply_to], timeout=5)
        assert answered is not None, f"no reply to {method} {params}"
        reply = json.loads(answered[1])
        assert reply["success"] is True, reply

    async def chunks(self, session: str, message_id: str, chunks: list[str], order: Iterable[int]) -> None:
        """XADD chunks in the given order of their seq; the last one carries done."""
        for seq in order:
            await self.publish("session.message", {
                "session_id": session, "message_id": message_id, "role": "assistant",
                "content": chunks[seq], "seq": seq, "done": seq == len(chunks) - 1,
            })

    async def close(self) -> None:
        await self.redis.aclose()


class EndToEndTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def setUp(self) -> Any:
        self.node = yield start_stream_node(self)

    # -- TypeScript ---------------------------------------------------------------------------

    @inlineCallbacks
    def test_typescript_client(self) -> Any:
        """clients/typescript/e2e/messages.test.mjs: a dropped connection, a late join, recovered false, whole and failed messages."""
        require_node_modules("typescript", "ws")
        out, err, code = yield run_node(["--test", "clients/typescript/e2e/messages.test.mjs"], self.node.env())
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, _report(out, err))
        self.assertIn("# fail 0", text)
        self.assertIn("# pass 4", text, _report(out, err))

    # -- Python ---------------------------------------------------------------------------------

    def run_scenario(self, scenario: Callable[[Backend, list[UnrealonClient]], Awaitable[None]],
                     limit: float = 60) -> Any:
        """Run an asyncio scenario in a thread (the reactor keeps serving the node)."""
        async def main() -> None:
            clients: list[UnrealonClient] = []
            backend = Backend(self.node.redis_socket)
            try:
                await asyncio.wait_for(scenario(backend, clients), limit)
            finally:
                for c in clients:
                    await c.close()
                await backend.close()

        return deferToThread(asyncio.run, main())

    def client(self, clients: list[UnrealonClient], **options: Any) -> UnrealonClient:
        options.setdefault("backoff", Backoff(initial=0.04, maximum=0.4))
        c = UnrealonClient(self.node.ws_url, token_provider=lambda: mint_token("alice", rooms=["*"]),
                           **options)
        clients.append(c)
        return c

    def test_python_client_across_a_dropped_connection(self) -> Any:
        """
        Chunks published by XADD (two of them swapped, as racing workers
        would), the node drops the connection mid-answer, more chunks come
        while the client is away: the feed ends with exactly the full text,
        through handler and iterator alike.
        """
        async def scenario(backend: Backend, clients: list[UnrealonClient]) -> None:
            c = self.client(clients)
            await c.connect()
            session, chunks = f"py-drop-{time.monotonic_ns()}", chunks_of(40)
            room, full = f"session:{session}", "".join(chunks)
            errors: list[Exception] = []
            c.on("error", errors.append)
            recoveries: list[RecoveryInfo] = []
            c.on("recovery", recoveries.append)
            watch = Watch(c, room)

            async def iterate() -> list[str]:
                texts = []
                async with c.messages(room) as feed:
                    async for m in feed:
                        texts.append(m.text)
                        if m.done:
                            break
                return texts

            iterated = asyncio.ensure_future(iterate())
            joined = await c.rooms.join(room=room)
            assert joined["streaming"] == [], joined
            await backend.chunks(session, "m1", chunks, [0, 1, 2, 3, 5, 4, *range(6, 15)])
            await wait_for(lambda: watch.last_seq("m1") == 14, what="chunk 14")
            await c.call("test.drop", {})
            await wait_for(lambda: c.state == "reconnecting", what="the drop")
            await backend.chunks(session, "m1", chunks, range(15, 30))
            await wait_for(lambda: c.state == "open", 8, "open again")
            await backend.chunks(session, "m1", chunks, range(30, 40))
            await wait_for(lambda: watch.done("m1"), 8, "the last chunk")
            last = watch.latest["m1"]
            assert (last.text, last.last_seq, last.gaps, last.error, last.lost) == (full, 39, (), None, False), last
            assert_growing(watch.seen, full)
            assert sum(m.done for m in watch.seen) == 1
            assert any(r.room == room and r.recovered for r in recoveries), recoveries
            texts = await asyncio.wait_for(iterated, 5)
            assert texts[-1] == full, texts[-1:]
            assert errors == [], errors

        return self.run_scenario(scenario)

    def test_python_client_late_join_and_failed_recovery(self) -> Any:
        """
        A client joining mid-answer gets the answer so far in the join's reply
        (``streaming``); after a rejoin that cannot recover, ``streaming`` gives
        the answer so far again (``seq`` 0 replaces) and a message that ended
        meanwhile is reported lost.
        """
        async def scenario(backend: Backend, clients: list[UnrealonClient]) -> None:
            session = f"py-late-{time.monotonic_ns()}"
            room = f"session:{session}"
            a, b = chunks_of(30, "kept"), chunks_of(12, "ended")
            await backend.chunks(session, "a", a, range(0, 10))
            await backend.chunks(session, "b", b, range(0, 5))
            c = self.client(clients, backoff=Backoff(initial=1.0, maximum=1.0, jitter=0))
            await c.connect()
            watch = Watch(c, room)
            recoveries: list[RecoveryInfo] = []
            c.on("recovery", lambda r: recoveries.append(r) if r.room == room else None)
            joined = await c.rooms.join(room=room)
            held = {n["params"]["data"]["message_id"]: n["params"]["data"]["last_seq"]
                    for n in joined["streaming"]}
            assert held == {"a": 9, "b": 4}, joined
            assert (watch.latest["a"].text, watch.latest["b"].text) == ("".join(a[:10]), "".join(b[:5]))

            await c.call("test.drop", {})
            await wait_for(lambda: c.state == "reconnecting", what="the drop")
            for i in range(HISTORY_SIZE + 3):  # more than the history keeps: recovered false
                await backend.publish("session.task_status",
                                      {"session_id": session, "task_id": f"t{i}", "status": "running"})
            await backend.chunks(session, "a", a, range(10, 20))
            await backend.chunks(session, "b", b, range(5, 12))  # b ends while the client is away
            await wait_for(lambda: bool(recoveries), 8, "the rejoin")
            assert recoveries[0].recovered is False, recoveries
            await wait_for(lambda: watch.last_seq("a") == 19, 3, "a's text so far, from streaming")
            assert watch.latest["a"].text == "".join(a[:20])
            lost = watch.latest["b"]
            assert (lost.lost, lost.done, lost.text) == (True, False, "".join(b[:5])), lost

            await backend.chunks(session, "a", a, range(20, 30))
            await wait_for(lambda: watch.done("a"), 8, "a's last chunk")
            assert watch.latest["a"].text == "".join(a)
            assert not any(m.lost for m in watch.seen if m.message_id == "a")
            assert_growing([m for m in watch.seen if m.message_id == "a"], "".join(a))

        return self.run_scenario(scenario)

    # -- Chromium -------------------------------------------------------------------------------

    @inlineCallbacks
    def test_browser_example_reload_and_drop_mid_answer(self) -> Any:
        """
        examples/browser's Assistant panel (clients/typescript/e2e/browser-messages.mjs):
        reloaded mid-answer it shows the answer so far at once, then the rest;
        its WebSocket closed mid-answer, it ends with exactly the full text.
        """
        if not os.path.exists(CHROMIUM):
            raise SkipTest(f"{CHROMIUM} is absent: apt-get update && apt-get install -y chromium")
        require_node_modules("playwright-core")
        with tempfile.TemporaryDirectory() as scratch:
            env = {**self.node.env(), "CHROMIUM": CHROMIUM, "HOME": scratch}
            out, err, code = yield run_node(["clients/typescript/e2e/browser-messages.mjs"], env)
        lines = out.decode("utf-8", "replace").strip().splitlines()
        report = _report(out, err)
        self.assertTrue(lines, report)
        dom = json.loads(lines[-1])
        self.assertEqual((code, dom.get("ok")), (0, True), report)
        full = dom["full"]
        self.assertEqual(dom["textsBeforeReload"][-1], dom["textBeforeReload"])
        # after the reload: the answer so far, from the join's reply, before any later chunk
        self.assertEqual((dom["textAtJoin"], dom["stateAtJoin"]), (dom["textBeforeReload"], "streaming"))
        self.assertEqual(dom["texts"][0], dom["textBeforeReload"])
        self.assertGreater(dom["refused"], 0)  # the page really was away while chunks 20..29 came
        self.assertFalse(dom["textWhileAway"].endswith(chunks_of(40, "browser")[29]))
        self.assertEqual(dom["sockets"], dom["socketsBeforeDrop"] + 1)
        previous = ""
        for text in dom["texts"]:
            self.assertTrue(full.startswith(text), f"not a prefix of the answer: {text[-40:]!r}")
            self.assertGreaterEqual(len(text), len(previous))
            previous = text
        self.assertEqual(dom["answers"], [{"id": "m1", "state": "done", "role": "assistant",
                                           "text": full, "note": ""}])
        self.assertEqual(dom["status"], "open")
        self.assertEqual([line for line in dom["logs"] if "error" in line.lower()], [])
