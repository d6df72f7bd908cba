"""
Streamed messages (PROTOCOL.md section 5.1), one contract for both engines:
the same tests against the in-memory engine (on a Clock) and the Redis
engine (a private redis-server), through the engine seam (IBroker).

Order by C{seq}, held chunks released with the gap reported, one history
entry per message, recovery as one event per message, the messages still
streaming, repeated and late chunks ignored.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests import test_engine_conformance as engines
from tests.helpers.replays import as_values
from unrealon.engine.interfaces import MessageChunk, Recovery

ROOM = "session:7"
FIELDS = {"session_id": "7", "message_id": "m1", "role": "assistant", "model": "x"}


def chunk(seq: int, content: str, done: bool = False, error: str | None = None,
          message_id: str = "m1") -> MessageChunk:
    fields = dict(FIELDS, message_id=message_id, seq=seq, content=content, done=done)
    return MessageChunk(message_id=message_id, seq=seq, content=content, done=done,
                        error=error, fields=fields)


class MessageStreamConformance:
    """Mixed into a TestCase that provides make/advance/delivered (the engine tests)."""

    broker: Any
    sink: Any
    #: the room's cursor before anything was published
    start: str

    @inlineCallbacks
    def make(self, history_size: int = 5, history_ttl: float = 600,
             gap_wait: float = 2.0) -> Any:
        #: what became of each chunk, as the engine counts it (the metric)
        self.outcomes: list[str] = []
        yield self.make_engine(  # type: ignore[attr-defined]
            history_size, history_ttl, gap_wait, self.outcomes.append
        )
        recovery = yield self.recover(ROOM, None)
        self.start = recovery.cursor

    def recover(self, room: str, since: str | None) -> Deferred[Recovery]:
        """C{self.broker.recover}, its events as values (L{as_values} checks stored texts)."""
        d: Deferred[Recovery] = self.broker.recover(room, since)
        return d.addCallback(as_values)

    def datas(self, room: str = ROOM) -> list[dict[str, Any]]:
        return [n["params"]["data"] for n in self.sink.notifications(room)]

    @inlineCallbacks
    def append(self, *chunks: MessageChunk, room: str = ROOM) -> Any:
        cursor = None
        for c in chunks:
            cursor = yield self.broker.append_chunk(room, "session.message", c)
        return cursor

    @inlineCallbacks
    def test_chunks_in_order(self) -> Any:
        """One event per chunk, its fields, content, seq = last_seq, done on the last."""
        yield self.make()
        yield self.append(chunk(0, "Hel"), chunk(1, "lo "), chunk(2, "wörld", done=True))
        yield self.delivered(3, ROOM)
        datas = self.datas()
        self.assertEqual([(d["seq"], d["last_seq"], d["content"], d["done"]) for d in datas],
                         [(0, 0, "Hel", False), (1, 1, "lo ", False), (2, 2, "wörld", True)])
        for d in datas:
            self.assertEqual((d["session_id"], d["message_id"], d["role"], d["model"]),
                             ("7", "m1", "assistant", "x"))
            self.assertNotIn("gaps", d)
            self.assertNotIn("error", d)
        methods = {n["method"] for n in self.sink.notifications(ROOM)}
        self.assertEqual(methods, {"session.message"})

    @inlineCallbacks
    def test_out_of_order_chunks_are_ordered(self) -> Any:
        """A chunk ahead of a missing one waits; the missing one releases both, as one event."""
        yield self.make()
        yield self.append(chunk(0, "a"), chunk(2, "c"), chunk(3, "d"))
        yield self.delivered(1, ROOM)
        yield self.advance(0.3)
        self.assertEqual(len(self.datas()), 1)
        yield self.append(chunk(1, "b"))
        yield self.delivered(2, ROOM)
        last = self.datas()[-1]
        self.assertEqual((last["seq"], last["last_seq"], last["content"]), (1, 3, "bcd"))
        yield self.append(chunk(4, "e", done=True))
        yield self.delivered(3, ROOM)
        self.assertEqual("".join(d["content"] for d in self.datas()), "abcde")

    @inlineCallbacks
    def test_missing_chunk_reported_after_the_wait(self) -> Any:
        """After the gap wait the held chunks come with the gap in gaps; the late chunk is ignored."""
        yield self.make(gap_wait=0.5)
        yield self.append(chunk(0, "a"), chunk(2, "c"), chunk(4, "e"))
        yield self.delivered(1, ROOM)
        yield self.advance(1.5)
        yield self.delivered(2, ROOM)
        released = self.datas()[1]
        self.assertEqual((released["seq"], released["last_seq"], released["content"]),
                         (1, 4, "ce"))
        self.assertEqual(released["gaps"], [[1, 1], [3, 3]])
        self.assertEqual(self.outcomes, ["delivered", "held", "held", "released"])
        yield self.append(chunk(1, "LATE"), chunk(3, "LATE"), chunk(5, "f", done=True))
        yield self.delivered(3, ROOM)
        yield self.advance(0.3)
        datas = self.datas()
        self.assertEqual(len(datas), 3)
        self.assertEqual((datas[2]["seq"], datas[2]["content"], datas[2]["done"]), (5, "f", True))
        self.assertNotIn("gaps", datas[2])
        recovery = yield self.recover(ROOM, self.start)
        self.assertTrue(recovery.recovered)
        [whole] = recovery.missed
        data = whole["params"]["data"]
        self.assertEqual((data["seq"], data["last_seq"], data["content"], data["gaps"]),
                         (0, 5, "acef", [[1, 1], [3, 3]]))

    @inlineCallbacks
    def test_recovered_text_that_cjson_escapes_otherwise(self) -> Any:
        """
        A message's content and error are spliced by the script with cjson,
        which writes "/" and DEL escaped: a recovered event is still what
        the codec would send (L{as_values} checks the stored texts).
        """
        yield self.make()
        yield self.append(chunk(0, "a/b\x7f\n"), chunk(1, "é/"), chunk(2, "", done=True,
                                                                     error="x/y"))
        yield self.delivered(3, ROOM)
        recovery = yield self.recover(ROOM, self.start)
        self.assertTrue(recovery.recovered)
        [whole] = recovery.missed
        data = whole["params"]["data"]
        self.assertEqual((data["content"], data["error"], data["done"]),
                         ("a/b\x7f\né/", "x/y", True))
        yield self.append(chunk(0, "c/d", message_id="m2"))
        yield self.delivered(4, ROOM)
        fresh = yield self.recover(ROOM, None)
        self.assertEqual([s["params"]["data"]["content"] for s in fresh.streaming], ["c/d"])

    @inlineCallbacks
    def test_repeated_and_after_done_ignored(self) -> Any:
        yield self.make()
        yield self.append(chunk(0, "a"), chunk(0, "a"), chunk(1, "b", done=True),
                          chunk(1, "b", done=True), chunk(2, "c"))
        yield self.delivered(2, ROOM)
        yield self.advance(0.3)
        self.assertEqual([d["content"] for d in self.datas()], ["a", "b"])
        self.assertEqual(self.outcomes, ["delivered", "ignored", "delivered", "ignored", "ignored"])

    @inlineCallbacks
    def test_error_ends_the_message(self) -> Any:
        yield self.make()
        yield self.append(chunk(0, "par"), chunk(1, "", done=True, error="model overloaded"))
        yield self.delivered(2, ROOM)
        last = self.datas()[-1]
        self.assertEqual((last["done"], last["error"]), (True, "model overloaded"))
        recovery = yield self.recover(ROOM, self.start)
        data = recovery.missed[0]["params"]["data"]
        self.assertEqual((data["content"], data["done"], data["error"]), ("par", True, "model overloaded"))
        fresh = yield self.recover(ROOM, None)
        self.assertEqual(fresh.streaming, ())

    @inlineCallbacks
    def test_history_holds_one_entry_per_message(self) -> Any:
        """
        50 chunks with a history of 5: the events around them still recover,
        the message as one event at the position of its latest chunk.
        """
        yield self.make(history_size=5)
        yield self.broker.publish(ROOM, "note", {"n": 1})
        yield self.append(*[chunk(i, f"{i},") for i in range(25)])
        yield self.broker.publish(ROOM, "note", {"n": 2})
        yield self.append(*[chunk(i, f"{i},", done=i == 49) for i in range(25, 50)])
        yield self.broker.publish(ROOM, "note", {"n": 3})
        recovery = yield self.recover(ROOM, self.start)
        self.assertTrue(recovery.recovered)
        kinds = [(n["method"], n["params"]["data"].get("n")) for n in recovery.missed]
        self.assertEqual(kinds, [("note", 1), ("note", 2), ("session.message", None),
                                 ("note", 3)])
        message = recovery.missed[2]["params"]["data"]
        self.assertEqual(message["content"], "".join(f"{i}," for i in range(50)))
        self.assertEqual((message["seq"], message["last_seq"], message["done"]), (0, 49, True))
        self.assertEqual(recovery.cursor, recovery.missed[-1]["params"]["cursor"])

    @inlineCallbacks
    def test_recovery_mid_message_covers_what_was_missed(self) -> Any:
        """From a cursor inside the message: one event from the next seq; streaming for a fresh join."""
        yield self.make(history_size=100)
        yield self.append(chunk(0, "a"), chunk(1, "b"))
        yield self.delivered(2, ROOM)
        mid_cursor = self.sink.notifications(ROOM)[1]["params"]["cursor"]
        yield self.append(chunk(2, "c"), chunk(3, "d"))
        yield self.broker.publish(ROOM, "note", {"n": 1})
        recovery = yield self.recover(ROOM, mid_cursor)
        self.assertTrue(recovery.recovered)
        self.assertEqual(recovery.streaming, ())
        self.assertEqual(len(recovery.missed), 2)
        data = recovery.missed[0]["params"]["data"]
        self.assertEqual((data["seq"], data["last_seq"], data["content"], data["done"]),
                         (2, 3, "cd", False))
        fresh = yield self.recover(ROOM, None)
        self.assertFalse(fresh.recovered)
        [streaming] = fresh.streaming
        self.assertEqual(streaming["method"], "session.message")
        sdata = streaming["params"]["data"]
        self.assertEqual((sdata["seq"], sdata["last_seq"], sdata["content"]), (0, 3, "abcd"))
        # the cursor of the join covers the streaming state: later chunks come live
        self.assertLessEqual(self.broker.cursor_key(streaming["params"]["cursor"]),
                             self.broker.cursor_key(fresh.cursor))
        yield self.append(chunk(4, "e", done=True))
        done = yield self.recover(ROOM, None)
        self.assertEqual(done.streaming, ())

    @inlineCallbacks
    def test_message_goes_on_after_its_entry_was_trimmed(self) -> Any:
        """
        Events pushing a streaming message's entry out of a small history do
        not end it: its next chunks follow without a gap, and a fresh join
        still shows all of it.
        """
        yield self.make(history_size=3)
        yield self.append(chunk(0, "a"))
        for n in range(6):
            yield self.broker.publish(ROOM, "note", {"n": n})
        yield self.append(chunk(1, "b"))
        fresh = yield self.recover(ROOM, None)
        self.assertEqual([m["params"]["data"]["content"] for m in fresh.streaming], ["ab"])
        yield self.append(chunk(2, "c", done=True))
        yield self.delivered(9, ROOM)
        datas = [d for d in self.datas() if "message_id" in d]
        self.assertEqual([(d["seq"], d["last_seq"], d["content"]) for d in datas],
                         [(0, 0, "a"), (1, 1, "b"), (2, 2, "c")])
        self.assertEqual(self.outcomes, ["delivered"] * 3)

    @inlineCallbacks
    def test_streaming_after_a_join_while_only_held(self) -> Any:
        """
        A join while a message has only held chunks lists nothing of it, and
        does not forget it: once delivered, the next join lists it.
        """
        yield self.make()
        yield self.append(chunk(2, "c"), chunk(1, "b"))
        early = yield self.recover(ROOM, None)
        self.assertEqual(early.streaming, ())
        yield self.append(chunk(0, "a"))
        later = yield self.recover(ROOM, None)
        self.assertEqual([s["params"]["data"]["content"] for s in later.streaming], ["abc"])

    @inlineCallbacks
    def test_abandoned_message_expires(self) -> Any:
        """A message whose publisher stopped before done stops streaming with the history TTL."""
        yield self.make(history_ttl=1)
        yield self.append(chunk(0, "a"))
        fresh = yield self.recover(ROOM, None)
        self.assertEqual(len(fresh.streaming), 1)
        yield self.advance(2.5)
        later = yield self.recover(ROOM, None)
        self.assertEqual(later.streaming, ())

    @inlineCallbacks
    def test_finished_message_recovers_whole(self) -> Any:
        """From a cursor inside a message that is done since: the whole message, from seq 0."""
        yield self.make(history_size=100)
        yield self.append(chunk(0, "a"), chunk(1, "b"))
        yield self.delivered(2, ROOM)
        mid_cursor = self.sink.notifications(ROOM)[1]["params"]["cursor"]
        yield self.append(chunk(2, "c"))
        partial = yield self.recover(ROOM, mid_cursor)
        self.assertEqual([(m["params"]["data"]["seq"], m["params"]["data"]["content"])
                          for m in partial.missed], [(2, "c")])
        yield self.append(chunk(3, "", done=True))
        recovery = yield self.recover(ROOM, mid_cursor)
        [whole] = recovery.missed
        data = whole["params"]["data"]
        self.assertEqual((data["seq"], data["last_seq"], data["content"], data["done"]),
                         (0, 3, "abc", True))

    @inlineCallbacks
    def test_two_messages_interleaved(self) -> Any:
        yield self.make(history_size=100)
        yield self.append(chunk(0, "a", message_id="x"), chunk(0, "A", message_id="y"),
                          chunk(1, "b", message_id="x", done=True), chunk(1, "B", message_id="y"))
        fresh = yield self.recover(ROOM, None)
        self.assertEqual([s["params"]["data"]["content"] for s in fresh.streaming], ["AB"])
        recovery = yield self.recover(ROOM, self.start)
        self.assertEqual([(m["params"]["data"]["message_id"], m["params"]["data"]["content"])
                          for m in recovery.missed], [("x", "ab"), ("y", "AB")])



class MemoryMessageTests(MessageStreamConformance, TestCase):
    make_engine = engines.MemoryEngineTests.make
    advance = engines.MemoryEngineTests.advance
    delivered = engines.MemoryEngineTests.delivered


class RedisMessageTests(MessageStreamConformance, TestCase):
    presence_ttl = 30.0
    make_engine = engines.RedisEngineTests.make
    advance = engines.RedisEngineTests.advance
    delivered = engines.RedisEngineTests.delivered

    @inlineCallbacks
    def test_finished_message_keeps_only_its_text_and_state(self) -> Any:
        """
        Done: the delivery index is dropped (a finished message is recovered
        whole), and what stays expires with the history.
        """
        from unrealon.engine.rediskeys import message_keys

        yield self.make(history_ttl=600)
        state, text, index, held = message_keys(ROOM, "m1")
        yield self.append(chunk(0, "a"), chunk(2, "c"), chunk(1, "b"))
        redis = self.connections.commands
        self.assertEqual((yield redis.execute_command("EXISTS", index)), 1)
        yield self.append(chunk(3, "d", done=True))
        self.assertEqual((yield redis.execute_command("EXISTS", index)), 0)
        self.assertEqual((yield redis.execute_command("EXISTS", held)), 0)
        self.assertEqual((yield redis.execute_command("GET", text)), "abcd")
        for key in (state, text):
            ttl = yield redis.execute_command("TTL", key)
            self.assertTrue(0 < int(ttl) <= 600, (key, ttl))
