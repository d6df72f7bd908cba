"""
The generated Python client (clients/python) against a live node.

The node runs in trial's reactor, in this process (L{start_test_node}); each
scenario is an asyncio coroutine run by C{asyncio.run} in a worker thread
(C{deferToThread}), so the client has a loop of its own and the reactor keeps
serving it.  A thread rather than a subprocess: assertions fail in the test
method itself with their own traceback, nothing needs serialising, and there
is no interpreter start-up per test.  Every scenario is bounded by
C{asyncio.wait_for}, so a hang fails the test instead of blocking the
thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers.backendnode import BackendNode, start_backend_node
from tests.helpers.node import SECRET, mint_token
from tests.helpers.pyclient import answer_auth_and_joins, wait_for
from tests.helpers.testserver import start_test_node

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from unrealon_client import (
    CANCELLED,
    NO_WORKER,
    Backoff,
    CallTimeoutError,
    ConnectError,
    ConnectionClosedError,
    RecoveryInfo,
    RoomEventMeta,
    RpcError,
    StateChange,
    UnrealonClient,
)

_rooms = iter(range(1, 10**6))


def fresh(prefix: str = "workspace") -> str:
    return f"{prefix}:py-{next(_rooms)}"


async def cancel_task(task: asyncio.Future[Any]) -> None:
    """Cancel a call's task and check it ends cancelled (not with a result or an error)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    raise AssertionError("the call was not cancelled")


