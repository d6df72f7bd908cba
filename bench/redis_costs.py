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
- the heartbeat per entry (1,000 a call) and the expiry sweep per room with
  nothing expired (one call over every room).

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
from unrealon.engine.rediskeys import PRESENCE, epoch_key, history_key, room_channel

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


def presence_costs(r: redis.Redis, rooms: int, per_room: int) -> dict[str, float]:
    changes = r.register_script(scripts.PRESENCE_CHANGES.source)
    heartbeat = r.register_script(scripts.PRESENCE_HEARTBEAT.source)
    sweep = r.register_script(scripts.PRESENCE_SWEEP.source)
    keys = ["stream:events", f"{PRESENCE}node:bench"]
    joined = '{"jsonrpc":"2.0","method":"presence.joined","params":{}}'
    args: list[Any] = []
    triples: list[Any] = []
    for i in range(rooms):
        for j in range(per_room):
            member = f"u{j}|c{i}-{j}@bench"
            args += ["j", f"room:{i}", f"u{j}", member, "{}", joined, f"c{i}-{j}@bench"]
            triples += [f"room:{i}", member, "{}"]
    head = [PRESENCE, 22500, CHANNELS, 100000, "n1", "0", 86400]
    entries = rooms * per_room
    r.config_resetstat()
    for k in range(0, len(args), 500 * 7):
        changes(keys=keys, args=head + args[k : k + 500 * 7])
    join_us = script_usec(r)[0] / entries
    r.config_resetstat()
    for k in range(0, len(triples), 3 * 1000):
        heartbeat(keys=keys, args=head + triples[k : k + 3000])
    heartbeat_us = script_usec(r)[0] / entries
    r.config_resetstat()
    sweep(keys=[f"{PRESENCE}sweeper", f"{PRESENCE}swept", "stream:events"],
          args=[PRESENCE, 22500, "bench", 6000, CHANNELS, "", 12000, 100000, "0"])
    sweep_us = script_usec(r)[0]
    return {"join_us": join_us, "heartbeat_us_per_entry": heartbeat_us,
            "sweep_us_per_room": sweep_us / rooms, "sweep_ms": sweep_us / 1000,
            "rooms": rooms, "entries": entries}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, nothing recorded")
    args = p.parse_args()
    events, rooms, per_room = (500, 50, 4) if args.smoke else (20_000, 2000, 10)
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
    print(f"presence: join {pres['join_us']:.2f} us, heartbeat {pres['heartbeat_us_per_entry']:.2f}"
          f" us per entry, sweep {pres['sweep_us_per_room']:.2f} us per room "
          f"({pres['sweep_ms']:.1f} ms over {pres['rooms']} rooms)")
    if not args.smoke:
        (RESULTS / "redis-costs.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
