"""
Acceptance tests of streamed messages (PROTOCOL.md revision 4): section 4
(C{streaming} in the C{rooms.join} result), section 5.1 (every rule),
section 6 (a chunk is a C{session.message} with C{seq} 0, 1, 2, ...,
C{done}, C{error}, published through the ingress stream) and section 7
(C{UNREALON_STREAM_GAP_WAIT}, C{UNREALON_HISTORY_SIZE}).

Written from the contract alone, as an outside client and backend: two real
node processes on a private redis-server, real WebSocket clients, and every
chunk XADDed to the ingress stream like a backend does, so the two nodes'
consumers in the one group handle different chunks.  Chunks are published
in a shuffled order (a seeded C{random.Random}): the server must reorder.
Each failure message names the seed; C{STREAMS_SEED=<seed>} repeats a run.

Each client is a L{Reader} (tests/helpers/streams.py): it applies the client
rules of section 5.1 to hold a text per message, and checks every event it
receives against the contract (contiguous C{seq}, nothing after C{done}, at
most one event per message in C{missed}, ...).  "Nothing more came" is
shown by L{settle}: every entry acknowledged, then a barrier through the
ingress.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers.cluster import BARRIER, EVENT, start_cluster
from tests.helpers.ingress_support import sync_redis, wait_reply, xadd_payload
from tests.helpers.node import mint_token
from tests.helpers.process import NodeProcess
from tests.helpers.redis_server import start_redis
from tests.helpers.streams import (
    EVENT_KEYS,
    MESSAGE,
    Reader,
    StreamTap,
    acknowledged,
    answer,
    chunk,
    chunk_texts,
    ingress_handled,
    local_shuffle,
    settle,
    xadd_all,
)
from tests.helpers.waiting import sleep, wait_until

SEED_ENV = "STREAMS_SEED"
#: the extra field every chunk carries (a message's fields are its first chunk's)
MODEL_NAME = "m-7"
MODEL = {"model": MODEL_NAME}
#: long enough that a whole shuffled publish is reordered, never reported missing
PATIENT_GAP_WAIT = "30"


class StreamTestCase(TestCase):
    """A private Redis, two node processes, readers whose connections are dropped in cleanup."""

    timeout = 120

    def setUp(self) -> None:
        chosen = os.environ.get(SEED_ENV)
        self.seed = int(chosen) if chosen else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)

    def about(self, what: str = "") -> str:
        """A failure message naming the seed."""
        return f"[seed {self.seed}; {SEED_ENV}={self.seed} repeats this run] {what}"

    @inlineCallbacks
    def cluster(self, **env: str) -> Any:
        settings = {"UNREALON_STREAM_GAP_WAIT": PATIENT_GAP_WAIT}
        settings.update(env)
        self.server = yield start_redis(self)
        self.nodes: list[NodeProcess] = yield start_cluster(self, self.server.url, 2,
                                                            **settings)
        self.r = sync_redis(self.server.url)
        self.addCleanup(self.r.close)
        return self.nodes

    @inlineCallbacks
    def connect(self, node: NodeProcess, reader: Reader, room: str,
                since: str | None = None) -> Any:
        """A new connection of C{reader} to C{node}, joined to C{room} (with C{since})."""
        client = yield node.connect(mint_token(reader.name, rooms=["session:*"]))
        self.addCleanup(client.drop)
        tap = StreamTap(client, reader)
        yield tap.join(room, since)
        return tap

    @inlineCallbacks
    def one_on_each(self, *rooms: str) -> Any:
        """A reader on each node (alice, bob), joined to C{rooms}: (readers, their taps)."""
        readers = [Reader("alice"), Reader("bob")]
        taps = []
        for node, reader in zip(self.nodes, readers, strict=True):
            tap = yield self.connect(node, reader, rooms[0])
            for room in rooms[1:]:
                yield tap.join(room)
            taps.append(tap)
        return readers, taps

    def wait(self, check: Any, what: str, timeout: float = 60,
             readers: Sequence[Reader] = ()) -> Deferred[Any]:
        """Wait for C{check}; give up at once when one of C{readers} saw the contract broken."""
        return wait_until(check, timeout=timeout, what=self.about(what), interval=0.05,
                          stop_if=lambda: self.broken(readers))

    @inlineCallbacks
    def holding(self, readers: Sequence[Reader], room: str, upto: dict[str, int]) -> Any:
        """Wait until every reader holds each message C{mid} up to C{upto[mid]} at least."""

        def behind() -> dict[str, dict[str, int]]:
            return {r.name: {mid: r.held(room, mid).last_seq for mid, last in upto.items()
                             if r.held(room, mid).last_seq < last} for r in readers}

        try:
            yield self.wait(lambda: not any(behind().values()),
                            f"{[r.name for r in readers]} holding {upto} in {room}",
                            readers=readers)
        except AssertionError as e:
            late = {name: held for name, held in behind().items() if held}
            joins = [r.describe(r.latest) for r in readers if late.get(r.name)]
            raise AssertionError(f"{e}\nbehind: {late}\n" + "\n".join(joins)) from None

    @staticmethod
    def broken(readers: Sequence[Reader]) -> str | None:
        """The contract violations the readers saw, for a failure message; None if none."""
        found = [v for r in readers for v in r.violations]
        if not found:
            return None
        shown = "\n  ".join(found[:25])
        connections = sorted({v.split(" ", 1)[0].rstrip(":") for v in found})
        joins = "\n  ".join(r.describe(c) for r in readers for c in connections
                            if c.startswith(f"{r.name}#"))
        return f"{len(found)} contract violations:\n  {shown}\n  {joins}"

    def assert_clean(self, readers: Sequence[Reader]) -> None:
        """No event any reader received broke a promise of the contract."""
        found = self.broken(readers)
        if found:
            self.fail(self.about(found))

    def assert_whole(self, reader: Reader, room: str, mid: str, text: str, *,
                     error: str | None = None, gaps: list[list[int]] | None = None) -> None:
        """C{reader} holds message C{mid} complete, with exactly C{text}."""
        held = reader.held(room, mid)
        where = f"{reader.name} holding {room}/{mid}"
        self.assertEqual(held.content, text, self.about(f"{where}: the text"))
        self.assertTrue(held.done, self.about(f"{where}: done"))
        self.assertEqual(held.error, error, self.about(f"{where}: error"))
        self.assertEqual(held.gaps, gaps or [], self.about(f"{where}: gaps"))
        self.assertEqual(held.fields, {"session_id": room.split(":", 1)[1], "message_id": mid,
                                       "role": "assistant", **MODEL},
                         self.about(f"{where}: the message's fields"))

    @inlineCallbacks
    def publish_in_batches(self, payloads: Sequence[dict[str, Any]], batch: int,
                           pause: float = 0.02) -> Any:
        """XADD C{payloads} in this order, C{batch} at a time, pausing between batches."""
        for start in range(0, len(payloads), batch):
            xadd_all(self.r, payloads[start:start + batch])
            yield sleep(pause)

    @inlineCallbacks
    def assert_both_nodes_handled(self) -> Any:
        """The setup did what it claims: each node handled some of the chunks."""
        counts = []
        for node in self.nodes:
            count = yield ingress_handled(node)
            counts.append(count)
        self.assertTrue(all(c > 0 for c in counts),
                        self.about(f"entries handled per node: {counts}: the test needs both"))

    @staticmethod
    def streamed_in(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The data of the streamed session.message events of a join result, by message id."""
        out: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            data = e["params"]["data"]
            if e["method"] == MESSAGE and "seq" in data:
                out.setdefault(data["message_id"], []).append(data)
        return out


