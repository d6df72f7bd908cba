"""
Streamed messages as an outside client sees them (PROTOCOL.md section 5.1).

A backend publishes a streamed C{session.message} in chunks, each its own
ingress entry (L{chunk}, L{xadd_all}); the nodes of a cluster take the
entries in one consumer group, so different nodes handle different chunks.

L{Reader} is one client across all its connections: it applies the client
rules of section 5.1 (L{Reader.apply}: append C{seq} n + 1, replace with
C{seq} 0, ignore C{last_seq} n or less) to build the text it holds, and it
checks every event against what the contract promises a client (first
C{seq} 0, each later C{seq} the previous C{last_seq} + 1, nothing after
C{done}, at most one event per message in C{missed}, C{streaming} only on
a join that did not recover...), collecting what breaks it in
L{Reader.violations} instead of raising in the middle of a delivery.

L{StreamTap} is one connection of a reader: a L{Tap} (so barriers work)
that hands the reader every C{session.message} and every reply of a join
it made, in arrival order.  L{settle} proves "nothing more will come": every
ingress entry acknowledged, then a barrier published through the ingress.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import redis
from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from tests.helpers.cluster import Tap, barrier
from tests.helpers.ingress_support import group_info, xadd_payload
from tests.helpers.node import WSClient
from tests.helpers.process import NodeProcess
from tests.helpers.waiting import wait_until

MESSAGE = "session.message"
#: words of the chunks' text: multi-byte characters, JSON escapes, white space
_WORDS = ("alpha", "βήτα", "гамма", "δ", "ε—ζ", "日本語", "😀", "a\"b", "back\\slash",
          "tab\tx", "line\nbreak", " ", "", "<&>")


def chunk_texts(rng: random.Random, count: int) -> list[str]:
    """The texts of C{count} chunks; each names its seq, so a misplaced one shows."""
    return [f"[{seq}]{rng.choice(_WORDS)}" for seq in range(count)]


def chunk(
    session_id: str,
    message_id: str,
    seq: int,
    content: str,
    *,
    done: bool = False,
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ingress payload of one chunk (PROTOCOL.md section 6)."""
    params: dict[str, Any] = {"session_id": session_id, "message_id": message_id,
                              "role": "assistant", "content": content, "seq": seq,
                              "done": done, **extra}
    if error is not None:
        params["error"] = error
    return {"method": MESSAGE, "params": params}


def answer(session_id: str, message_id: str, texts: Sequence[str],
           error: str | None = None, **extra: Any) -> list[dict[str, Any]]:
    """Every chunk of one message, in seq order; the last one is C{done}."""
    last = len(texts) - 1
    return [chunk(session_id, message_id, seq, text, done=seq == last,
                  error=error if seq == last else None, **extra)
            for seq, text in enumerate(texts)]


def local_shuffle(rng: random.Random, items: Sequence[Any], reach: int) -> list[Any]:
    """C{items} reordered so that each moves by about C{reach} places at most."""
    keyed = [(i + rng.uniform(0, reach), item) for i, item in enumerate(items)]
    return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]


def xadd_all(r: redis.Redis[str], payloads: Iterable[Mapping[str, Any]]) -> None:
    """XADD each payload to the ingress stream, in this order, in one round trip."""
    pipe = r.pipeline(transaction=False)
    for payload in payloads:
        xadd_payload(pipe, payload)
    pipe.execute()


def ingress_publish(r: redis.Redis[str]) -> Callable[[str, str, Mapping[str, Any]], Deferred[str]]:
    """A publish function for L{barrier}: the backend method C{publish}, through the ingress."""

    def publish(room: str, event: str, data: Mapping[str, Any]) -> Deferred[str]:
        params = {"room": room, "event": event, "data": dict(data)}
        return succeed(xadd_payload(r, {"method": "publish", "params": params}))

    return publish


def acknowledged(r: redis.Redis[str]) -> bool:
    """Every ingress entry read and acknowledged: none is left to be handled."""
    info = group_info(r)
    return int(info["pending"]) == 0 and int(info["lag"] or 0) == 0


