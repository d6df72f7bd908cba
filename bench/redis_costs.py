"""
Redis time of the engine's scripts, per unit of work: the numbers of the
capacity model (docs/cluster-design.md section 8).

    .venv/bin/python bench/redis_costs.py [--smoke]

A private ``redis-server`` (``servers.PrivateRedis``); the scripts are the
ones under test (``unrealon.engine.scripts``), called with redis-py,
pipelined, and timed by Redis itself (``INFO commandstats``: microseconds of
the script per call, without the connection's I/O). Measured:

- the publish script per event, with 0, 1, 4 and 16 subscribers on the
  room's channel (the nodes with members in the room);
- a presence join (``PRESENCE_CHANGES``, 500 changes a call, as the node
  batches a reactor turn's);
- presence upkeep with liveness by node: the heartbeat of a node with 20,000
  entries (one call, whatever the entries), a sweep pass with no dead node
  (20,000 entries in 1,000 rooms in Redis), the sweep of a dead node's 20,000
  entries per entry (500 a call, as the sweeper does; the longest call too),
  and the restore of a swept node's entries per entry (500 a call); and the
  memory of a node's index of its entries (MEMORY USAGE) per entry.

Results: ``bench/results/redis-costs.json`` (``--smoke``: printed only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from servers import PrivateRedis

from unrealon.engine import scripts
from unrealon.engine.presencesweep import ENTRIES_PER_CALL
from unrealon.engine.rediskeys import (
    PRESENCE,
    PRESENCE_ALIVE,
    PRESENCE_DEAD,
    epoch_key,
    history_key,
    presence_index_key,
    presence_node_key,
    room_channel,
)

RESULTS = Path(__file__).resolve().parent / "results"
CHANNELS = "unrealon:r:0:"


def script_usec(r: redis.Redis) -> tuple[float, int]:
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("usec", 0)), int(stats.get("calls", 0))


def publish_costs(r: redis.Redis, events: int) -> dict[str, float]:
    sha = r.script_load(scripts.PUBLISH.source)
    room = "workspace:1"
    head = ('{"jsonrpc":"2.0","method":"workspace.file_changed","params":{"room":"workspace:1",'
            '"cursor":"')
    tail = '","data":{"path":"src/app.py","change":"modified","by":"bench","seq":1}}}'
    out = {}
    for subscribers in (0, 1, 4, 16):
        listeners = []
        for _ in range(subscribers):
            p = redis.Redis(unix_socket_path=r.connection_pool.connection_kwargs["path"]).pubsub()
            p.subscribe(room_channel(CHANNELS, room))
            listeners.append(p)
        r.config_resetstat()
        pipe = r.pipeline(transaction=False)
        for i in range(events):
            pipe.evalsha(sha, 3, history_key(room), epoch_key(room), "", head, tail, 1000, 3600,
                         room_channel(CHANNELS, room), 86400)
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()
        usec, calls = script_usec(r)
        out[str(subscribers)] = usec / calls
        for p in listeners:
            p.close()
    return out


def _sweep_call(sweep: Any, r: redis.Redis) -> tuple[list[int], float]:
    """One sweep call (the loop's arguments, T = 30 s) and its microseconds of Redis."""
    r.config_resetstat()
    reply = sweep(keys=[f"{PRESENCE}sweeper", f"{PRESENCE}swept", "stream:events",
                        PRESENCE_ALIVE, PRESENCE_DEAD],
                  args=[PRESENCE, 22500, "bench", 6000, CHANNELS, ENTRIES_PER_CALL, 12000,
                        100000, "0"])
    return [int(n) for n in reply], script_usec(r)[0]


def presence_costs(r: redis.Redis, rooms: int, per_room: int) -> dict[str, float]:
    changes = r.register_script(scripts.PRESENCE_CHANGES.source)
    heartbeat = r.register_script(scripts.PRESENCE_HEARTBEAT.source)
    restore = r.register_script(scripts.PRESENCE_RESTORE.source)
    sweep = r.register_script(scripts.PRESENCE_SWEEP.source)
    joined = '{"jsonrpc":"2.0","method":"presence.joined","params":{}}'
    entries = rooms * per_room

    def node_entries(token: str) -> tuple[list[Any], list[Any]]:
        args: list[Any] = []
        triples: list[Any] = []
        for i in range(rooms):
            for j in range(per_room):
                member = f"u{j}|c{i}-{j}@{token}"
                args += ["j", f"room:{i}", f"u{j}", member, "{}", joined]
                triples += [f"room:{i}", member, "{}"]
        return args, triples

    def join_all(token: str, args: list[Any]) -> float:
        keys = ["stream:events", presence_node_key(token), PRESENCE_ALIVE,
                presence_index_key(token)]
        head = [PRESENCE, 22500, CHANNELS, 100000, token, "0", 86400, token]
        r.config_resetstat()
        for k in range(0, len(args), 500 * 6):
            changes(keys=keys, args=head + args[k : k + 500 * 6])
        return script_usec(r)[0]

    # a live node: 20,000 entries, its heartbeat, a sweep pass with nobody dead
    live_args, _ = node_entries("live")
    join_us = join_all("live", live_args) / entries
    # many calls: a small script also pays for Lua's garbage collection
    # steps, which the big calls before it left to do
    r.config_resetstat()
    for _ in range(1000):
        heartbeat(keys=[PRESENCE_ALIVE, presence_node_key("live")],
                  args=["live", 22500, "live", 86400])
    heartbeat_us = script_usec(r)[0] / 1000
    index_bytes = int(r.memory_usage(presence_index_key("live"), samples=0) or 0)
    idle = [_sweep_call(sweep, r)[1] for _ in range(100)]
    # a second node in the same rooms dies: its sweep, then (as if it had
    # only been paused) its restore
    dead_args, dead_triples = node_entries("dead")
    join_all("dead", dead_args)
    r.zadd(PRESENCE_ALIVE, {"dead": 1})
    calls: list[float] = []
    removed = 0
    while True:
        (gone, _extended, more), usec = _sweep_call(sweep, r)
        removed += gone
        calls.append(usec)
        if not more:
            break
    assert removed == entries, (removed, entries)
    r.config_resetstat()
    for k in range(0, len(dead_triples), 3 * 500):
        restore(keys=["stream:events", presence_index_key("dead")],
                args=[PRESENCE, CHANNELS, 100000, "dead", "0", *dead_triples[k : k + 1500]])
    restore_us = script_usec(r)[0] / entries
    return {"join_us": join_us, "heartbeat_us_per_node": heartbeat_us,
            "sweep_idle_us": sum(idle) / len(idle),
            "sweep_us_per_dead_entry": sum(calls) / entries,
            "sweep_calls": len(calls), "sweep_longest_call_ms": max(calls) / 1000,
            "restore_us_per_entry": restore_us, "index_bytes_per_entry": index_bytes / entries,
            "rooms": rooms, "entries": entries}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, nothing recorded")
    args = p.parse_args()
    events, rooms, per_room = (500, 50, 4) if args.smoke else (20_000, 1000, 20)
    logdir = RESULTS / "runs" / f"redis-costs-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir.mkdir(parents=True, exist_ok=True)
    store = PrivateRedis(logdir)
    store.start()
    try:
        r = redis.Redis(unix_socket_path=store.sock)
        result = {"publish_us_by_subscribers": publish_costs(r, events),
                  "presence": presence_costs(r, rooms, per_room),
                  "redis_version": r.info("server")["redis_version"]}
    finally:
        store.stop()
    pub, pres = result["publish_us_by_subscribers"], result["presence"]
    print("publish script per event, by nodes subscribed: " +
          ", ".join(f"{k}: {v:.1f} us" for k, v in pub.items()))
    print(f"presence ({pres['entries']} entries of a node in {pres['rooms']} rooms): "
          f"join {pres['join_us']:.2f} us per entry; heartbeat {pres['heartbeat_us_per_node']:.1f}"
          f" us per node; sweep with no dead node {pres['sweep_idle_us']:.1f} us; sweep of a dead"
          f" node {pres['sweep_us_per_dead_entry']:.2f} us per entry ({pres['sweep_calls']} calls,"
          f" longest {pres['sweep_longest_call_ms']:.1f} ms); restore"
          f" {pres['restore_us_per_entry']:.2f} us per entry; the node's index"
          f" {pres['index_bytes_per_entry']:.0f} B per entry")
    if not args.smoke:
        (RESULTS / "redis-costs.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
