"""Event roles: room members that time deliveries, and the fixed-rate publisher.

The publisher stamps each event with its *scheduled* send time
(``data.t_ns``, ``time.perf_counter_ns()``: CLOCK_MONOTONIC, the same clock
in every process on this host) and a per-room ``seq``. Receivers compute
``now - t_ns`` with a regex on the raw frame (no JSON decode on the hot
path) and, when asked, check per-member ``seq`` completeness and order.

AI mode (``mode: "ai"``) publishes streamed ``session.message`` answers the
way a backend does (PROTOCOL.md sections 5.1 and 6): each session's answers
``m-<sid>-0``, ``m-<sid>-1``, ... of ``chunks_per_message`` chunks, ``seq``
numbered from 0 in each answer, ``done`` true on its last chunk. A server
may deliver several chunks as one event (``seq``..``last_seq``, the chunks'
text concatenated), and a message's fields are those of its first chunk, so
the timing cannot ride in a field: each chunk's ``content`` starts with a
marker ``@<k>:<scheduled ns>~`` (``k``: the chunk's index in its session),
padded with text to the same size as before. Receivers time every chunk
from its own marker and check, per event, that the markers are exactly the
chunks ``seq``..``last_seq`` of one answer, in order, ``done`` exactly on an
answer's last chunk; per member, no chunk missing or repeated.

Publish adapters (chosen per server by the harness):
- ``rpc``: a client call over ``conns`` WebSockets (``bench.publish`` for the
  peers and our memory engine, ``broadcast`` for django-ipc). Room ``i``
  always goes through connection ``i % conns``, so each room's events stay
  in order while servers that run one call at a time per connection are not
  measured on that instead of on delivery.
- ``redis_xadd``: XADD to the ingress stream, in the server's payload format
  (``dialects.xadd_payload``); batches are pipelined when the sender is late.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dialects import DIALECTS, RE_DONE, RE_GAPS, RE_LAST_SEQ, RE_MARK, RE_SEQ, RE_T_NS, xadd_payload
from stats import Hist
from wsclient import Client, close_all, connect_many

now_ns = time.perf_counter_ns
# Sleeps shorter than the loop's timer resolution return at once and turn the
# sender into a busy loop that eats the client core; instead wake at most
# every millisecond and send everything due (stamped with its scheduled time).
MIN_SLEEP_S = 0.001

CHUNK = "token token token token token token "  # 36 chars of streamed text


def ai_content(k: int, t: int) -> str:
    """A chunk's text: its timing marker, padded with text to ``len(CHUNK)``."""
    mark = f"@{k}:{t}~"
    return mark + CHUNK[len(mark):]


class Member:
    """Per-connection delivery bookkeeping (``got`` counts chunks in AI mode)."""

    __slots__ = ("bad_done", "dups", "events", "expected", "got", "last_seq", "mismatch", "ooo",
                 "room", "seen")

    def __init__(self, room: str, expected: int, track_seq: bool) -> None:
        self.room = room
        self.expected = expected
        self.got = self.events = 0
        self.seen: bytearray | None = bytearray(expected) if track_seq else None
        self.dups = self.ooo = self.mismatch = self.bad_done = 0
        self.last_seq = -1


def ai_event(m: Member, payload: bytes, t: int, cpm: int, hist: Hist) -> int | None:
    """Check and time one AI-mode frame for member ``m``; returns the chunks it covers.

    Chunks are counted by ``seq``..``last_seq`` (``last_seq`` absent: one
    chunk, as the peers send) in the answer the text's first marker names;
    each is marked seen (a second time: a duplicate; before one already seen:
    out of order). The event is "mismatched" when its markers are not exactly
    those chunks in order, or it reports gaps; "bad done" when ``done`` is
    not true exactly on an answer's last chunk. None: not an AI event.
    """
    marks = RE_MARK.findall(payload)
    if not marks:
        return None
    seen = m.seen
    assert seen is not None
    m.events += 1
    ms = RE_SEQ.search(payload)
    seq = int(ms.group(1)) if ms else -1
    ml = RE_LAST_SEQ.search(payload)
    last = int(ml.group(1)) if ml else seq
    base = int(marks[0][0]) // cpm * cpm  # the answer's first chunk
    covered = range(base + seq, base + last + 1)
    if [int(k) for k, _ in marks] != list(covered) or RE_GAPS.search(payload):
        m.mismatch += 1
    ends = (last == cpm - 1 or base + last == m.expected - 1)
    if ends != (RE_DONE.search(payload) is not None):
        m.bad_done += 1
    for k in covered:
        if 0 <= k < len(seen):
            if seen[k]:
                m.dups += 1
            seen[k] = 1
        if k <= m.last_seq:
            m.ooo += 1
        m.last_seq = k
    for _, tb in marks:
        hist.add((t - int(tb)) / 1000.0)
    m.got += len(covered)
    return len(covered)


