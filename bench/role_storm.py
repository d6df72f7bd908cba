"""Reconnect storm: every member drops at once and rejoins with ``since``.

Members join one room and follow its events (cursor + ``data.seq``). At
``drop_at_s`` after go they all abort their TCP connections together (no
close handshake: a network blip), then reconnect at ``concurrency`` and call
``rooms.join {room, since: <last cursor seen>}``. A member has recovered when
that reply arrives with ``recovered: true``; its ``missed`` events are
applied, then live ones. At the end each member must hold every ``seq`` from
its first one to the publisher's last, exactly once.

JSON is decoded here (not regex-parsed): the rates are modest and the cursor
is an opaque string.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from dialects import DIALECTS
from stats import Hist
from wsclient import Client, close_all, connect_many

now_ns = time.perf_counter_ns


class Follower:
    """What one member has seen of the room."""

    __slots__ = ("cursor", "dups", "first", "recovered", "rejoin_ns", "seen")

    def __init__(self, total: int) -> None:
        self.cursor: str | None = None
        self.seen = bytearray(total)
        self.dups = 0
        self.first = -1
        self.recovered: bool | None = None
        self.rejoin_ns = 0

    def apply(self, note: dict[str, Any]) -> None:
        params = note.get("params") or {}
        data = params.get("data") or {}
        seq = data.get("seq")
        if not isinstance(seq, int) or not 0 <= seq < len(self.seen):
            return
        if self.seen[seq]:
            self.dups += 1
        self.seen[seq] = 1
        if self.first < 0 or seq < self.first:
            self.first = seq
        self.cursor = params.get("cursor", self.cursor)

    def complete(self) -> bool:
        return self.first >= 0 and all(self.seen[self.first:])


async def storm(spec: dict[str, Any], ctl: Any) -> None:
    """Follow, drop all at once, rejoin with since, check completeness."""
    d = DIALECTS[spec["dialect"]]
    if not d.has_cursor:
        raise RuntimeError(f"dialect {d.name} has no cursors")
    room, total, url = spec["room"], int(spec["total"]), spec["url"]
    followers = [Follower(total) for _ in range(spec["members"])]
    last_seq = total - 1
    done_count = [0]
    finished = asyncio.get_running_loop().create_future()

    def live(c: Client):  # type: ignore[no-untyped-def]
        f: Follower = c.state

        def on_msg(payload: bytes) -> None:
            if not d.is_event(payload):
                return
            had_last = f.seen[last_seq]
            f.apply(json.loads(payload))
            if not had_last and f.seen[last_seq]:
                done_count[0] += 1
                if done_count[0] >= len(followers) and not finished.done():
                    finished.set_result(None)
        return on_msg

    async def join(c: Client, since: str | None) -> None:
        f: Follower = followers[c.tag]
        c.state = f
        res = d.join_result(await c.call(d.join(1, room, since)))
        if since is not None:
            f.rejoin_ns = now_ns()
            f.recovered = bool(res.get("recovered"))
        for note in res.get("missed") or ():
            f.apply(note)
        if f.cursor is None:  # nothing seen yet: follow from the join's cursor
            f.cursor = res.get("cursor")
        for payload in c.early:  # events that came between the reply and now
            if d.is_event(payload):
                f.apply(json.loads(payload))
        c.early.clear()
        c.on_msg = live(c)

    clients, fails, _ = await connect_many(len(followers), spec.get("concurrency", 200), url, d,
                                           after=lambda c: join(c, None))
    if len(clients) < len(followers):
        raise RuntimeError(f"only {len(clients)}/{len(followers)} members joined: {fails}")
    await ctl.phase("ready", connected=len(clients))

    await asyncio.sleep(spec["drop_at_s"])
    t_drop = now_ns()
    for c in clients:
        c.abort()
    since_of = {i: f.cursor for i, f in enumerate(followers)}
    clients2, fails2, storm_s = await connect_many(
        len(followers), spec.get("concurrency", 200), url, d,
        after=lambda c: join(c, since_of[c.tag]), deadline_s=spec["deadline_s"])
    try:
        await asyncio.wait_for(asyncio.shield(finished), spec["deadline_s"])
    except TimeoutError:
        pass  # members still missing events are counted below
    rec = Hist()
    for f in followers:
        if f.rejoin_ns:
            rec.add((f.rejoin_ns - t_drop) / 1000.0)
    ctl.done({"members": len(followers), "reconnected": len(clients2), "reconnect_failures": fails2,
              "storm_connect_s": storm_s,
              "recovered": sum(1 for f in followers if f.recovered),
              "not_recovered": sum(1 for f in followers if f.recovered is False),
              "time_to_all_s": (rec.vmax / 1e6) if rec.n == len(followers) else None,
              "complete": sum(1 for f in followers if f.complete()),
              "dups": sum(f.dups for f in followers), "hist": rec.to_dict()})
    await close_all(clients2)