class OrderTests(StreamTestCase):
    @inlineCallbacks
    def test_long_answers_across_two_nodes_shuffled(self) -> Any:
        """
        Two 5,000-chunk answers in one room, their chunks published in a
        shuffled order (one wholly, one locally) and handled by both nodes:
        a client on each node receives each answer's exact text, in events
        whose seq start at 0 and follow on (seq = previous last_seq + 1),
        and nothing after the one with done (section 5.1, Order).
        """
        yield self.cluster()
        room = "session:long"
        readers, taps = yield self.one_on_each(room)
        count = 5000
        texts = {"whole": chunk_texts(self.rng, count), "local": chunk_texts(self.rng, count)}
        wholly = self.rng.sample(answer("long", "whole", texts["whole"], **MODEL), count)
        locally = local_shuffle(self.rng, answer("long", "local", texts["local"], **MODEL), 60)
        batches = 10
        size = count // batches
        payloads: list[dict[str, Any]] = []
        for i in range(batches):
            mixed = wholly[i * size:(i + 1) * size] + locally[i * size:(i + 1) * size]
            payloads += self.rng.sample(mixed, len(mixed))
        yield self.publish_in_batches(payloads, size)
        yield self.holding(readers, room, {"whole": count - 1, "local": count - 1})
        yield settle(self.r, room, taps)
        self.assert_clean(readers)
        for reader in readers:
            for mid, chunks in texts.items():
                self.assert_whole(reader, room, mid, "".join(chunks))
            self.assertTrue(all(e.how == "live" for e in reader.received))
        yield self.assert_both_nodes_handled()