async def receivers(spec: dict[str, Any], ctl: Any) -> None:
    """Join rooms, then record deliveries until all expected arrived or deadline."""
    d = DIALECTS[spec["dialect"]]
    rooms: list[str] = spec["rooms"]
    expected: dict[str, int] = spec["expected"]
    ai = spec.get("mode") == "ai"
    track = ai or bool(spec.get("track_seq", False))
    cpm = int(spec.get("chunks_per_message", 1 << 30))
    offset = int(spec.get("member_offset", 0))

    async def join(c: Client) -> None:
        room = rooms[(c.tag + offset) % len(rooms)]
        d.join_result(await c.call(d.join(1, room)))
        c.state = Member(room, expected.get(room, 0), track)

    clients, fails, conn_s = await connect_many(
        spec["members"], spec.get("concurrency", 200), spec["url"], d, after=join,
        deadline_s=spec.get("connect_deadline_s", 120.0))
    if not clients:
        raise RuntimeError(f"no member joined: {fails}")
    total_expected = sum(c.state.expected for c in clients)
    hist = Hist()
    counters = {"got": 0, "events": 0, "other": 0, "first": 0, "last": 0}
    finished = asyncio.get_running_loop().create_future()

    def make_ai_handler(c: Client):  # type: ignore[no-untyped-def]
        m: Member = c.state

        def on_msg(payload: bytes) -> None:
            t = now_ns()
            n = ai_event(m, payload, t, cpm, hist)
            if n is None:  # replies, presence, anything not ours
                counters["other"] += 1
                return
            if not counters["first"]:
                counters["first"] = t
            counters["last"] = t
            counters["got"] += n
            counters["events"] += 1
            if counters["got"] >= total_expected and not finished.done():
                finished.set_result(None)
        return on_msg

    def make_handler(c: Client):  # type: ignore[no-untyped-def]
        m: Member = c.state

        def on_msg(payload: bytes) -> None:
            t = now_ns()
            mt = RE_T_NS.search(payload)
            if mt is None:  # replies, presence, anything not ours
                counters["other"] += 1
                return
            hist.add((t - int(mt.group(1))) / 1000.0)
            m.got += 1
            if m.seen is not None:
                ms = RE_SEQ.search(payload)
                seq = int(ms.group(1)) if ms else -1
                if 0 <= seq < len(m.seen):
                    if m.seen[seq]:
                        m.dups += 1
                    m.seen[seq] = 1
                if seq < m.last_seq:
                    m.ooo += 1
                m.last_seq = seq
            if not counters["first"]:
                counters["first"] = t
            counters["last"] = t
            counters["got"] += 1
            if counters["got"] >= total_expected and not finished.done():
                finished.set_result(None)
        return on_msg

    for c in clients:
        c.on_msg = make_ai_handler(c) if ai else make_handler(c)
    await ctl.phase("ready", connected=len(clients), failures=fails, connect_s=conn_s)
    try:
        await asyncio.wait_for(asyncio.shield(finished), spec["deadline_s"])
    except TimeoutError:
        pass  # incomplete delivery is a result, not an error
    members: list[Member] = [c.state for c in clients]
    missing = sum(max(0, m.expected - m.got) for m in members)
    if track:
        missing = sum(m.expected - sum(m.seen or b"") for m in members)
    closed: dict[str, int] = {}
    for c in clients:
        if c.closed:
            k = str(c.close_code)
            closed[k] = closed.get(k, 0) + 1
    ctl.done({"members": len(clients), "connect_failures": fails, "connect_s": conn_s,
              "expected": total_expected, "received": counters["got"], "missing": missing,
              "events": counters["events"] if ai else counters["got"],
              "mismatched_events": sum(m.mismatch for m in members),
              "bad_done": sum(m.bad_done for m in members),
              "dups": sum(m.dups for m in members), "out_of_order": sum(m.ooo for m in members),
              "complete_members": sum(1 for m in members if m.got >= m.expected),
              "other_msgs": counters["other"], "first_ns": counters["first"],
              "last_ns": counters["last"], "closed": closed, "hist": hist.to_dict()})
    await close_all(clients)


