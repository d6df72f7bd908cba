"""
Streaming an AI answer from the backend package (PROTOCOL.md sections 5.1
and 6): L{Publisher.stream_message} and its asyncio twin
L{AsyncPublisher.stream_message}, against a private redis-server.  Each test
reads back what was appended to the ingress stream (XRANGE) and compares the
payloads with the contract's layout.

redis-py's sync client runs inline (short commands on the fixture's Unix
socket); the asyncio tests run their coroutine with C{asyncio.run} in a
thread, so the reactor stays free and trial's own loop is not involved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from unrealon_backend import (
    AsyncMessageStream,
    AsyncPublisher,
    BackendUnavailable,
    MessageStream,
    Publisher,
)

from tests.helpers.publishing import STREAM, PublisherTestCase


def chunk(seq: int, content: str, done: bool, *, session_id: str = "7",
          message_id: str = "m1", role: str = "assistant", **more: Any) -> dict[str, Any]:
    """The payload of one chunk as PROTOCOL.md section 6 has it (no timeout, no reply_to)."""
    return {"method": "session.message",
            "params": {"session_id": session_id, "message_id": message_id, "role": role,
                       "content": content, "seq": seq, "done": done, **more}}


class Flaky:
    """A redis client whose next C{failures} XADDs fail as if Redis were away."""

    def __init__(self, client: redis.Redis[str], failures: int) -> None:
        self.client = client
        self.failures = failures

    def xadd(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Redis went away")
        return self.client.xadd(*args, **kwargs)


class StreamTestCase(PublisherTestCase):
    timeout = 30

    def run_async(self, scenario: Callable[[AsyncPublisher], Awaitable[Any]],
                  **options: Any) -> Deferred[Any]:
        """Run C{scenario(publisher)} on an asyncio loop of its own, in a thread."""
        async def main() -> Any:
            async with AsyncPublisher(self.server.url, **options) as publisher:
                return await asyncio.wait_for(scenario(publisher), 20)

        return deferToThread(asyncio.run, main())


class SyncStreamTests(StreamTestCase):
    def test_chunks_are_numbered_and_the_last_is_done(self) -> None:
        with self.publisher.stream_message(7, "m1") as stream:
            self.assertIsInstance(stream, MessageStream)
            ids = [stream.append("Hel"), stream.append("lo"), stream.append(" world")]
            self.assertEqual((stream.seq, stream.text, stream.done), (3, "Hello world", False))
            self.assertEqual(len(self.entries()), 3)   # each chunk is appended at once
        self.assertEqual(self.payloads(), [
            chunk(0, "Hel", False), chunk(1, "lo", False), chunk(2, " world", False),
            chunk(3, "", True),
        ])
        self.assertEqual([e for e, _ in self.entries()[:3]], ids)
        self.assertEqual((stream.seq, stream.done, stream.error), (4, True, None))

    def test_finish_makes_the_last_chunk(self) -> None:
        with self.publisher.stream_message("7", "m1", role="tool") as stream:
            stream.append("a")
            entry_id = stream.finish("b")
            self.assertTrue(stream.done)
        self.assertEqual(self.payloads(), [chunk(0, "a", False, role="tool"),
                                           chunk(1, "b", True, role="tool")])
        self.assertEqual(self.entries()[-1][0], entry_id)
        self.assertEqual(stream.text, "ab")

    def test_finish_with_an_error(self) -> None:
        with self.publisher.stream_message(7, "m1") as stream:
            stream.finish(error="content filtered")
        self.assertEqual(self.payloads(), [chunk(0, "", True, error="content filtered")])
        self.assertEqual(stream.error, "content filtered")

    def test_an_exception_ends_the_message_in_error_and_propagates(self) -> None:
        failure = ValueError("model overloaded")
        with self.assertRaises(ValueError) as raised:
            with self.publisher.stream_message(7, "m1") as stream:
                stream.append("partial")
                raise failure
        self.assertIs(raised.exception, failure)
        self.assertEqual(self.payloads(), [
            chunk(0, "partial", False),
            chunk(1, "", True, error="ValueError: model overloaded"),
        ])
        self.assertEqual((stream.done, stream.error),
                         (True, "ValueError: model overloaded"))

    def test_error_text_is_capped_at_2000_characters(self) -> None:
        with self.assertRaises(RuntimeError):
            with self.publisher.stream_message(7, "m1"):
                raise RuntimeError("x" * 5000)
        [payload] = self.payloads()
        self.assertEqual(payload["params"]["error"], "RuntimeError: " + "x" * 1986)
        self.assertEqual(len(payload["params"]["error"]), 2000)

    def test_error_text_of_an_exception_without_message(self) -> None:
        class ModelGone(Exception):
            pass

        with self.assertRaises(ModelGone):
            with self.publisher.stream_message(7, "m1"):
                raise ModelGone()
        self.assertEqual(self.payloads(), [chunk(0, "", True, error="ModelGone")])

    def test_nothing_more_after_done(self) -> None:
        with self.publisher.stream_message(7, "m1") as stream:
            stream.append("a")
        for attempt in (lambda: stream.append("late"), lambda: stream.append(""),
                        lambda: stream.finish("late"), lambda: stream.finish()):
            self.assertRaises(RuntimeError, attempt)
        self.assertEqual(len(self.entries()), 2)

    def test_nothing_more_after_an_error(self) -> None:
        with self.assertRaises(KeyError):
            with self.publisher.stream_message(7, "m1") as stream:
                raise KeyError("k")
        self.assertRaises(RuntimeError, stream.append, "late")
        self.assertEqual(self.payloads(), [chunk(0, "", True, error="KeyError: 'k'")])

    def test_nothing_after_finish_and_an_exception(self) -> None:
        """An exception after finish() propagates; the message is already done."""
        with self.assertRaises(ValueError):
            with self.publisher.stream_message(7, "m1") as stream:
                stream.finish("all")
                raise ValueError("after")
        self.assertEqual(self.payloads(), [chunk(0, "all", True)])

    def test_message_id_generated_when_omitted(self) -> None:
        with self.publisher.stream_message(7) as first:
            first.append("a")
        with self.publisher.stream_message(7) as second:
            pass
        self.assertRegex(first.message_id, r"\A[0-9a-f]{32}\Z")
        self.assertNotEqual(first.message_id, second.message_id)
        self.assertEqual(self.payloads(), [
            chunk(0, "a", False, message_id=first.message_id),
            chunk(1, "", True, message_id=first.message_id),
            chunk(0, "", True, message_id=second.message_id),
        ])

    def test_ids_and_extra_fields(self) -> None:
        """Integer ids go out as strings; extra fields are on every chunk."""
        with self.publisher.stream_message(7, 9, model="small") as stream:
            self.assertEqual((stream.session_id, stream.message_id), ("7", "9"))
            stream.append("a")
        self.assertEqual(self.payloads(), [
            chunk(0, "a", False, message_id="9", model="small"),
            chunk(1, "", True, message_id="9", model="small"),
        ])

    def test_empty_text_publishes_nothing(self) -> None:
        with self.publisher.stream_message(7, "m1") as stream:
            self.assertIsNone(stream.append(""))
            stream.append("a")
            self.assertIsNone(stream.append(""))
        self.assertEqual(self.payloads(), [chunk(0, "a", False), chunk(1, "", True)])

    def test_bad_arguments_fail_before_anything_is_sent(self) -> None:
        p = self.publisher
        for error, attempt in [
            (ValueError, lambda: p.stream_message(7, "m1", role="bot")),
            (ValueError, lambda: p.stream_message(None, "m1")),
            (TypeError, lambda: p.stream_message(7.5, "m1")),
            (ValueError, lambda: p.stream_message(7, "")),
            (ValueError, lambda: p.stream_message(7, "m" * 129)),
            (TypeError, lambda: p.stream_message(7, "m1", seq=3)),
            (TypeError, lambda: p.stream_message(7, "m1", content="x")),
            (TypeError, lambda: p.stream_message(7, "m1", error="x")),
        ]:
            self.assertRaises(error, attempt)
        with p.stream_message(7, "m1") as stream:
            self.assertRaises(TypeError, stream.append, None)
            self.assertRaises(TypeError, stream.append, b"bytes")
            self.assertRaises(ValueError, stream.finish, "", "e" * 2001)
            self.assertEqual((stream.seq, stream.done), (0, False))
        self.assertEqual(self.payloads(), [chunk(0, "", True)])

    def test_a_failed_append_does_not_use_up_its_number(self) -> None:
        """A gap would hold the later chunks back on the server: the number is used again."""
        flaky = Flaky(self.r, failures=1)
        publisher = Publisher(self.r)
        self.patch(publisher, "redis", flaky)
        with publisher.stream_message(7, "m1") as stream:
            self.assertRaises(BackendUnavailable, stream.append, "lost")
            self.assertEqual((stream.seq, stream.text), (0, ""))
            stream.append("kept")
        self.assertEqual(self.payloads(), [chunk(0, "kept", False), chunk(1, "", True)])

    def test_the_error_chunk_cannot_be_sent(self) -> None:
        """Redis away at the end too: that is logged, the caller's exception propagates."""
        flaky = Flaky(self.r, failures=2)
        publisher = Publisher(self.r)
        self.patch(publisher, "redis", flaky)
        with self.assertLogs("unrealon_backend.publisher", logging.WARNING) as logged:
            with self.assertRaises(BackendUnavailable) as raised:
                with publisher.stream_message(7, "m1") as stream:
                    stream.append("lost")
        self.assertIn("Redis went away", str(raised.exception))
        self.assertEqual(flaky.failures, 0)   # the error chunk was attempted
        [record] = logged.records
        self.assertIn("m1", record.getMessage())
        self.assertIsInstance(record.exc_info and record.exc_info[1], BackendUnavailable)
        self.assertFalse(stream.done)
        self.assertEqual(self.entries(), [])

    def test_session_message_error(self) -> None:
        """session_message keeps working, and carries error on a last chunk."""
        p = self.publisher
        p.session_message(7, "m1", "assistant", "whole")
        p.session_message(7, "m1", "assistant", "", seq=0, done=True, error="boom")
        self.assertEqual(self.payloads(), [
            {"method": "session.message",
             "params": {"session_id": "7", "message_id": "m1", "role": "assistant",
                        "content": "whole"}},
            chunk(0, "", True, error="boom"),
        ])
        self.assertRaises(TypeError, p.session_message, 7, "m1", "assistant", "", seq=0,
                          done=True, error=3)
        self.assertRaises(ValueError, p.session_message, 7, "m1", "assistant", "", seq=0,
                          done=True, error="e" * 2001)
        self.assertEqual(len(self.entries()), 2)