@inlineCallbacks
def settle(r: redis.Redis[str], room: str, taps: Sequence[Tap], timeout: float = 30) -> Any:
    """
    Every ingress entry acknowledged (none can be handled again), then a
    barrier through the ingress into C{room}: it is handled after all of
    them, and each node delivers the cluster's events in one order, so what
    the taps have not received by then was never sent.
    """
    yield wait_until(lambda: acknowledged(r), timeout=timeout,
                     what="every ingress entry acknowledged")
    yield barrier(ingress_publish(r), room, taps, timeout=timeout)


@attrs.define
class Held:
    """One message as a client holds it."""

    content: str = ""
    last_seq: int = -1
    done: bool = False
    error: str | None = None
    gaps: list[list[int]] = attrs.field(factory=list)
    #: the message's fields (data without the per-event ones)
    fields: dict[str, Any] = attrs.field(factory=dict)


#: the keys of an event's data that describe the event, not the message
EVENT_KEYS = frozenset({"content", "seq", "last_seq", "done", "gaps", "error"})


@attrs.define
class Received:
    """One event a connection received, and how."""

    at: float
    connection: str
    #: "live", "missed" or "streaming"
    how: str
    room: str
    data: dict[str, Any]
    cursor: str | None
    method: str = MESSAGE


class Reader:
    """
    One client across its connections: the text it holds per message by the
    client rules, the last cursor it saw per room, and every promise of the
    contract an event broke (L{violations}).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: dict[tuple[str, str], Held] = {}
        self.cursors: dict[str, str] = {}
        #: the session.message events received, live or in a join's reply
        self.received: list[Received] = []
        #: every room event received live (session.message and others), in arrival order
        self.timeline: list[Received] = []
        self.joins: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self._connections = 0

    # -- the client rules of section 5.1 ---------------------------------------------

    def apply(self, room: str, data: Mapping[str, Any]) -> str:
        """
        Apply one event by the client rules; return what they did: "append",
        "replace", "ignore", or "none" (no rule applies: the contract says
        such an event never comes).
        """
        key = (room, str(data["message_id"]))
        held = self.messages.get(key)
        n = -1 if held is None else held.last_seq
        seq, last = int(data["seq"]), int(data["last_seq"])
        fields = {k: v for k, v in data.items() if k not in EVENT_KEYS}
        gaps = [list(g) for g in data.get("gaps", [])]
        if seq == n + 1 and held is not None:
            held.content += str(data["content"])
            held.gaps += gaps
            action = "append"
        elif seq == 0:
            held = self.messages[key] = Held(content=str(data["content"]), gaps=gaps,
                                             fields=fields)
            action = "replace"
        elif last <= n:
            return "ignore"
        else:
            return "none"
        held.last_seq = last
        held.done = bool(data["done"])
        held.error = data.get("error")
        return action

    def text(self, room: str, message_id: str) -> str | None:
        held = self.messages.get((room, message_id))
        return None if held is None else held.content

    def held(self, room: str, message_id: str) -> Held:
        held = self.messages.get((room, message_id))
        return Held() if held is None else held

    # -- what a connection received ---------------------------------------------------

    def connection(self) -> str:
        """The name of a new connection of this reader."""
        self._connections += 1
        return self.latest

    @property
    def latest(self) -> str:
        """The name of the reader's latest connection."""
        return f"{self.name}#{self._connections}"

    def event(self, connection: str, how: str, params: Mapping[str, Any]) -> None:
        """A C{session.message} event: check it against the contract, then apply it."""
        room = str(params.get("room"))
        data = params.get("data")
        cursor = params.get("cursor")
        if not isinstance(data, dict):
            self.violations.append(f"{connection} {how}: an event without data: {params}")
            return
        received = Received(time.monotonic(), connection, how, room, data,
                            None if cursor is None else str(cursor))
        self.received.append(received)
        if how == "live":
            self.timeline.append(received)
            if cursor is not None:
                self.cursors[room] = str(cursor)
        if "seq" not in data:
            return  # an ordinary session.message
        problem = self._malformed(data)
        if problem:
            self.violations.append(f"{connection} {how}: {problem}: {_short(data)}")
            return
        mid = str(data["message_id"])
        held = self.messages.get((room, mid))
        n = -1 if held is None else held.last_seq
        seq, last = data["seq"], data["last_seq"]
        where = f"{connection} {how} {room}/{mid} seq {seq}..{last} (held up to {n})"
        if how == "streaming":
            if seq != 0 or data["done"] or last < n:
                self.violations.append(
                    f"{where}: a streaming entry must be the message so far from seq 0, "
                    f"not done: {_short(data)}")
        elif held is not None and held.done:
            self.violations.append(f"{where}: an event after the one with done: {_short(data)}")
        elif how == "missed" and data["done"] and seq == 0:
            pass  # section 5.1, Recovery: a message done since is recovered whole
        elif seq != n + 1:
            kind = "a gap" if seq > n + 1 else "a duplicate"
            self.violations.append(f"{where}: {kind}, expected seq {n + 1}: {_short(data)}")
        action = self.apply(room, data)
        if action == "none":
            self.violations.append(f"{where}: no client rule applies")

    @staticmethod
    def _malformed(data: Mapping[str, Any]) -> str | None:
        seq, last = data.get("seq"), data.get("last_seq")
        if not isinstance(seq, int) or not isinstance(last, int) or seq < 0 or last < seq:
            return "seq/last_seq missing or not 0 <= seq <= last_seq"
        for name in ("session_id", "message_id", "role"):
            if not isinstance(data.get(name), str):
                return f"no {name}"
        if not isinstance(data.get("content"), str):
            return "content is not a string"
        if not isinstance(data.get("done"), bool):
            return "done is not a boolean"
        if "gaps" in data:
            gaps = data["gaps"]
            if not gaps or not isinstance(gaps, list):
                return "gaps present but not a non-empty list"
            previous = seq - 1
            for gap in gaps:
                if (not isinstance(gap, list) or len(gap) != 2
                        or not all(isinstance(x, int) for x in gap)
                        or not previous < gap[0] <= gap[1] <= last):
                    return "gaps are not sorted disjoint [first, last] ranges inside seq..last_seq"
                previous = gap[1]
        if "error" in data and (not isinstance(data["error"], str) or data["done"] is not True):
            return "error present without done true, or not a string"
        return None

    def joined(self, connection: str, result: Mapping[str, Any], since: bool) -> None:
        """The reply of a C{rooms.join}: its C{missed}, then its C{streaming}, checked, applied."""
        self.joins.append({"connection": connection, "since": since, **result})
        room = str(result.get("room"))
        missed, streaming = result.get("missed"), result.get("streaming")
        where = f"{connection} join {room} ({'with' if since else 'without'} since)"
        if not isinstance(missed, list) or not isinstance(streaming, list):
            self.violations.append(f"{where}: missed and streaming must be lists: "
                                   f"{ {k: v for k, v in result.items() if k != 'missed'} }")
            missed = missed if isinstance(missed, list) else []
            streaming = streaming if isinstance(streaming, list) else []
        if not since and (missed or result.get("recovered") is not False):
            self.violations.append(f"{where}: without since, missed is empty and recovered "
                                   f"false; got recovered {result.get('recovered')}, "
                                   f"{len(missed)} missed")
        if result.get("recovered") is True and streaming:
            self.violations.append(f"{where}: recovered, yet streaming holds {len(streaming)}")
        for name, events in (("missed", missed), ("streaming", streaming)):
            ids = Counter(str(e["params"]["data"]["message_id"]) for e in events
                          if e.get("method") == MESSAGE and "seq" in e["params"]["data"])
            for mid, count in ids.items():
                if count > 1:
                    self.violations.append(f"{where}: {count} events of message {mid} in {name}")
            for e in events:
                if e.get("method") == MESSAGE:
                    self.event(connection, name, e["params"])
        self.cursors[room] = str(result["cursor"])

    def saw(self, connection: str, method: str, params: Mapping[str, Any]) -> None:
        """A live room event other than a session.message: its cursor is the latest seen."""
        room, cursor = str(params.get("room")), params.get("cursor")
        self.cursors[room] = str(cursor)
        data = params.get("data")
        self.timeline.append(Received(time.monotonic(), connection, "live", room,
                                      dict(data) if isinstance(data, dict) else {},
                                      str(cursor), method))

    def describe(self, connection: str) -> str:
        """What the join of C{connection} returned, in short (for failure messages)."""
        for join in self.joins:
            if join["connection"] == connection:
                def short(events: Any) -> list[Any]:
                    return [(d.get("message_id"), d.get("seq"), d.get("last_seq"), d.get("done"))
                            for d in (e["params"]["data"] for e in events or [])]
                return (f"{connection} joined {join.get('room')} "
                        f"{'with' if join['since'] else 'without'} since: "
                        f"recovered {join.get('recovered')}, missed {short(join.get('missed'))}, "
                        f"streaming {short(join.get('streaming'))}")
        return f"{connection}: no join"

    def until(self, name: str, index: int) -> Reader:
        """
        A new reader holding what this one held when the live event
        C{timeline[index]} came, and that event's cursor: a client that
        left the room then.
        """
        reader = Reader(name)
        for event in self.timeline[:index + 1]:
            if event.method == MESSAGE:
                reader.event(f"{name}#0", "live",
                             {"room": event.room, "cursor": event.cursor, "data": event.data})
            elif event.cursor is not None:
                reader.cursors[event.room] = event.cursor
        return reader