class ReconnectTests(StreamTestCase):
    @inlineCallbacks
    def test_reconnects_at_random_points_converge(self) -> Any:
        """
        Three answers stream in phases (each phase's chunks shuffled, spread
        over both nodes) while clients drop their connection at random
        points -- before the first chunk, during delivery, away for a whole
        phase, after done -- and come back on either node, with `since` or
        without.  Every client ends holding each answer's exact text by the
        client rules; every join with since recovers and its `missed` holds
        at most one event per message; a join without since lists the
        answers in progress in `streaming`; after each join the events
        follow without gap or duplicate (sections 4 and 5.1).
        """
        nodes = yield self.cluster()
        room = "session:moving"
        rng = self.rng
        lengths = {"a": 600, "b": 900, "c": 700}
        texts = {mid: chunk_texts(rng, n) for mid, n in lengths.items()}
        chunks = {mid: answer("moving", mid, texts[mid], **MODEL) for mid in lengths}
        phases = 6
        #: the phase whose chunks end each message: "a" is done half way
        ends = {"a": phases // 2, "b": phases, "c": phases}
        slices: dict[str, list[list[dict[str, Any]]]] = {}
        for mid, n in lengths.items():
            cuts = [0, *sorted(rng.sample(range(1, n), ends[mid] - 1)), n]
            slices[mid] = [chunks[mid][cuts[i]:cuts[i + 1]] for i in range(ends[mid])]

        steady = [Reader("steady1"), Reader("steady2")]
        taps = {}
        for node, reader in zip(nodes, steady, strict=True):
            taps[reader.name] = yield self.connect(node, reader, room)
        start = steady[0].cursors[room]
        movers = [Reader(f"mover{i}") for i in range(4)]
        for reader in movers:
            taps[reader.name] = yield self.connect(rng.choice(nodes), reader, room)
        done_published: set[str] = set()
        #: the result of each join without since
        plain_joins: list[dict[str, Any]] = []

        @inlineCallbacks
        def come_back(reader: Reader) -> Any:
            """A new connection of C{reader}, to either node, with since or without."""
            with_since = rng.random() < 0.5 or any(
                not reader.held(room, mid).done for mid in done_published)
            started = {mid: [s.held(room, mid).last_seq for s in steady] for mid in lengths
                       if mid not in done_published
                       and all(s.held(room, mid).last_seq >= 0 for s in steady)}
            since = reader.cursors[room] if with_since else None
            node = rng.choice(nodes)
            taps[reader.name] = yield self.connect(node, reader, room, since)
            if not with_since:
                plain_joins.append(reader.joins[-1])
                streaming = self.streamed_in(reader.joins[-1]["streaming"])
                listed = {mid: [(e["seq"], e["last_seq"], e["done"]) for e in events]
                          for mid, events in streaming.items()}
                self.assertTrue(set(started) <= set(listed), self.about(
                    f"{reader.latest} joined {node.node_id} without since while "
                    f"{sorted(started)} were streaming (the steady clients held them up to "
                    f"{started}): streaming listed {listed}"))

        @inlineCallbacks
        def bounce(reader: Reader, delay: float) -> Any:
            yield sleep(delay)
            yield taps[reader.name].client.drop()
            yield come_back(reader)

        # before the first chunk
        for reader in movers:
            yield bounce(reader, 0)
        upto: dict[str, int] = {}
        for phase in range(1, phases + 1):
            batch = [c for mid in lengths if phase <= ends[mid] for c in slices[mid][phase - 1]]
            for c in batch:
                upto[c["params"]["message_id"]] = max(upto.get(c["params"]["message_id"], -1),
                                                      c["params"]["seq"])
                if c["params"]["done"]:
                    done_published.add(c["params"]["message_id"])
            away, bounced = rng.sample(movers, 2)
            yield taps[away.name].client.drop()  # away for the whole phase
            bouncing = bounce(bounced, rng.uniform(0, 0.25))  # during delivery
            yield self.publish_in_batches(rng.sample(batch, len(batch)), 1 + len(batch) // 3,
                                          pause=0.05)
            yield bouncing
            yield self.holding(steady, room, upto)
            yield come_back(away)
            yield self.holding(steady + movers, room, upto)
        # after done (each holds the whole text by now: with since or without)
        for reader in movers:
            yield bounce(reader, rng.uniform(0, 0.05))
        late = Reader("late")
        yield self.connect(nodes[0], late, room, start)
        fresh = Reader("fresh")
        yield self.connect(nodes[1], fresh, room)
        everyone = steady + movers + [late, fresh]
        yield settle(self.r, room, [taps[r.name] for r in steady + movers])
        self.assert_clean(everyone)
        for reader in steady + movers + [late]:
            for mid in lengths:
                self.assert_whole(reader, room, mid, "".join(texts[mid]))
        for reader in everyone:
            for join in reader.joins:
                if join["since"]:
                    self.assertTrue(join["recovered"],
                                    self.about(f"{join['connection']}: nothing was trimmed"))
        self.assertEqual(self.streamed_in(fresh.joins[0]["streaming"]), {},
                         self.about("every answer is done: none is streaming"))
        recovered = self.streamed_in(late.joins[0]["missed"])
        self.assertEqual(sorted(recovered), sorted(lengths), self.about("late's missed"))
        for mid, events in recovered.items():
            self.assertEqual([(e["seq"], e["last_seq"], e["done"]) for e in events],
                             [(0, lengths[mid] - 1, True)],
                             self.about(f"a since from before {mid}: the whole message"))
        self.assertTrue(plain_joins, self.about("no join without since happened"))
        yield self.assert_both_nodes_handled()


    @inlineCallbacks
    def test_streaming_lists_an_answer_whose_first_chunks_were_held(self) -> Any:
        """
        A join without since comes while an answer's only chunks are held
        (its seq 0 has not arrived); seq 0 arrives and the answer streams: a
        later join without since lists it in streaming from seq 0, and
        follows it live to its end (section 4: streaming holds each message
        still streaming).
        """
        nodes = yield self.cluster()
        room = "session:held"
        readers, taps = yield self.one_on_each(room)
        texts = chunk_texts(self.rng, 6)
        chunks = answer("held", "m", texts, **MODEL)
        xadd_all(self.r, [chunks[2], chunks[1]])
        yield self.wait(lambda: acknowledged(self.r), "chunks 1 and 2 handled (held)")
        early = Reader("early")
        early_tap = yield self.connect(nodes[0], early, room)
        xadd_all(self.r, [chunks[0]])
        yield self.holding([*readers, early], room, {"m": 2})
        late = Reader("late")
        late_tap = yield self.connect(nodes[1], late, room)
        listed = {mid: [(e["seq"], e["last_seq"], e["done"], e["content"]) for e in events]
                  for mid, events in self.streamed_in(late.joins[0]["streaming"]).items()}
        self.assertEqual(listed, {"m": [(0, 2, False, "".join(texts[:3]))]}, self.about(
            "chunks 0..2 were delivered, the answer is not done: a join without since "
            "lists it"))
        xadd_all(self.r, self.rng.sample(chunks[3:], 3))
        yield self.holding([*readers, early], room, {"m": 5})
        yield settle(self.r, room, [*taps, early_tap, late_tap])
        self.assert_clean([*readers, early, late])
        for reader in (*readers, early, late):
            self.assert_whole(reader, room, "m", "".join(texts))


class HistoryTests(StreamTestCase):
    @inlineCallbacks
    def test_long_answers_take_one_history_entry_each(self) -> Any:
        """
        20 answers of 300 chunks and 100 other events (a tenth of them
        session.message without seq: ordinary events) in one room whose
        history keeps 200 events: a join with since from before all of them
        recovers, and missed holds each of the 100 events once and one event
        per answer, each answer whole, at the place of its latest event; a
        client that left half way gets the rest of each answer in one event
        (section 5.1, History and Recovery; section 6).
        """
        nodes = yield self.cluster(UNREALON_HISTORY_SIZE="200")
        room = "session:history"
        watcher = Reader("watcher")
        tap = yield self.connect(nodes[0], watcher, room)
        start = watcher.cursors[room]
        answers, length, others = 20, 300, 100
        texts = {f"m{i}": chunk_texts(self.rng, length) for i in range(answers)}
        # the answers stream at once: merge their chunks at random, keeping each in
        # order, then shuffle locally; the ordinary events go in at random places
        queues = [answer("history", mid, t, **MODEL) for mid, t in texts.items()]
        merged: list[dict[str, Any]] = []
        while queues:
            queue = self.rng.choice(queues)
            merged.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
        payloads = local_shuffle(self.rng, merged, 40)
        for n in range(others):
            payloads.insert(self.rng.randrange(len(payloads) + 1), self.ordinary(room, n))
        yield self.publish_in_batches(payloads, 500)
        yield self.holding([watcher], room, {mid: length - 1 for mid in texts})
        yield settle(self.r, room, [tap])
        # the order the watcher saw: the ordinary events, and each answer where its
        # last event came (where the answer stands in the history)
        seen = [(i, _place(e.method, e.data)) for i, e in enumerate(watcher.timeline)
                if e.method != BARRIER and ("seq" not in e.data or e.data["done"])]
        ordinary = Counter(self.place(n) for n in range(others))
        self.assertEqual(Counter(p for _, p in seen if p in ordinary), ordinary,
                         self.about("the watcher saw each ordinary event once"))

        recovering = Reader("recovering")
        yield self.connect(nodes[1], recovering, room, start)
        # a client that left after a random ordinary event, back with its cursor
        left_at = self.rng.choice([i for i, p in seen if p in ordinary])
        midway = watcher.until("midway", left_at)
        yield self.connect(nodes[0], midway, room, midway.cursors[room])
        self.assert_clean([watcher, recovering, midway])
        for reader, after in ((recovering, -1), (midway, left_at)):
            join = reader.joins[-1]
            self.assertTrue(join["recovered"], self.about(
                f"{reader.name}: the answers take 20 history entries, not 6,000: all fit in 200"))
            self.assertEqual(join["streaming"], [], self.about("recovered: streaming is empty"))
            missed = [_place(e["method"], e["params"]["data"]) for e in join["missed"]
                      if e["method"] != BARRIER]
            self.assertEqual(missed, [p for i, p in seen if i > after], self.about(
                f"{reader.name}: missed holds each event after since once, in the one order, "
                "an answer at the place of its latest event"))
            for mid in texts:
                self.assert_whole(reader, room, mid, "".join(texts[mid]))
        for data in self.streamed_in(recovering.joins[0]["missed"]).values():
            self.assertEqual([(e["seq"], e["last_seq"]) for e in data], [(0, length - 1)],
                             self.about("since from before an answer: all of it in one event"))
        for mid in texts:
            self.assert_whole(watcher, room, mid, "".join(texts[mid]))

    @inlineCallbacks
    def test_a_join_that_cannot_recover_lists_what_streams(self) -> Any:
        """
        An answer streams while more events than the history keeps are
        published: a join with since from before them all does not recover
        (missed empty) and lists the answer in streaming, from seq 0; one
        whose since leaves fewer recovers without it; both then follow the
        answer live to its end (section 4).
        """
        nodes = yield self.cluster(UNREALON_HISTORY_SIZE="200")
        room = "session:trimmed"
        watcher = Reader("watcher")
        tap = yield self.connect(nodes[0], watcher, room)
        start = watcher.cursors[room]
        length, others = 300, 250
        texts = chunk_texts(self.rng, length)
        chunks = answer("trimmed", "m", texts, **MODEL)
        head, tail = chunks[:length // 2], chunks[length // 2:]
        xadd_all(self.r, self.rng.sample(head, len(head)))
        yield self.holding([watcher], room, {"m": len(head) - 1})
        yield self.publish_in_batches([self.ordinary(room, n) for n in range(others)], 50)
        yield settle(self.r, room, [tap])
        # in the one order the cluster gave them (two nodes handled them: they may
        # interleave, section 6)
        ordinary = Counter(self.place(n) for n in range(others))
        seen = [(i, _place(e.method, e.data)) for i, e in enumerate(watcher.timeline)
                if _place(e.method, e.data) in ordinary]
        self.assertEqual(Counter(p for _, p in seen), ordinary,
                         self.about("the watcher got each ordinary event once"))

        early = Reader("early")  # it left before anything was published
        early_tap = yield self.connect(nodes[1], early, room, start)
        # it left after the 100th ordinary event: 150 of them (and a barrier) since
        left_at = seen[99][0]
        later = watcher.until("later", left_at)
        later_tap = yield self.connect(nodes[0], later, room, later.cursors[room])
        self.assert_clean([watcher, early, later])
        join = early.joins[0]
        self.assertEqual((join["recovered"], join["missed"]), (False, []), self.about(
            "more than 200 events after since: more than the history size"))
        self.assertEqual([(e["seq"], e["last_seq"], e["done"], e["content"])
                          for e in self.streamed_in(join["streaming"]).get("m", [])],
                         [(0, len(head) - 1, False, "".join(texts[:len(head)]))],
                         self.about("not recovered: streaming holds the answer so far"))
        join = later.joins[0]
        self.assertTrue(join["recovered"], self.about("151 events after since, 200 kept"))
        self.assertEqual(join["streaming"], [], self.about("recovered: streaming is empty"))
        self.assertEqual(
            [_place(e["method"], e["params"]["data"]) for e in join["missed"]
             if e["method"] != BARRIER],
            [p for _, p in seen[100:]],
            self.about("the answer had no chunk after since: missed has only the others"))

        xadd_all(self.r, self.rng.sample(tail, len(tail)))
        yield self.holding([watcher, early, later], room, {"m": length - 1})
        yield settle(self.r, room, [tap, early_tap, later_tap])
        self.assert_clean([watcher, early, later])
        for reader in (watcher, early, later):
            self.assert_whole(reader, room, "m", "".join(texts))

    @staticmethod
    def ordinary(room: str, n: int) -> dict[str, Any]:
        """The ingress payload of ordinary event C{n}: every tenth a session.message without seq."""
        if n % 10 == 9:
            return {"method": MESSAGE,
                    "params": {"session_id": room.split(":", 1)[1], "message_id": f"note{n}",
                               "role": "system", "content": f"note {n}"}}
        return {"method": "publish", "params": {"room": room, "event": EVENT, "data": {"n": n}}}

    @staticmethod
    def place(n: int) -> tuple[str, Any]:
        """Where L{_place} puts ordinary event C{n}."""
        return (MESSAGE, f"note{n}") if n % 10 == 9 else (EVENT, n)


class ExpiryTests(StreamTestCase):
    history_ttl = 3.0

    @inlineCallbacks
    def test_an_abandoned_answer_stops_streaming(self) -> Any:
        """
        An answer that gets no chunk for longer than UNREALON_HISTORY_TTL is
        no longer streaming: joins list it before that, not after (section 4:
        not done, a chunk seen within the history TTL).
        """
        nodes = yield self.cluster(UNREALON_HISTORY_TTL=str(int(self.history_ttl)))
        room = "session:abandoned"
        watcher = Reader("watcher")
        yield self.connect(nodes[0], watcher, room)
        start = watcher.cursors[room]
        texts = chunk_texts(self.rng, 5)
        xadd_all(self.r, answer("abandoned", "m", [*texts, "never sent"], **MODEL)[:5])
        yield self.holding([watcher], room, {"m": 4})
        last_chunk = time.monotonic()
        soon = Reader("soon")
        yield self.connect(nodes[1], soon, room)
        self.assertEqual(
            [(d["seq"], d["last_seq"], d["done"]) for d in
             (e["params"]["data"] for e in soon.joins[0]["streaming"])], [(0, 4, False)],
            self.about("a chunk came within the history TTL: streaming"))
        yield sleep(max(0.0, last_chunk + self.history_ttl + 1.5 - time.monotonic()))
        later, recovering = Reader("later"), Reader("recovering")
        yield self.connect(nodes[1], later, room)
        yield self.connect(nodes[0], recovering, room, start)
        self.assert_clean([watcher, soon, later, recovering])
        for reader in (later, recovering):
            self.assertEqual(reader.joins[0]["streaming"], [], self.about(
                f"{reader.name}: no chunk for longer than the history TTL: not streaming"))


class GapTests(StreamTestCase):
    gap_wait = 0.5

    @inlineCallbacks
    def test_a_dropped_chunk_is_reported_not_skipped(self) -> Any:
        """
        Chunks 0..9 but 4 (9 done), with UNREALON_STREAM_GAP_WAIT 0.5 s:
        0..3 arrive, then one event covers 4..9 with gaps [[4, 4]] (4's text
        absent), after the wait and within wait + 1 s (with a generous
        margin); a late chunk 4 is ignored; live clients and a recovering
        one hold the same text.  Another answer missing 2, 5 and 6 of 0..12
        gets one event from 2 with gaps [[2, 2], [5, 6]] (section 5.1, A
        missing chunk).
        """
        nodes = yield self.cluster(UNREALON_STREAM_GAP_WAIT=str(self.gap_wait))
        room = "session:gap"
        readers, taps = yield self.one_on_each(room)
        start = readers[0].cursors[room]
        missing = {"m": {4}, "n": {2, 5, 6}}
        texts = {"m": chunk_texts(self.rng, 10), "n": chunk_texts(self.rng, 13)}
        #: per message: (seq, last_seq, gaps, content) of the event that reports the gap
        reports = {"m": (4, 9, [[4, 4]], "".join(texts["m"][5:])),
                   "n": (2, 12, [[2, 2], [5, 6]],
                         "".join(texts["n"][i] for i in (3, 4, *range(7, 13))))}
        sent = [c for mid in texts for c in answer("gap", mid, texts[mid], **MODEL)
                if c["params"]["seq"] not in missing[mid]]
        before = time.monotonic()
        xadd_all(self.r, self.rng.sample(sent, len(sent)))
        yield self.wait(lambda: all(r.held(room, mid).done for r in readers for mid in texts),
                        "the gap reports", timeout=self.gap_wait + 1 + 10, readers=readers)
        for reader in readers:
            for mid, expected in reports.items():
                reported = [e for e in reader.received
                            if e.data["message_id"] == mid and "gaps" in e.data]
                where = f"{reader.name}, message {mid}"
                self.assertEqual(len(reported), 1, self.about(f"{where}: one gap report"))
                report = reported[0]
                self.assertEqual(
                    (report.data["seq"], report.data["last_seq"], report.data["gaps"],
                     report.data["content"], report.data["done"]), (*expected, True),
                    self.about(f"{where}: the event covering the missing and the held chunks"))
                after = report.at - before
                self.assertGreaterEqual(after, self.gap_wait - 0.1, self.about(
                    f"{where}: reported {after:.2f} s after the publish, before the wait"))
                self.assertLess(after, self.gap_wait + 1 + 3, self.about(
                    f"{where}: reported {after:.2f} s after the publish"))
        delivered = [len(r.received) for r in readers]
        xadd_payload(self.r, chunk("gap", "m", 4, "LATE", model=MODEL_NAME))
        # a late chunk mishandled would show within the wait and its second
        yield self.wait(lambda: acknowledged(self.r), "the late chunk handled")
        yield sleep(self.gap_wait + 1)
        yield settle(self.r, room, taps)
        self.assertEqual([len(r.received) for r in readers], delivered,
                         self.about("the late chunk 4 is ignored"))
        recovering = Reader("recovering")
        yield self.connect(nodes[1], recovering, room, start)
        self.assert_clean([*readers, recovering])
        for mid in texts:
            text = "".join(t for seq, t in enumerate(texts[mid]) if seq not in missing[mid])
            for reader in [*readers, recovering]:
                self.assert_whole(reader, room, mid, text, gaps=reports[mid][2])
        self.assertEqual(sorted((e.data["message_id"], e.data["seq"], e.data["last_seq"],
                                 e.data.get("gaps")) for e in recovering.received),
                         [("m", 0, 9, [[4, 4]]), ("n", 0, 12, [[2, 2], [5, 6]])],
                         self.about("recovery: each message as it stands, in one event"))


class EndTests(StreamTestCase):
    #: short: chunks repeated after done are shown ignored after this wait and a second
    gap_wait = 2.0

    @inlineCallbacks
    def test_an_error_ends_the_message(self) -> Any:
        """
        The last chunk carries error: the event covering it has done true
        and error, live and in recovery (from before the message, and for a
        client that left half way: the finished message whole); a join
        without since does not list it as streaming (sections 5.1 and 6).
        """
        nodes = yield self.cluster()
        room = "session:error"
        readers, taps = yield self.one_on_each(room)
        start = readers[0].cursors[room]
        leaving = Reader("carol")
        leaving_tap = yield self.connect(nodes[1], leaving, room)
        error = "model failed: overloaded"
        texts = [*chunk_texts(self.rng, 19), ""]
        chunks = answer("error", "m", texts, error=error, **MODEL)
        first, rest = chunks[:10], chunks[10:]
        xadd_all(self.r, self.rng.sample(first, len(first)))
        yield self.holding([*readers, leaving], room, {"m": 9})
        yield leaving_tap.client.drop()
        xadd_all(self.r, self.rng.sample(rest, len(rest)))
        yield self.holding(readers, room, {"m": 19})
        yield settle(self.r, room, taps)
        for reader in readers:
            last = reader.received[-1].data
            self.assertEqual((last["last_seq"], last["done"], last.get("error")),
                             (19, True, error), self.about(f"{reader.name}: the last event"))
        from_start, plain = Reader("from-start"), Reader("plain")
        yield self.connect(nodes[0], from_start, room, start)
        yield self.connect(nodes[0], leaving, room, leaving.cursors[room])
        yield self.connect(nodes[1], plain, room)
        self.assert_clean([*readers, from_start, leaving, plain])
        whole = "".join(texts)
        for reader in [*readers, from_start, leaving]:
            self.assert_whole(reader, room, "m", whole, error=error)
        recovered = [(e.data["seq"], e.data["last_seq"], e.data["done"], e.data.get("error"),
                      e.data["content"]) for e in leaving.received if e.how == "missed"]
        self.assertEqual(recovered, [(0, 19, True, error, whole)],
                         self.about("back after seq 9, the message done: the whole message in "
                                    "one event, with the error"))
        self.assertEqual((plain.joins[0]["missed"], plain.joins[0]["streaming"]), ([], []),
                         self.about("an ended message is not streaming"))

    @inlineCallbacks
    def test_duplicate_chunks_are_delivered_once(self) -> Any:
        """
        Chunks published twice (the first and the done one among them),
        shuffled over both nodes, and again after done together with a
        chunk past the done one: each chunk reaches every client once
        (section 5.1: a seq already received, and anything after done, are
        ignored).  The same message id in two sessions is two messages.
        """
        nodes = yield self.cluster(UNREALON_STREAM_GAP_WAIT=str(self.gap_wait))
        sessions = ("dup", "dup2")
        rooms = [f"session:{s}" for s in sessions]
        readers, taps = yield self.one_on_each(*rooms)
        starts = [readers[0].cursors[room] for room in rooms]
        length = 200
        texts = {s: chunk_texts(self.rng, length) for s in sessions}
        chunks = {s: answer(s, "m", texts[s], **MODEL) for s in sessions}
        payloads = []
        for s in sessions:
            payloads += chunks[s] + [chunks[s][0], chunks[s][-1],
                                     *self.rng.sample(chunks[s][1:-1], 60)]
        xadd_all(self.r, self.rng.sample(payloads, len(payloads)))
        for room in rooms:
            yield self.holding(readers, room, {"m": length - 1})
        yield settle(self.r, rooms[0], taps)
        delivered = [len(r.received) for r in readers]
        again = [chunks["dup"][-1], chunks["dup"][0], chunks["dup"][length // 2],
                 chunk("dup", "m", length, "past the end", model=MODEL_NAME)]
        xadd_all(self.r, again)
        # anything held by mistake would be released within the wait and a second
        yield self.wait(lambda: acknowledged(self.r), "the repeated chunks handled")
        yield sleep(self.gap_wait + 1)
        yield settle(self.r, rooms[0], taps)
        self.assertEqual([len(r.received) for r in readers], delivered,
                         self.about("chunks repeated after done, or past it, are ignored"))
        recovering = Reader("recovering")
        tap = yield self.connect(nodes[1], recovering, rooms[0], starts[0])
        yield tap.join(rooms[1], starts[1])
        self.assert_clean([*readers, recovering])
        for reader in [*readers, recovering]:
            for s, room in zip(sessions, rooms, strict=True):
                self.assert_whole(reader, room, "m", "".join(texts[s]))
        yield self.assert_both_nodes_handled()


class FieldTests(StreamTestCase):
    @inlineCallbacks
    def test_a_message_has_the_fields_of_its_first_chunk(self) -> Any:
        """
        A message's fields (role and extra fields) are those of the first of
        its chunks the server received, even one it held; fields of later
        chunks are not delivered.  Every chunk's reply is a success with the
        room and a cursor: delivered, held, repeated or after done alike
        (sections 5.1 and 6).
        """
        nodes = yield self.cluster()
        room = "session:fields"
        readers, taps = yield self.one_on_each(room)
        start = readers[0].cursors[room]

        def send(mid: str, seq: int, **fields: Any) -> str:
            reply_to = f"list:response:{uuid.uuid4().hex}"
            payload = chunk("fields", mid, seq, f"<{mid}{seq}>", done=seq == 2, **fields)
            xadd_payload(self.r, {**payload, "reply_to": reply_to, "correlation_id": reply_to})
            return reply_to

        # first received: "first" its seq 0, "held" its seq 2 (the done one), held back
        replies = [send("first", 0, model="x", temperature=1), send("held", 2, model="held-first")]
        yield self.wait(lambda: acknowledged(self.r), "the first chunks handled")
        replies += [send("first", 1, model="y", other=2, role="tool"), send("first", 2),
                    send("held", 0, model="early", role="tool"), send("held", 1, other=3)]
        yield self.holding(readers, room, {"first": 2, "held": 2})
        replies += [send("first", 1, model="z"), send("held", 2, model="after")]
        for reply_to in replies:
            reply, _ = yield wait_reply(self.r, reply_to, timeout=10)
            self.assertTrue(reply["success"], self.about(f"a chunk's reply: {reply}"))
            self.assertEqual(reply["result"]["room"], room, self.about(str(reply)))
            self.assertIsInstance(reply["result"]["cursor"], str, self.about(str(reply)))
        yield settle(self.r, room, taps)
        recovering = Reader("recovering")
        yield self.connect(nodes[1], recovering, room, start)
        self.assert_clean([*readers, recovering])
        expected = {
            "first": {"session_id": "fields", "message_id": "first", "role": "assistant",
                      "model": "x", "temperature": 1},
            "held": {"session_id": "fields", "message_id": "held", "role": "assistant",
                     "model": "held-first"},
        }
        for reader in (*readers, recovering):
            for event in reader.received:
                mid = event.data["message_id"]
                self.assertEqual({k: v for k, v in event.data.items() if k not in EVENT_KEYS},
                                 expected[mid], self.about(
                                     f"{reader.name} {event.how} {mid} seq {event.data['seq']}: "
                                     "the fields of the first chunk received"))
            for mid in expected:
                self.assertEqual(reader.held(room, mid).content,
                                 "".join(f"<{mid}{seq}>" for seq in range(3)),
                                 self.about(f"{reader.name}: the text of {mid}"))


class ReferenceClientTests(SynchronousTestCase):
    """The reference client of these tests (L{Reader}) applies and checks what the contract says."""

    room = "session:s"

    def event(self, seq: int, last: int, content: str, done: bool = False,
              **more: Any) -> dict[str, Any]:
        data = {"session_id": "s", "message_id": "m", "role": "assistant", "content": content,
                "seq": seq, "last_seq": last, "done": done, **more}
        return {"room": self.room, "cursor": f"c{last}", "data": data}

    def test_contiguous_events_make_the_text(self) -> None:
        reader = Reader("r")
        for event in (self.event(0, 1, "ab"), self.event(2, 2, "c"),
                      self.event(3, 5, "d", True, gaps=[[4, 5]])):
            reader.event("r#1", "live", event)
        self.assertEqual(reader.violations, [])
        held = reader.held(self.room, "m")
        self.assertEqual((held.content, held.last_seq, held.done, held.gaps),
                         ("abcd", 5, True, [[4, 5]]))

    def test_rules_append_replace_ignore(self) -> None:
        reader = Reader("r")
        data = self.event(0, 2, "abc")["data"]
        self.assertEqual(reader.apply(self.room, data), "replace")
        self.assertEqual(reader.apply(self.room, self.event(3, 3, "d")["data"]), "append")
        self.assertEqual(reader.apply(self.room, self.event(2, 3, "xx")["data"]), "ignore")
        self.assertEqual(reader.apply(self.room, self.event(5, 6, "zz")["data"]), "none")
        self.assertEqual(reader.apply(self.room, self.event(0, 4, "ABCDE")["data"]), "replace")
        self.assertEqual(reader.text(self.room, "m"), "ABCDE")

    def test_broken_promises_are_collected(self) -> None:
        cases = [
            ([self.event(1, 1, "b")], "a gap"),
            ([self.event(0, 1, "ab"), self.event(3, 3, "d")], "a gap"),
            ([self.event(0, 1, "ab"), self.event(1, 2, "bc")], "a duplicate"),
            ([self.event(0, 0, "a", True), self.event(1, 1, "b")], "after the one with done"),
            ([self.event(0, 0, "a", error="x")], "error present without done"),
            ([self.event(0, 2, "a", gaps=[])], "gaps present but not"),
            ([self.event(0, 2, "a", gaps=[[3, 3]])], "inside seq..last_seq"),
            ([{"room": self.room, "data": {**self.event(0, 0, "a")["data"], "last_seq": None}}],
             "seq/last_seq"),
        ]
        for events, expected in cases:
            reader = Reader("r")
            for event in events:
                reader.event("r#1", "live", event)
            self.assertTrue(reader.violations, events)
            self.assertIn(expected, reader.violations[0])

    def test_joins(self) -> None:
        def notification(event: dict[str, Any]) -> dict[str, Any]:
            return {"jsonrpc": "2.0", "method": MESSAGE, "params": event}

        reader = Reader("r")
        reader.event("r#1", "live", self.event(0, 1, "ab"))
        # without since: the message so far replaces what is held
        reader.joined("r#2", {"room": self.room, "cursor": "c9", "recovered": False,
                              "missed": [], "streaming": [notification(self.event(0, 3, "abcd"))]},
                      since=False)
        self.assertEqual((reader.violations, reader.text(self.room, "m")), ([], "abcd"))
        self.assertEqual(reader.cursors[self.room], "c9")
        # with since: one event per message in missed, none in streaming once recovered
        reader.joined("r#3", {"room": self.room, "cursor": "c9", "recovered": True,
                              "missed": [notification(self.event(4, 4, "e")),
                                         notification(self.event(5, 5, "f"))],
                              "streaming": [notification(self.event(0, 3, "abcd"))]},
                      since=True)
        self.assertEqual(len(reader.violations), 3, reader.violations)
        self.assertIn("recovered, yet streaming", reader.violations[0])
        self.assertIn("2 events of message m in missed", reader.violations[1])
        self.assertIn("a streaming entry", reader.violations[2])


def _place(method: str, data: dict[str, Any]) -> tuple[str, Any]:
    """An event by its number (a barrier by its token), a session.message by its id."""
    if method == MESSAGE:
        return (method, data["message_id"])
    return (method, data.get("n", data.get("token")))