class AsyncStreamTests(StreamTestCase):
    @inlineCallbacks
    def test_chunks_are_numbered_and_the_last_is_done(self) -> Any:
        async def scenario(publisher: AsyncPublisher) -> AsyncMessageStream:
            async with publisher.stream_message(7, "m1") as stream:
                self.assertIsInstance(stream, AsyncMessageStream)
                for token in ("Hel", "lo", "", " world"):
                    await stream.append(token)
                self.assertEqual((stream.seq, stream.text, stream.done),
                                 (3, "Hello world", False))
            return stream

        stream = yield self.run_async(scenario)
        self.assertEqual(self.payloads(), [
            chunk(0, "Hel", False), chunk(1, "lo", False), chunk(2, " world", False),
            chunk(3, "", True),
        ])
        self.assertEqual((stream.seq, stream.done, stream.error), (4, True, None))

    @inlineCallbacks
    def test_same_entries_as_the_sync_publisher(self) -> Any:
        """Byte for byte the same payloads, event_timeout included."""
        def produce(stream: MessageStream) -> None:
            stream.append("a")
            stream.finish("b", error="stopped")

        with Publisher(self.r, event_timeout=30).stream_message(7, "m1", model="x") as s:
            produce(s)
        sync = [fields["payload"] for _, fields in self.r.xrange(STREAM)]
        self.r.delete(STREAM)

        async def scenario(publisher: AsyncPublisher) -> None:
            async with publisher.stream_message(7, "m1", model="x") as stream:
                await stream.append("a")
                await stream.finish("b", error="stopped")

        yield self.run_async(scenario, event_timeout=30)
        self.assertEqual([fields["payload"] for _, fields in self.r.xrange(STREAM)], sync)
        self.assertEqual(json.loads(sync[1]), {
            **chunk(1, "b", True, model="x", error="stopped"), "timeout": 30})

    @inlineCallbacks
    def test_an_exception_ends_the_message_in_error_and_propagates(self) -> Any:
        failure = ValueError("model overloaded")

        async def scenario(publisher: AsyncPublisher) -> None:
            async with publisher.stream_message(7, "m1") as stream:
                await stream.append("partial")
                raise failure

        with self.assertRaises(ValueError) as raised:
            yield self.run_async(scenario)
        self.assertIs(raised.exception, failure)
        self.assertEqual(self.payloads(), [
            chunk(0, "partial", False),
            chunk(1, "", True, error="ValueError: model overloaded"),
        ])

    @inlineCallbacks
    def test_error_text_is_capped_at_2000_characters(self) -> Any:
        async def scenario(publisher: AsyncPublisher) -> None:
            async with publisher.stream_message(7, "m1"):
                raise RuntimeError("x" * 5000)

        with self.assertRaises(RuntimeError):
            yield self.run_async(scenario)
        [payload] = self.payloads()
        self.assertEqual(payload["params"]["error"], "RuntimeError: " + "x" * 1986)

    @inlineCallbacks
    def test_a_cancelled_task_ends_the_message_in_error(self) -> Any:
        """The client went away: the message ends, and the task is still cancelled."""
        async def scenario(publisher: AsyncPublisher) -> bool:
            started = asyncio.Event()

            async def answer() -> None:
                async with publisher.stream_message(7, "m1") as stream:
                    await stream.append("partial")
                    started.set()
                    await asyncio.sleep(60)   # the model, thinking

            task = asyncio.ensure_future(answer())
            await started.wait()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        cancelled = yield self.run_async(scenario)
        self.assertTrue(cancelled)
        self.assertEqual(self.payloads(), [
            chunk(0, "partial", False), chunk(1, "", True, error="CancelledError"),
        ])

    @inlineCallbacks
    def test_nothing_more_after_done(self) -> Any:
        async def scenario(publisher: AsyncPublisher) -> list[str]:
            async with publisher.stream_message(7) as stream:
                await stream.append("a")
            refused = []
            for attempt in (lambda: stream.append("late"), lambda: stream.append(""),
                            lambda: stream.finish()):
                try:
                    await attempt()
                except RuntimeError as e:
                    refused.append(str(e))
            return [stream.message_id, *refused]

        message_id, *refused = yield self.run_async(scenario)
        self.assertEqual(refused, [f"message {message_id} is already done"] * 3)
        self.assertRegex(message_id, r"\A[0-9a-f]{32}\Z")
        self.assertEqual(self.payloads(), [chunk(0, "a", False, message_id=message_id),
                                           chunk(1, "", True, message_id=message_id)])

    @inlineCallbacks
    def test_appending_does_not_block_the_event_loop(self) -> Any:
        """
        While Redis holds writes back (CLIENT PAUSE), other tasks of the loop
        keep running: the chunk goes out through redis.asyncio.
        """
        async def scenario(publisher: AsyncPublisher) -> tuple[int, float]:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            async with publisher.stream_message(7, "m1") as stream:
                ticking = asyncio.ensure_future(ticker())
                await asyncio.sleep(0.05)
                before = ticks
                self.r.execute_command("CLIENT", "PAUSE", "500", "WRITE")
                loop = asyncio.get_running_loop()
                started = loop.time()
                await stream.append("a")
                took = loop.time() - started
                ticking.cancel()
            return ticks - before, took

        ticked, took = yield self.run_async(scenario)
        self.assertGreaterEqual(took, 0.3)      # the pause did hold the chunk back
        self.assertGreaterEqual(ticked, 10)     # ... and the loop ran meanwhile
        self.assertEqual(self.payloads(), [chunk(0, "a", False), chunk(1, "", True)])

    @inlineCallbacks
    def test_session_message_and_event(self) -> Any:
        async def scenario(publisher: AsyncPublisher) -> list[str]:
            return [
                await publisher.session_message(7, "m1", "user", "hi"),
                await publisher.event("session.context_updated", session_id=7),
            ]

        ids = yield self.run_async(scenario)
        self.assertEqual(self.entries(), [
            (ids[0], {"method": "session.message",
                      "params": {"session_id": "7", "message_id": "m1", "role": "user",
                                 "content": "hi"}}),
            (ids[1], {"method": "session.context_updated", "params": {"session_id": "7"}}),
        ])
        self.assertTrue(all(re.fullmatch(r"\d+-\d+", i) for i in ids))

    @inlineCallbacks
    def test_redis_away(self) -> Any:
        """BackendUnavailable, as from the sync publisher; the client it made is closed."""
        async def scenario() -> tuple[str, str]:
            publisher = AsyncPublisher("unix:///nonexistent/unrealon.sock?db=0")
            try:
                with self.assertLogs("unrealon_backend.publisher", logging.WARNING) as logged:
                    async with publisher.stream_message(7, "m1") as stream:
                        await stream.append("a")
            except BackendUnavailable as e:
                return str(e), logged.records[0].getMessage()
            finally:
                await publisher.aclose()
            raise AssertionError("no BackendUnavailable")

        error, logged = yield deferToThread(asyncio.run, scenario())
        self.assertIn("cannot append to stream:requests", error)
        self.assertIn("could not end message m1", logged)