class Harness:
    """Clients of one scenario, closed at its end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clients: list[UnrealonClient] = []

    def client(self, sub: str = "alice", ttl: float = 300, rooms: list[str] | None = None,
               **options: Any) -> UnrealonClient:
        mints = {"count": 0}

        def provider() -> str:
            mints["count"] += 1
            return mint_token(sub, ttl=ttl, rooms=["*"] if rooms is None else rooms)

        options.setdefault("token_provider", provider)
        options.setdefault("backoff", Backoff(initial=0.04, maximum=0.4))
        c = UnrealonClient(self.url, **options)
        c.mints = mints  # type: ignore[attr-defined]
        c.states = []  # type: ignore[attr-defined]
        c.on("state", c.states.append)  # type: ignore[attr-defined]
        self.clients.append(c)
        return c

    async def connected(self, *args: Any, **kwargs: Any) -> UnrealonClient:
        c = self.client(*args, **kwargs)
        await c.connect()
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


class PythonClientTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        server = yield start_test_node(reactor, SECRET, history_size=50)
        self.addCleanup(server.stop)
        self.url = server.info()["ws_url"]

    def run_scenario(self, scenario: Callable[[Harness], Awaitable[None]], limit: float = 30) -> Any:
        async def main() -> None:
            harness = Harness(self.url)
            try:
                await asyncio.wait_for(scenario(harness), limit)
            finally:
                await harness.close()

        return deferToThread(asyncio.run, main())

    # -- calls ------------------------------------------------------------------

    def test_typed_calls(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected()
            assert c.state == "open" and c.user_id == "alice"
            assert (await c.system.ping())["pong"] is True
            assert (await c.system.info())["protocol"] == 1
            room = fresh()
            joined = await c.rooms.join(room=room)
            assert joined["room"] == room and joined["recovered"] is False and joined["missed"] == []
            assert room in (await c.rooms.list())["rooms"]
            assert [u["user_id"] for u in (await c.presence.list(room=room))["users"]] == ["alice"]
            assert (await c.presence.count(room=room))["users"] == 1
            assert await c.rooms.leave(room=room) == {"room": room}
            assert room not in c.joined_rooms()

        return self.run_scenario(scenario)

    def test_errors_and_timeouts(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected(rooms=["workspace:*"])
            for call, code in (
                (c.rooms.leave(room=fresh()), -32004),
                (c.rooms.join(room=fresh("session")), -32003),
                (c.call("no.such.method"), -32601),
            ):
                try:
                    await call
                except RpcError as e:
                    assert e.code == code, e
                else:
                    raise AssertionError(f"no {code}")
            started = time.monotonic()
            try:
                await c.call("test.sleep", {"ms": 1000}, timeout=0.1)
            except CallTimeoutError:
                assert time.monotonic() - started < 0.9
            else:
                raise AssertionError("no timeout")
            slow = asyncio.ensure_future(c.call("test.sleep", {"ms": 3000}))
            await c.call("test.drop", {})
            try:
                await slow
            except ConnectionClosedError as e:
                assert e.code == 1006, e
            else:
                raise AssertionError("the call in flight was not rejected")
            await wait_for(lambda: c.state == "open", 5, "open again")
            assert (await c.system.ping())["pong"] is True

        return self.run_scenario(scenario)

    # -- events -------------------------------------------------------------------

    def test_typed_events_and_presence(self) -> Any:
        async def scenario(h: Harness) -> None:
            a = await h.connected()
            room = fresh()
            await a.rooms.join(room=room)
            got: list[tuple[Any, RoomEventMeta]] = []
            a.on("workspace.file_changed", lambda data, meta: got.append((data, meta)))
            joined: list[Any] = []
            a.on("presence.joined", lambda params, meta: joined.append(params))
            data = {"workspace_id": "1", "path": "src/a.py", "change": "modified"}
            published = await a.call("test.publish", {"room": room, "event": "workspace.file_changed", "data": data})
            await wait_for(lambda: len(got) == 1, what="the event")
            assert got[0][0] == data
            assert got[0][1] == RoomEventMeta(room, published["cursor"], False)
            b = await h.connected("bob")
            await b.rooms.join(room=room)
            await wait_for(lambda: len(joined) == 1, what="presence.joined")
            assert joined[0]["user_id"] == "bob" and joined[0]["room"] == room

        return self.run_scenario(scenario)

    def test_chunks_reach_handlers_as_sent(self) -> Any:
        """The server orders chunks (PROTOCOL.md 5.1); the client passes events on as they come."""
        async def scenario(h: Harness) -> None:
            c = await h.connected()
            room = fresh("session")
            await c.rooms.join(room=room)
            seen: list[str] = []
            c.on("session.message", lambda m, meta: seen.append(f"{m['message_id']}/{m.get('seq', '-')}"))
            # test.publish bypasses the server's chunk ordering: what it sends arrives as sent
            for mid, seq in (("m1", 1), ("m1", 0), ("m3", None)):
                data = {"session_id": "s", "message_id": mid, "role": "assistant", "content": "x"}
                if seq is not None:
                    data["seq"] = seq
                await c.call("test.publish", {"room": room, "event": "session.message", "data": data})
            await wait_for(lambda: len(seen) == 3, what="three events")
            await asyncio.sleep(0.05)
            assert seen == ["m1/1", "m1/0", "m3/-"], seen

        return self.run_scenario(scenario)

    # -- recovery -----------------------------------------------------------------

    def _stream_across_drop(self, drop: dict[str, Any]) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected()
            room = fresh()
            await c.rooms.join(room=room)
            seen: list[int] = []
            replayed: list[int] = []
            recoveries: list[RecoveryInfo] = []

            def on_event(data: Any, meta: RoomEventMeta) -> None:
                seen.append(data["n"])
                if meta.replayed:
                    replayed.append(data["n"])

            c.on("workspace.state_changed", on_event)
            c.on("recovery", recoveries.append)
            await c.call("test.stream", {"room": room, "event": "workspace.state_changed", "count": 60,
                                         "interval_ms": 15, "data": {"workspace_id": "w", "state": "x"}})
            await wait_for(lambda: len(seen) >= 10, what="10 events")
            await c.call("test.drop", drop)
            await wait_for(lambda: len(seen) >= 60, 8, "60 events")
            assert seen == list(range(60)), seen
            assert any(r.room == room and r.recovered for r in recoveries), recoveries
            assert not any(not r.recovered for r in recoveries), recoveries
            lost: StateChange = next(s for s in c.states if s.state == "reconnecting")  # type: ignore[attr-defined]
            assert lost.code == drop.get("code", 1006), lost
            if drop.get("code") == 1001:
                assert lost.delay == 0, lost

        return self.run_scenario(scenario)

    def test_recovery_after_tcp_abort(self) -> Any:
        return self._stream_across_drop({})

    def test_recovery_after_1001_reconnects_at_once(self) -> Any:
        return self._stream_across_drop({"code": 1001})

    def test_recovered_false_reaches_the_application(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected(backoff=Backoff(initial=1.0, maximum=1.0, jitter=0))
            backend = await h.connected("backend-test")
            room = fresh()
            await c.rooms.join(room=room)
            recoveries: list[RecoveryInfo] = []
            c.on("recovery", recoveries.append)
            await c.call("test.drop", {})
            await wait_for(lambda: c.state == "reconnecting", what="reconnecting")
            await backend.call("test.publish", {"room": room, "event": "workspace.state_changed", "count": 60,
                                                "data": {"workspace_id": "w", "state": "x"}})
            await wait_for(lambda: any(r.room == room for r in recoveries), what="recovery")
            info = next(r for r in recoveries if r.room == room)
            assert info.recovered is False and info.missed == 0, info

        return self.run_scenario(scenario)

    def test_implicit_user_room_replayed_after_reconnect(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected("carol", backoff=Backoff(initial=1.0, maximum=1.0, jitter=0))
            backend = await h.connected("backend-test")
            notes: list[tuple[str, bool]] = []
            c.on("notification.send", lambda data, meta: notes.append((data["title"], meta.replayed)))

            async def note(title: str) -> None:
                await backend.call("test.publish", {"room": "user:carol", "event": "notification.send",
                                                    "data": {"user_id": "carol", "title": title, "message": "m"}})

            await note("one")
            await wait_for(lambda: len(notes) == 1, what="the first notification")
            await c.call("test.drop", {})
            await wait_for(lambda: c.state == "reconnecting", what="reconnecting")
            await note("two")
            pong = await c.system.ping()  # made while disconnected: waits for the next connection
            assert pong["pong"] is True
            await wait_for(lambda: len(notes) == 2, what="the missed notification")
            assert notes == [("one", False), ("two", True)], notes

        return self.run_scenario(scenario)

    def test_hanging_handshake_and_unanswered_pings(self) -> Any:
        """connect_timeout bounds a handshake; the heartbeat replaces a silent connection."""
        from websockets.asyncio.server import ServerConnection, serve

        async def scenario(h: Harness) -> None:
            silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            port = silent.sockets[0].getsockname()[1]
            c = h.client(connect_timeout=0.15)
            c.url = f"ws://127.0.0.1:{port}/ws"
            attempt = asyncio.ensure_future(c.connect())
            await wait_for(lambda: sum(s.state == "reconnecting" for s in c.states) >= 2, what="two attempts")  # type: ignore[attr-defined]
            await c.close()
            try:
                await attempt
            except ConnectionClosedError:
                pass
            else:
                raise AssertionError("connect() succeeded against a silent server")
            silent.close()

            connections = []

            async def fake(ws: ServerConnection) -> None:  # answers auth and joins, never pings
                connections.append(ws)
                await answer_auth_and_joins(ws, lambda params: {
                    "room": params["room"], "cursor": "c0", "recovered": False, "missed": []})

            async with serve(fake, "127.0.0.1", 0) as server:
                port = server.sockets[0].getsockname()[1]
                c = h.client(heartbeat=0.15)
                c.url = f"ws://127.0.0.1:{port}/ws"
                await c.connect()
                await wait_for(lambda: len(connections) >= 2, what="a second connection")
                lost = next(s for s in c.states if s.state == "reconnecting")  # type: ignore[attr-defined]
                assert (lost.code, lost.reason) == (1006, "heartbeat timeout"), lost
                await c.close()

        return self.run_scenario(scenario)

    # -- tokens and close codes ---------------------------------------------------------

    def test_token_refreshed_before_expiry(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected(ttl=3)
            first_exp = time.time() + 3
            await wait_for(lambda: c.mints["count"] >= 3, 9, "two refreshes")  # type: ignore[attr-defined]
            assert time.time() > first_exp - 1
            assert not any(s.state == "reconnecting" for s in c.states)  # type: ignore[attr-defined]
            assert (await c.system.ping())["pong"] is True

        return self.run_scenario(scenario)

    def test_4009_and_4001_take_a_new_token(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected()
            room = fresh()
            await c.rooms.join(room=room)
            for code in (4009, 4001):
                before = c.mints["count"]  # type: ignore[attr-defined]
                await c.call("test.drop", {"code": code})
                await wait_for(lambda code=code: any(s.code == code for s in c.states), what=f"{code}")  # type: ignore[attr-defined]
                await wait_for(lambda: c.state == "open", what="open again")
                assert c.mints["count"] == before + 1  # type: ignore[attr-defined]
                assert room in (await c.rooms.list())["rooms"]

        return self.run_scenario(scenario)

    def test_revoked_and_refused_rooms_are_forgotten(self) -> Any:
        async def scenario(h: Harness) -> None:
            grants = {"rooms": ["workspace:*"]}
            c = await h.connected(token_provider=lambda: mint_token("alice", rooms=grants["rooms"]))
            kept, refused = fresh(), fresh()
            await c.rooms.join(room=kept)
            revoked: list[str] = []
            c.on("rooms.revoked", lambda params, meta: revoked.append(params["room"]))
            await c.auth.refresh(token=mint_token("alice", rooms=["session:*"]))
            await wait_for(lambda: revoked == [kept], what="rooms.revoked")
            assert kept not in c.joined_rooms()
            await c.auth.refresh(token=mint_token("alice", rooms=["workspace:*"]))
            await c.rooms.join(room=refused)
            recoveries: list[RecoveryInfo] = []
            c.on("recovery", recoveries.append)
            grants["rooms"] = ["session:*"]
            await c.call("test.drop", {"code": 4009})
            await wait_for(lambda: any(r.room == refused for r in recoveries), what="the refused rejoin")
            info = next(r for r in recoveries if r.room == refused)
            assert not info.recovered and isinstance(info.error, RpcError) and info.error.code == -32003
            assert refused not in c.joined_rooms() and kept not in c.joined_rooms()

        return self.run_scenario(scenario)

    def test_4003_stops_reconnecting(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = await h.connected()
            await c.call("test.drop", {"code": 4003, "reason": "banned"})
            await wait_for(lambda: c.state == "closed", what="closed")
            closed = c.states[-1]  # type: ignore[attr-defined]
            assert (closed.code, closed.reason) == (4003, "banned"), closed
            mints = c.mints["count"]  # type: ignore[attr-defined]
            await asyncio.sleep(0.4)
            assert c.state == "closed" and c.mints["count"] == mints  # type: ignore[attr-defined]
            try:
                await c.system.ping()
            except ConnectionClosedError:
                pass
            else:
                raise AssertionError("a closed client still called")

        return self.run_scenario(scenario)

    def test_connect_to_a_server_that_is_down(self) -> Any:
        """connect() does not wait for ever: a clear error after its timeout, and the client closed."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        async def scenario(h: Harness) -> None:
            # a token someone put in the URL never reaches the message (nor a log)
            c = UnrealonClient(f"ws://user:pw@127.0.0.1:{port}/ws?token=SECRET-IN-URL", token="t",
                               backoff=Backoff(initial=0.05, maximum=0.2))
            h.clients.append(c)
            started = time.monotonic()
            try:
                await c.connect(timeout=1.0)
            except ConnectError as e:
                assert f"cannot connect to ws://127.0.0.1:{port}/ws:" in str(e), e
                assert "SECRET-IN-URL" not in str(e) and "pw" not in str(e), e
                assert "within 1.0 s" in str(e) and "refused" in str(e).lower(), e
                assert e.status is None
            else:
                raise AssertionError("connected to nothing")
            assert time.monotonic() - started < 3
            assert c.state == "closed"

        return self.run_scenario(scenario)

    def test_connect_refused_by_the_server(self) -> Any:
        """A handshake refusal another attempt cannot change is raised at once, with why."""
        async def scenario(h: Harness) -> None:
            c = UnrealonClient(self.url.replace("/ws", "/nope"), token="t")
            h.clients.append(c)
            try:
                await c.connect(timeout=10)
            except ConnectError as e:
                assert e.status == 404, e
                assert "/ws" in e.body, e.body
                assert "HTTP 404" in str(e), e
            else:
                raise AssertionError("connected to a wrong path")
            assert c.state == "closed"

        return self.run_scenario(scenario, limit=5)

    def test_invalid_fixed_token_closes(self) -> Any:
        async def scenario(h: Harness) -> None:
            c = h.client(token="not-a-jwt", token_provider=None)
            try:
                await c.connect()
            except ConnectionClosedError as e:
                assert e.code == 4001, e
            else:
                raise AssertionError("connected with a bad token")
            assert c.state == "closed"

        return self.run_scenario(scenario)