def _short(data: Mapping[str, Any]) -> str:
    """An event's data for a message, its content cut short."""
    shown = dict(data)
    content = str(shown.get("content", ""))
    if len(content) > 80:
        shown["content"] = f"{content[:40]}...({len(content)} chars)...{content[-30:]}"
    return json.dumps(shown, ensure_ascii=False)


class StreamTap(Tap):
    """
    One connection of a L{Reader}: every C{session.message} it receives, and
    the reply of every join made with L{join}, go to the reader in arrival
    order; a live event of a room whose join reply has not arrived yet is a
    violation (section 4).
    """

    def __init__(self, client: WSClient, reader: Reader) -> None:
        super().__init__(client)
        self.reader = reader
        self.name = reader.connection()
        self.rooms: set[str] = set()
        self._stream_joins: dict[int, bool] = {}
        inner = client._received

        def received(payload: bytes, is_binary: bool) -> None:
            message = json.loads(payload)
            if isinstance(message, dict):
                params, method = message.get("params"), message.get("method")
                if method == MESSAGE and isinstance(params, dict):
                    if params.get("room") not in self.rooms:
                        reader.violations.append(
                            f"{self.name}: an event of {params.get('room')} before its join's "
                            f"reply: {_short(params.get('data') or {})}")
                    reader.event(self.name, "live", params)
                    return
                if isinstance(method, str) and isinstance(params, dict) and "cursor" in params:
                    reader.saw(self.name, method, params)
                rid = message.get("id")
                if isinstance(rid, int) and rid in self._stream_joins and "result" in message:
                    reader.joined(self.name, message["result"], self._stream_joins.pop(rid))
                    self.rooms.add(str(message["result"]["room"]))
            inner(payload, is_binary)

        client._received = received  # type: ignore[method-assign]

    def join(self, room: str, since: str | None = None) -> Any:
        self._stream_joins[self.client._next_id + 1] = since is not None
        return super().join(room, since)


def ingress_handled(node: NodeProcess) -> Deferred[float]:
    """How many ingress entries C{node} handled (C{unrealon_ingress_entries_total})."""

    def count(response: tuple[int, bytes]) -> float:
        total = 0.0
        for line in response[1].decode().splitlines():
            if line.startswith("unrealon_ingress_entries_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    return node.http_get("/metrics").addCallback(count)