def _event_data(mode: str, room: str, k: int, per_room: int, cpm: int, t: int,
                pad: str) -> dict[str, Any]:
    """The ``k``-th event of ``room``; in AI mode chunk ``k % cpm`` of answer ``k // cpm``."""
    if mode == "ai":
        sid = room.split(":", 1)[1]
        n, seq = divmod(k, cpm)
        return {"session_id": sid, "message_id": f"m-{sid}-{n}", "role": "assistant",
                "content": ai_content(k, t), "seq": seq,
                "done": seq == cpm - 1 or k == per_room - 1}
    return {"t_ns": t, "seq": k, "p": pad} if pad else {"t_ns": t, "seq": k}


async def publisher(spec: dict[str, Any], ctl: Any) -> None:
    """Publish ``count`` events round-robin over ``rooms`` at ``rate``/s."""
    adapter: dict[str, Any] = spec["adapter"]
    rooms: list[str] = spec["rooms"]
    event, mode, pad = spec["event"], spec.get("mode", "tick"), "x" * spec.get("pad", 0)
    count, rate = int(spec["count"]), float(spec["rate"])
    per_room = -(-count // len(rooms))
    cpm = int(spec.get("chunks_per_message", per_room)) or per_room
    acks = {"ok": 0, "err": 0}
    sent = 0
    pubs: list[Client] = []
    redis: Any = None
    d = DIALECTS[spec["dialect"]]
    if adapter["kind"] == "rpc":
        want = max(1, min(int(adapter.get("conns", 1)), len(rooms)))
        pubs, fails, _ = await connect_many(want, want, spec["url"], d)
        if len(pubs) < want:
            raise RuntimeError(f"publisher could not connect: {fails}")
        pubs.sort(key=lambda c: c.tag)

        def on_reply(payload: bytes) -> None:
            if not d.is_event(payload):
                acks["err" if d.is_error(payload) else "ok"] += 1
        for c in pubs:
            c.on_msg = on_reply
    else:
        import redis.asyncio as aioredis
        redis = aioredis.from_url(adapter["redis_url"])
        await redis.ping()
    stream = adapter.get("stream", "stream:requests")
    await ctl.phase("ready")

    interval = 1e9 / rate
    t0 = now_ns()
    max_lag = 0
    while sent < count:
        t = now_ns()
        due = min(count, int((t - t0) / interval) + 1)
        if due - sent > 1:
            max_lag = max(max_lag, t - int(t0 + sent * interval))
        batch = []
        while sent < due:
            room = rooms[sent % len(rooms)]
            seq = sent // len(rooms)
            sched = int(t0 + sent * interval)
            batch.append((room, _event_data(mode, room, seq, per_room, cpm, sched, pad), sent))
            sent += 1
        if pubs:
            for room, data, n in batch:
                pubs[(n % len(rooms)) % len(pubs)].send(
                    d.publish(n + 1, room, event, data, adapter.get("method")))
        elif len(batch) == 1:
            room, data, n = batch[0]
            await redis.xadd(stream, {"payload": xadd_payload(adapter["format"], room, event, data, n)})
        else:
            pipe = redis.pipeline(transaction=False)
            for room, data, n in batch:
                pipe.xadd(stream, {"payload": xadd_payload(adapter["format"], room, event, data, n)})
            await pipe.execute()
        await asyncio.sleep(max(MIN_SLEEP_S, (t0 + sent * interval - now_ns()) / 1e9))
    t_end = now_ns()
    if pubs:  # wait (bounded) for the publish acks
        end = time.monotonic() + spec.get("tail_s", 10.0)
        while (acks["ok"] + acks["err"] < count and time.monotonic() < end
               and not all(c.closed for c in pubs)):
            await asyncio.sleep(0.01)
    ctl.done({"sent": sent, "acked": acks["ok"], "ack_errors": acks["err"], "t0_ns": t0,
              "t_end_ns": t_end, "sender_max_lag_ms": max_lag / 1e6})
    if pubs:
        await close_all(pubs)
    if redis is not None:
        await redis.aclose()