Json = dict[str, Any]


class ScriptedServer:
    """
    A WebSocket server the test plays the node of: it answers auth and rooms.join,
    and records every other request so the test can send progress and replies.
    """

    def __init__(self) -> None:
        self.requests: list[Json] = []
        self.ws: Any = None

    async def handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.ws = ws
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                m = json.loads(raw)
                if m["method"] == "auth.authenticate":
                    await self.send({"id": m["id"], "result": {"user_id": "alice",
                                                                "expires_at": time.time() + 300}})
                elif m["method"] == "rooms.join":
                    await self.send({"id": m["id"], "result": {
                        "room": m["params"]["room"], "cursor": "c0", "recovered": False, "missed": []}})
                else:
                    self.requests.append(m)

    async def send(self, message: Json) -> None:
        await self.ws.send(json.dumps({"jsonrpc": "2.0", **message}))

    async def progress(self, call_id: Any, seq: int, data: Any) -> None:
        await self.send({"method": "rpc.progress", "params": {"id": call_id, "seq": seq, "data": data}})

    async def request(self, method: str) -> Json:
        await wait_for(lambda: any(m["method"] == method for m in self.requests), what=method)
        return next(m for m in self.requests if m["method"] == method)


class BackendCallRuntimeTests(TestCase):
    """
    Backend calls in the runtime (PROTOCOL.md section 9) against a scripted server:
    progress routing and order, stream(), cancel by task cancellation and by timeout.
    The real node and worker: L{BackendCallEndToEndTests}.
    """

    timeout = 30

    def run_scripted(self, scenario: Callable[[UnrealonClient, ScriptedServer], Awaitable[None]]) -> Any:
        from websockets.asyncio.server import serve

        async def main() -> None:
            script = ScriptedServer()
            async with serve(script.handler, "127.0.0.1", 0) as server:
                port = server.sockets[0].getsockname()[1]
                c = UnrealonClient(f"ws://127.0.0.1:{port}/ws", token="t", heartbeat=0,
                                   track_implicit_rooms=False, reconnect=False)
                c.errors = []  # type: ignore[attr-defined]
                c.on("error", c.errors.append)  # type: ignore[attr-defined]
                try:
                    await asyncio.wait_for(c.connect(), 5)
                    await asyncio.wait_for(scenario(c, script), 15)
                finally:
                    await c.close()

        return deferToThread(asyncio.run, main())

    def test_progress_in_order_then_result(self) -> Any:
        async def scenario(c: UnrealonClient, s: ScriptedServer) -> None:
            got: list[tuple[int, Any]] = []
            events: list[str] = []
            c.on_any(lambda name, data, meta: events.append(name))
            call = asyncio.ensure_future(
                c.call("demo.count", {"to": 3}, on_progress=lambda item, seq: got.append((seq, item))))
            req = await s.request("demo.count")
            await s.progress(req["id"], 1, {"n": 1})
            await s.progress(req["id"], 2, {"n": 2})
            await s.progress(req["id"], 2, {"n": 2})  # a repeat: dropped
            await s.progress(req["id"], 1, {"n": 1})  # older: dropped
            await s.progress(9999, 1, {"n": -1})  # no such call: ignored
            await s.progress(req["id"], 3, {"n": 3})
            await s.send({"id": req["id"], "result": {"counted": 3}})
            assert await call == {"counted": 3}
            assert got == [(1, {"n": 1}), (2, {"n": 2}), (3, {"n": 3})], got
            assert events == [] and c.errors == [], (events, c.errors)  # type: ignore[attr-defined]

        return self.run_scripted(scenario)

    def test_stream_yields_items_then_result_or_raises(self) -> Any:
        async def scenario(c: UnrealonClient, s: ScriptedServer) -> None:
            stream = c.stream("demo.count", {"to": 2})
            items = []
            async with stream:
                req = await s.request("demo.count")
                for n in (1, 2):
                    await s.progress(req["id"], n, {"n": n})
                await s.send({"id": req["id"], "result": {"counted": 2}})
                async for item in stream:
                    items.append(item)
            assert items == [{"n": 1}, {"n": 2}] and stream.seq == 2, items
            assert stream.result == {"counted": 2}

            s.requests.clear()
            failing = c.stream("demo.fail")
            seen = []

            async def consume() -> None:
                async for item in failing:
                    seen.append(item)

            consumer = asyncio.ensure_future(consume())
            req = await s.request("demo.fail")
            await s.progress(req["id"], 1, "first")
            await s.send({"id": req["id"], "error": {"code": -32013, "message": "no worker",
                                                     "data": {"retryable": True}}})
            try:
                await consumer
            except RpcError as e:
                assert e.code == NO_WORKER and e.data == {"retryable": True}
            else:
                raise AssertionError("the stream's error was not raised")
            assert seen == ["first"]

        return self.run_scripted(scenario)

    def test_cancelling_the_task_sends_rpc_cancel(self) -> Any:
        async def scenario(c: UnrealonClient, s: ScriptedServer) -> None:
            got: list[Any] = []
            call = asyncio.ensure_future(c.call("demo.count", {}, on_progress=lambda i, n: got.append(i)))
            req = await s.request("demo.count")
            await s.progress(req["id"], 1, "a")
            await wait_for(lambda: got == ["a"], what="the first item")
            await cancel_task(call)
            cancel = await s.request("rpc.cancel")
            assert cancel["params"] == {"id": req["id"]}, cancel
            await s.progress(req["id"], 2, "b")  # given up on: dropped
            await s.send({"id": req["id"], "error": {"code": CANCELLED, "message": "cancelled"}})
            await s.send({"id": cancel["id"], "result": {"id": req["id"], "cancelled": True}})
            await asyncio.sleep(0.05)
            assert got == ["a"] and c.errors == [] and c.state == "open", (got, c.errors)  # type: ignore[attr-defined]

            # leaving a stream's block early cancels its call the same way
            s.requests.clear()
            async with c.stream("demo.count", {}) as stream:
                req = await s.request("demo.count")
                await s.progress(req["id"], 1, "x")
                async for item in stream:
                    assert item == "x"
                    break
            cancel = await s.request("rpc.cancel")
            assert cancel["params"] == {"id": req["id"]}, cancel

        return self.run_scripted(scenario)

    def test_a_timed_out_call_is_cancelled_on_the_server(self) -> Any:
        async def scenario(c: UnrealonClient, s: ScriptedServer) -> None:
            try:
                await c.call("demo.count", {}, 0.1)
            except CallTimeoutError:
                pass
            else:
                raise AssertionError("no timeout")
            req = await s.request("demo.count")
            cancel = await s.request("rpc.cancel")
            assert cancel["params"] == {"id": req["id"]}, cancel

        return self.run_scripted(scenario)


