"""
What sharding rooms over S Redis instances spreads, and what stays on the
first: the numbers of the "S shards" part of the capacity model
(docs/cluster-design.md section 8).

    .venv/bin/python bench/shard_costs.py [--smoke]

Three private ``redis-server`` (``servers.PrivateRedis``), called with
redis-py, pipelined; each instance's own accounting measures it (``INFO cpu``
for the whole process, ``INFO commandstats`` for a command's time):

- events: E events to R rooms, each published with the engine's publish
  script on the room's shard (``RoomShards(3)``, as a node does): per shard,
  the events it ran, its CPU per event and its share of the cluster's Redis
  CPU. Sharding works if each share is about 1/3 and the cost per event is
  what one Redis pays.
- the first Redis per ingress entry (what sharding does not spread): the
  backend's XADD, the node's XREADGROUP (100 entries a read) and XACK (the
  node acknowledges a reactor turn's entries in one call), as CPU per entry.
- the model: events/s the cluster's Redis instances carry, by S, when the
  first one (its share of the rooms plus every ingress entry) is at 70%.

Results: ``bench/results/shard-costs.json`` (``--smoke``: printed only).
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
from unrealon.engine.rediskeys import epoch_key, history_key, room_channel
from unrealon.engine.roomshards import RoomShards

RESULTS = Path(__file__).resolve().parent / "results"
SHARDS = 3
CHANNELS = "unrealon:r:0:"
#: a Redis kept at 70% of its core, as in the capacity model
BUDGET = 0.7


def cpu_seconds(r: "redis.Redis[bytes]") -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def publish_spread(shards: "list[redis.Redis[bytes]]", events: int, rooms: int) -> dict[str, Any]:
    """Events to rooms over the shards; each shard's count, CPU per event and share."""
    placement = RoomShards(len(shards))
    shas = [r.script_load(scripts.PUBLISH.source) for r in shards]
    pipes = [r.pipeline(transaction=False) for r in shards]
    counts = [0] * len(shards)
    before = [cpu_seconds(r) for r in shards]
    for i in range(events):
        room = f"workspace:{i % rooms}"
        index = placement.index(room)
        head = ('{"jsonrpc":"2.0","method":"workspace.file_changed","params":{"room":'
                f'"{room}","cursor":"')
        tail = '","data":{"path":"src/app.py","change":"modified","by":"bench","seq":1}}}'
        pipes[index].evalsha(shas[index], 3, history_key(room), epoch_key(room), "", head, tail,
                             1000, 3600, room_channel(CHANNELS, room), 86400)
        counts[index] += 1
        if counts[index] % 500 == 0:
            pipes[index].execute()
    for pipe in pipes:
        pipe.execute()
    spent = [cpu_seconds(r) - b for r, b in zip(shards, before, strict=True)]
    total = sum(spent)
    return {
        "events": counts,
        "cpu_us_per_event": [s / c * 1e6 if c else 0.0 for s, c in zip(spent, counts, strict=True)],
        "share_of_redis_cpu": [s / total for s in spent],
    }


def ingress_cost(r: "redis.Redis[bytes]", entries: int) -> dict[str, float]:
    """The first Redis' CPU per ingress entry: XADD, XREADGROUP (100 a read), XACK."""
    stream, group = "stream:requests", "rpc_group"
    r.xgroup_create(stream, group, id="0", mkstream=True)
    payload = json.dumps({"method": "publish", "params": {
        "room": "workspace:1", "event": "workspace.file_changed",
        "data": {"path": "src/app.py", "change": "modified"}}})
    out = {}
    before = cpu_seconds(r)
    pipe = r.pipeline(transaction=False)
    for i in range(entries):
        pipe.xadd(stream, {"payload": payload})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    out["xadd_us"] = (cpu_seconds(r) - before) / entries * 1e6
    before = cpu_seconds(r)
    read: list[list[Any]] = []
    while True:
        batch = r.xreadgroup(group, "n1", {stream: ">"}, count=100)
        if not batch:
            break
        ids = [entry_id for entry_id, _ in batch[0][1]]
        read.append(ids)
    out["xreadgroup_us"] = (cpu_seconds(r) - before) / entries * 1e6
    before = cpu_seconds(r)
    for ids in read:
        r.xack(stream, group, *ids)
    out["xack_us"] = (cpu_seconds(r) - before) / entries * 1e6
    out["total_us"] = out["xadd_us"] + out["xreadgroup_us"] + out["xack_us"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, nothing recorded")
    args = p.parse_args()
    events, rooms, entries = (600, 30, 500) if args.smoke else (60_000, 600, 30_000)
    logdir = RESULTS / "runs" / f"shard-costs-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir.mkdir(parents=True, exist_ok=True)
    stores = [PrivateRedis(logdir) for _ in range(SHARDS)]
    try:
        for store in stores:
            store.start()
        clients = [redis.Redis(unix_socket_path=store.sock) for store in stores]
        spread = publish_spread(clients, events, rooms)
        ingress = ingress_cost(clients[0], entries)
        version = clients[0].info("server")["redis_version"]
    finally:
        for store in stores:
            store.stop()
    per_event = sum(spread["cpu_us_per_event"]) / SHARDS
    # The first Redis is the busiest: its 1/S of the rooms' events, plus every
    # event's ingress entry.  Events/s E with it at BUDGET of its core:
    # E * (per_event / S + ingress) = BUDGET.
    model = {str(s): BUDGET / ((per_event / s + ingress["total_us"]) / 1e6)
             for s in (1, 2, 3, 4, 8, 16)}
    result = {"shards": SHARDS, "publish": spread, "ingress_us_per_entry": ingress,
              "events_per_s_by_shards": model, "redis_version": version}
    print("events per shard: " + ", ".join(map(str, spread["events"])) +
          "; Redis CPU per event: " +
          ", ".join(f"{u:.1f} us" for u in spread["cpu_us_per_event"]) +
          "; share of the Redis CPU: " +
          ", ".join(f"{s:.2f}" for s in spread["share_of_redis_cpu"]))
    print(f"first Redis per ingress entry: XADD {ingress['xadd_us']:.1f} + XREADGROUP "
          f"{ingress['xreadgroup_us']:.1f} + XACK {ingress['xack_us']:.1f} = "
          f"{ingress['total_us']:.1f} us")
    print("events/s with the first Redis at 70% of its core, by shards: " +
          ", ".join(f"{s}: {v:,.0f}" for s, v in model.items()))
    if not args.smoke:
        (RESULTS / "shard-costs.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
