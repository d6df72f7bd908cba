"""
Redis memory per streamed AI answer, against the same chunks as ordinary events.

    .venv/bin/python bench/ai_history_memory.py [--runs 3] [--history-sizes 1000,50000] [--smoke]

A private ``redis-server`` (never the machine's shared one: unix socket and
a random loopback port, no persistence; ``servers.PrivateRedis``) and a real
node (``twist unrealon-ws``, Redis engine, as ``bench/run.py`` starts it) per
case. The answers are published exactly as a backend does (PROTOCOL.md
section 6, the layout of ``unrealon_backend.Publisher``): one XADD to
``stream:requests`` per chunk, ``MAXLEN ~ 100000``, pipelined. Two ways:

- ``streamed``: ``session.message`` with ``seq`` 0, 1, ... and ``done`` on
  the last chunk: the node runs one CHUNK script per chunk (section 5.1; the
  message's state, text, delivery index and held-chunks keys, one history
  entry per message);
- ``ordinary``: the same data through the backend ``publish`` method
  (``broker.publish``): one history entry per chunk, trimmed to the history
  size, and an idempotency key per ingress entry (kept a day).

Workloads: ``tiny``, 20 answers of 2,000 chunks of 4 bytes in one session
(a conversation); ``realistic``, 5 answers of 2,000 tokens of English-like
text and code (~4.1 bytes a token) with uuid ids (per-answer figures: one
answer alone would be within reach of used_memory's noise). Each case on a
fresh Redis and node, with ``UNREALON_HISTORY_SIZE`` set per case: streamed
at the first size (its history holds one entry per answer, so the size does
not matter above the answer count), ordinary at each (the default 1000, and
one that holds every chunk as an ordinary event).

Reported per answer: ``retained`` = INFO ``used_memory`` after, minus before,
once the ingress stream and the cluster feed are trimmed (both are bounded
cluster-wide, at ~100,000 entries, and hold every chunk either way), and the
``MEMORY USAGE ... SAMPLES 0`` of the keys by kind (message keys, the room's
history stream, the streaming set, idempotency keys); the feed's and the
ingress' bytes per chunk apart; the node's and Redis' CPU per chunk and the
script's time per call (a closed-loop burst with no WebSocket member: not a
latency, and not the paced cost, which ``ai_stream`` measures). Results:
``bench/results/ai-history-memory.json`` (``--smoke``: the run directory).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis
from servers import SERVERS, RunningServer, cpu_seconds, make_token

HERE = Path(__file__).resolve().parent
INGRESS = "stream:requests"
GROUP = "rpc_group"
FEED = "unrealon:feed"
INGRESS_MAXLEN = 100_000  # unrealon_backend.Publisher's default
PIPELINE = 500  # XADDs per round trip
WORDS = ("the", "a", "server", "client", "message", "stream", "is", "of", "to", "and", "in",
         "chunk", "answer", "Redis", "node", "room", "we", "can", "this", "that", "returns",
         "history", "each", "one", "per", "with", "for", "when", "it", "order", "delivered")
CODE = ("def", " handler", "(", "request", "):", "\n", "    ", "return", " {", "\"ok\"", ":",
        " True", "}", "\n\n", "```", "python", "self", ".", "redis", "await")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    answers: int
    chunks: int  # per answer
    realistic: bool


def tokens(n: int, seed: int) -> list[str]:
    """``n`` tokens as a model streams them: words with their space, punctuation, code."""
    rnd = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        if rnd.random() < 0.15:  # a run of code tokens
            out.extend(rnd.choice(CODE) for _ in range(rnd.randint(3, 12)))
        else:
            w = rnd.choice(WORDS)
            out.append((" " if out else "") + w)
            if rnd.random() < 0.1:
                out.append(rnd.choice((".", ",", ":", "\n")))
    return out[:n]


def answers(w: Workload) -> tuple[str, list[tuple[str, list[str]]]]:
    """The session id and [(message id, [chunk text, ...]), ...] of a workload."""
    if not w.realistic:
        return "s1", [(f"m-{i}", ["tok "] * w.chunks) for i in range(w.answers)]
    rnd = random.Random(7)
    sid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
    return sid, [(str(uuid.UUID(int=rnd.getrandbits(128), version=4)), tokens(w.chunks, i))
                 for i in range(w.answers)]


def payload(mode: str, sid: str, mid: str, seq: int, text: str, done: bool) -> str:
    data = {"session_id": sid, "message_id": mid, "role": "assistant", "content": text,
            "seq": seq, "done": done}
    if mode == "streamed":
        body: dict[str, Any] = {"method": "session.message", "params": data}
    else:
        body = {"method": "publish",
                "params": {"room": f"session:{sid}", "event": "session.message", "data": data}}
    return json.dumps(body, separators=(",", ":"))


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def group_done(r: redis.Redis, total: int) -> bool:
    """Every ingress entry read and acknowledged by the node."""
    for g in r.xinfo_groups(INGRESS):
        if g["name"] in (GROUP, GROUP.encode()):
            read = g.get("entries-read")
            return g["pending"] == 0 and (read is None or read >= total) and g.get("lag", 0) == 0
    return False


def usage_by_kind(r: redis.Redis) -> dict[str, dict[str, int]]:
    """MEMORY USAGE (SAMPLES 0: exact for streams) of every key, summed by kind."""
    kinds = {"unrealon:m:s:": "message state", "unrealon:m:t:": "message text",
             "unrealon:m:i:": "message index", "unrealon:m:h:": "held chunks",
             "unrealon:m:held": "held zset", "unrealon:ms:": "streaming set",
             "unrealon:h:": "history", "unrealon:e:": "epoch", "unrealon:idem:": "idempotency"}
    exact = {FEED: "feed", INGRESS: "ingress"}
    keys = list(r.scan_iter(count=1000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    sizes = pipe.execute()
    out: dict[str, dict[str, int]] = {}
    for k, size in zip(keys, sizes, strict=True):
        name = k.decode()
        kind = exact.get(name) or next((v for p, v in kinds.items() if name.startswith(p)),
                                       "other")
        row = out.setdefault(kind, {"keys": 0, "bytes": 0})
        row["keys"] += 1
        row["bytes"] += int(size or 0)
    return out


#: a fresh node's first presence sweep (~3 s after start) moves used_memory
#: by ~70 KB once; after it the idle baseline holds within ~1 KB
SETTLE_S = 3.5


async def one_case(w: Workload, mode: str, history: int, logdir: Path,
                   settle_s: float) -> dict[str, Any]:
    """Fresh Redis + node; publish the workload one way; measure."""
    base = SERVERS["unrealon-redis"]

    def env(p: Any) -> dict[str, str]:
        return {**base.env(p), "UNREALON_HISTORY_SIZE": str(history)}
    srv = RunningServer(dataclasses.replace(base, env=env), logdir, make_token())
    await srv.start()
    try:
        assert srv.redis is not None and srv.proc is not None
        r = redis.Redis(unix_socket_path=srv.redis.sock)
        sid, msgs = answers(w)
        total = sum(len(c) for _, c in msgs)
        time.sleep(settle_s)
        before = used_memory(r)
        node0, redis0 = cpu_seconds(srv.proc.pid), cpu_seconds(srv.redis.pid or -1)
        r.config_resetstat()
        t0 = time.monotonic()
        pipe = r.pipeline(transaction=False)
        n = 0
        for mid, chunks in msgs:
            for seq, text in enumerate(chunks):
                pipe.xadd(INGRESS, {"payload": payload(mode, sid, mid, seq, text,
                                                       seq == len(chunks) - 1)},
                          maxlen=INGRESS_MAXLEN, approximate=True)
                n += 1
                if n % PIPELINE == 0:
                    pipe.execute()
        pipe.execute()
        deadline = time.monotonic() + 30 + total / 500
        while not group_done(r, total):
            if time.monotonic() > deadline or not srv.alive():
                raise RuntimeError(f"{mode} {w.name}: the node did not handle {total} entries")
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        node_cpu = (cpu_seconds(srv.proc.pid) or 0) - (node0 or 0)
        redis_cpu = (cpu_seconds(srv.redis.pid or -1) or 0) - (redis0 or 0)
        stats = r.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {})
        after = used_memory(r)
        kinds = usage_by_kind(r)
        # the ingress and the feed hold every chunk either way, bounded at
        # ~100,000 entries cluster-wide: what an answer keeps is what remains
        r.xtrim(INGRESS, maxlen=0, approximate=False)
        r.xtrim(FEED, maxlen=0, approximate=False)
        time.sleep(0.2)
        retained = used_memory(r)
        if mode == "streamed":
            states = [r.hget(f"unrealon:m:s:{{session:{sid}}}|{mid}", "done") for mid, _ in msgs]
            if states != [b"1"] * len(msgs):
                raise RuntimeError(f"streamed {w.name}: not every answer done: {states}")
        hist_len = r.xlen(f"unrealon:h:session:{sid}")
        version = r.info("server")["redis_version"]
    finally:
        srv.stop()
    # "other": the node's own keys (presence, lifecycle events), there before too
    kept = {k: v for k, v in kinds.items() if k not in ("feed", "ingress", "other")}
    per = max(1, w.answers)
    return {
        "workload": w.name, "mode": mode, "history_size": history, "answers": w.answers,
        "redis_version": version,
        "chunks_per_answer": w.chunks, "chunks": total,
        "text_bytes_per_answer": sum(len(t.encode()) for t in msgs[0][1]),
        "used_memory_delta": after - before, "retained_delta": retained - before,
        "retained_bytes_per_answer": (retained - before) / per,
        "keys_bytes_per_answer": sum(v["bytes"] for v in kept.values()) / per,
        "by_kind": kinds, "history_entries": hist_len,
        "feed_bytes_per_chunk": kinds.get("feed", {}).get("bytes", 0) / total,
        "ingress_bytes_per_chunk": kinds.get("ingress", {}).get("bytes", 0) / total,
        "handle_s": elapsed, "chunks_per_s": total / elapsed if elapsed else None,
        "node_cpu_us_per_chunk": node_cpu * 1e6 / total,
        "redis_cpu_us_per_chunk": redis_cpu * 1e6 / total,
        "evalsha_calls": evalsha.get("calls"), "evalsha_usec_per_call": evalsha.get("usec_per_call"),
    }


def kib(x: float) -> str:
    return f"{x / 1024:,.1f} KiB" if abs(x) >= 1024 else f"{x:,.0f} B"


GROUPS = {"message keys": ("message state", "message text", "message index", "held chunks",
                           "held zset", "streaming set"),
          "history": ("history", "epoch"), "idempotency": ("idempotency",)}


def grouped(row: dict[str, Any], group: str) -> float:
    """Bytes per answer of one group of key kinds (MEMORY USAGE)."""
    kinds = row["by_kind"]
    return sum(kinds.get(k, {}).get("bytes", 0) for k in GROUPS[group]) / max(1, row["answers"])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (and min, max) over runs of every case."""
    out = []
    keys = dict.fromkeys((r["workload"], r["mode"], r["history_size"]) for r in rows)
    for wl, mode, hs in keys:
        runs = [r for r in rows if (r["workload"], r["mode"], r["history_size"]) == (wl, mode, hs)]
        first = runs[0]
        m: dict[str, Any] = {k: first[k] for k in ("workload", "mode", "history_size", "answers",
                                                  "chunks_per_answer", "text_bytes_per_answer",
                                                  "history_entries")}
        m["runs"] = len(runs)
        metrics = {"retained_bytes_per_answer": [r["retained_bytes_per_answer"] for r in runs],
                   "keys_bytes_per_answer": [r["keys_bytes_per_answer"] for r in runs],
                   "feed_bytes_per_chunk": [r["feed_bytes_per_chunk"] for r in runs],
                   "node_cpu_us_per_chunk": [r["node_cpu_us_per_chunk"] for r in runs],
                   "redis_cpu_us_per_chunk": [r["redis_cpu_us_per_chunk"] for r in runs],
                   "evalsha_usec_per_call": [r["evalsha_usec_per_call"] or 0 for r in runs],
                   "chunks_per_s": [r["chunks_per_s"] or 0 for r in runs]}
        for g in GROUPS:
            metrics[g.replace(" ", "_") + "_bytes_per_answer"] = [grouped(r, g) for r in runs]
        for k, v in metrics.items():
            m[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
        out.append(m)
    return out


def _cell(v: dict[str, float], fmt: Any = kib) -> str:
    if v["max"] == v["min"]:
        return fmt(v["median"])
    return f"{fmt(v['median'])} ({fmt(v['min'])}-{fmt(v['max'])})"


def table(summary: list[dict[str, Any]]) -> str:
    def us(x: float) -> str:
        return f"{x:.0f}"
    lines = ["| workload | way | history size | history entries | retained / answer (used_memory) "
             "| keys / answer (MEMORY USAGE) | of which message keys | history | idempotency "
             "| feed B/chunk | node CPU µs/chunk | Redis CPU µs/chunk | script µs/call |",
             "|---" * 13 + "|"]
    for r in summary:
        lines.append(
            f"| {r['workload']} ({r['answers']} x {r['chunks_per_answer']}, "
            f"{kib(r['text_bytes_per_answer'])} of text each) | {r['mode']} | {r['history_size']} "
            f"| {r['history_entries']} | {_cell(r['retained_bytes_per_answer'])} "
            f"| {_cell(r['keys_bytes_per_answer'])} "
            f"| {kib(r['message_keys_bytes_per_answer']['median'])} "
            f"| {kib(r['history_bytes_per_answer']['median'])} "
            f"| {kib(r['idempotency_bytes_per_answer']['median'])} "
            f"| {r['feed_bytes_per_chunk']['median']:.0f} "
            f"| {_cell(r['node_cpu_us_per_chunk'], us)} | {_cell(r['redis_cpu_us_per_chunk'], us)} "
            f"| {_cell(r['evalsha_usec_per_call'], lambda x: f'{x:.1f}')} |")
    return "\n".join(lines)


def ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Retained bytes per answer, ordinary over streamed (> 1: streamed keeps less)."""
    out = []
    for s in (x for x in summary if x["mode"] == "streamed"):
        for o in (x for x in summary if x["mode"] == "ordinary" and x["workload"] == s["workload"]):
            sb, ob = s["retained_bytes_per_answer"]["median"], o["retained_bytes_per_answer"]["median"]
            out.append({"workload": s["workload"], "ordinary_history_size": o["history_size"],
                        "streamed_bytes": sb, "ordinary_bytes": ob,
                        "ordinary_over_streamed": ob / sb if sb > 0 else None})
    return out


def cases(workloads: list[Workload], sizes: list[int]) -> list[tuple[Workload, str, int]]:
    """Streamed at the first history size (its history holds one entry per
    answer, so the size does not matter below it); ordinary at every size."""
    out = []
    for w in workloads:
        out.append((w, "streamed", sizes[0]))
        out.extend((w, "ordinary", h) for h in sizes)
    return out


async def amain(args: argparse.Namespace) -> int:
    if args.smoke:
        workloads = [Workload("tiny", 2, 50, False), Workload("realistic", 1, 100, True)]
        sizes, runs, settle = [1000], 1, 0.2
    else:
        workloads = [Workload("tiny", args.answers, args.chunks, False),
                     Workload("realistic", args.realistic_answers, args.tokens, True)]
        sizes, runs, settle = [int(x) for x in args.history_sizes.split(",")], args.runs, SETTLE_S
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = HERE / "results" / "runs" / f"{stamp}-ai-memory{'-smoke' if args.smoke else ''}"
    logdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    for run in range(runs):
        for w, mode, history in cases(workloads, sizes):
            t0 = time.monotonic()
            row = await one_case(w, mode, history, logdir, settle)
            row["run"] = run
            rows.append(row)
            print(f"[ai-memory] run {run + 1}/{runs} {w.name:<9} {mode:<8} history {history:<6} "
                  f"retained {kib(row['retained_bytes_per_answer'])}/answer, "
                  f"keys {kib(row['keys_bytes_per_answer'])}/answer, "
                  f"{row['chunks_per_s']:.0f} chunks/s, node {row['node_cpu_us_per_chunk']:.0f} "
                  f"µs/chunk ({time.monotonic() - t0:.1f}s)", flush=True)
    summary = summarize(rows)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "duration_s": round(time.time() - started, 1), "smoke": args.smoke, "runs": runs,
            "redis_server": rows[0]["redis_version"] if rows else None, "history_sizes": sizes,
            "workloads": [dataclasses.asdict(w) for w in workloads]}
    out: dict[str, Any] = {"meta": meta, "summary": summary, "ratios": ratios(summary),
                           "rows": rows}
    dest = logdir if args.smoke else Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "ai-history-memory.json").write_text(json.dumps(out, indent=1))
    text = table(summary)
    md = (f"# Redis memory per streamed answer\n\nStarted {meta['started']}, {runs} run(s) "
          f"({meta['duration_s']:.0f} s), `bench/ai_history_memory.py`, redis-server "
          f"{meta['redis_server']}. Cells: median (min-max over runs).\n\n{text}\n\n"
          + "\n".join(f"- {r['workload']}: ordinary events at history size "
                      f"{r['ordinary_history_size']} keep {r['ordinary_over_streamed']:.1f}x "
                      "the bytes of the streamed answer" for r in out["ratios"]
                      if r["ordinary_over_streamed"]) + "\n")
    (dest / "ai-history-memory.md").write_text(md)
    print(text)
    if args.smoke:
        print("[ai-memory] smoke: no settle before the baseline, so used_memory deltas are noise")
    print(f"[ai-memory] wrote {dest / 'ai-history-memory.json'} ({time.time() - started:.0f}s)")
    if args.smoke:
        # a check of the script, never of speed or size: every answer was
        # handled (streamed: every message done), and its keys were measured
        bad = [f"{r['workload']} {r['mode']}" for r in rows
               if r["keys_bytes_per_answer"] <= 0 or not r["history_entries"]
               or (r["mode"] == "streamed" and r["history_entries"] != r["answers"])]
        if bad:
            print(f"[ai-memory] SMOKE FAILED: {bad}")
            return 1
        print("[ai-memory] smoke ok")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the script")
    ap.add_argument("--runs", type=int, default=1, help="repetitions of every case (medians)")
    ap.add_argument("--answers", type=int, default=20, help="answers of the tiny workload")
    ap.add_argument("--chunks", type=int, default=2000, help="chunks per tiny answer")
    ap.add_argument("--realistic-answers", type=int, default=5,
                    help="answers of the realistic workload (per-answer figures: a single one "
                         "would sit in used_memory's ~1 KB noise)")
    ap.add_argument("--tokens", type=int, default=2000, help="tokens per realistic answer")
    ap.add_argument("--history-sizes", default="1000,50000",
                    help="UNREALON_HISTORY_SIZE: streamed at the first, ordinary at each")
    ap.add_argument("--out", default=str(HERE / "results"))
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