class BackendCallEndToEndTests(TestCase):
    """
    Backend methods through a node with Redis, served by a real worker
    (L{start_backend_node}): progress then result, stream(), task cancellation
    reaching the worker.
    """

    timeout = 90

    @inlineCallbacks
    def setUp(self) -> Any:
        self.backend: BackendNode = yield start_backend_node(self)

    def run_scenario(self, scenario: Callable[[UnrealonClient], Awaitable[None]]) -> Any:
        async def main() -> None:
            c = UnrealonClient(self.backend.ws_url, heartbeat=0, token_provider=lambda: mint_token(
                "alice", rooms=["*"], methods=["demo.*"]))
            try:
                await asyncio.wait_for(c.connect(), 10)
                await asyncio.wait_for(self._discovered(c, "demo.logged_count"), 15)
                await asyncio.wait_for(scenario(c), 30)
            finally:
                await c.close()

        return deferToThread(asyncio.run, main())

    @staticmethod
    async def _discovered(c: UnrealonClient, name: str) -> Json:
        """The node lists a worker's methods within 2 s of its declaring them."""
        while True:
            doc = await c.rpc.discover()
            found = [m for m in doc["methods"] if m["name"] == name]
            if found:
                return found[0]
            await asyncio.sleep(0.1)

    def test_progress_then_result_and_stream(self) -> Any:
        async def scenario(c: UnrealonClient) -> None:
            got: list[tuple[int, int]] = []
            result = await c.call("demo.logged_count", {"to": 4, "delay": 0.01},
                                  on_progress=lambda item, seq: got.append((seq, item["n"])))
            assert result == {"counted": 4} and got == [(1, 1), (2, 2), (3, 3), (4, 4)], (result, got)
            async with c.stream("demo.count", {"to": 3, "delay": 0.01}) as stream:
                items = [item["n"] async for item in stream]
            assert items == [1, 2, 3] and stream.result == {"counted": 3}, (items, stream.result)
            try:
                await c.call("demo.logged_count", {"to": 0})
            except RpcError as e:
                assert e.code == -32602, e
            else:
                raise AssertionError("bad params were accepted")

        return self.run_scenario(scenario)

    def test_task_cancellation_reaches_the_worker(self) -> Any:
        async def scenario(c: UnrealonClient) -> None:
            got: list[int] = []
            call = asyncio.ensure_future(c.call("demo.logged_count", {"to": 1000, "delay": 0.05},
                                                on_progress=lambda item, seq: got.append(item["n"])))
            await wait_for(lambda: len(got) >= 2, 10, "two progress items")
            await cancel_task(call)
            await wait_for(lambda: any(e["event"] == "cancelled" for e in self.backend.worker_log()),
                           10, "the worker's cancel")
            cancelled = next(e for e in self.backend.worker_log() if e["event"] == "cancelled")
            assert cancelled["at"] < 1000, cancelled  # long before its end (and its 30 s deadline)
            seen = len(got)
            await asyncio.sleep(0.3)
            assert len(got) == seen, "progress after the cancel"
            assert (await c.system.ping())["pong"] is True

        return self.run_scenario(scenario)
