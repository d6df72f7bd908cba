"""The README's benchmark summary, printed from a results file (never typed by hand).

    .venv/bin/python bench/summary.py [bench/results/latest.json]

One row per headline scenario, one column per server, every cell the median
over runs; our columns add the ratio against the Autobahn ceiling (or, for
the Redis ingress rows, against websockets+uvloop on the same ingress) and
against django-ipc.  Paste the output under "Benchmarks" in README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from report import TIMES, _fmt

OURS = ("unrealon-memory", "unrealon-redis")
COLUMNS = ("unrealon-memory", "unrealon-redis", "autobahn-ceiling", "websockets-uvloop",
           "django-ipc")
TITLES = ("unrealon (memory)", "unrealon (Redis)", "Autobahn ceiling", "websockets+uvloop",
          "django-ipc 1.0.9")

# (row title, scenario, case, headline metric, higher is better, extra metric, reference)
ROWS: list[tuple[str, str, str, str, bool, str | None, str]] = [
    ("RPC round-trips/s, 100 conns (server CPU µs/call)", "rpc", "closed_c100", "rps", True,
     "server_cpu_us_per_op", "autobahn-ceiling"),
    ("RPC round-trips/s, 1,000 conns", "rpc", "closed_c1000", "rps", True, None,
     "autobahn-ceiling"),
    ("fan-out to 1,000 members, deliveries/s (µs/delivery)", "fanout", "m1000_r100",
     "deliveries_per_s", True, "server_cpu_us_per_op", "autobahn-ceiling"),
    ("fan-out to 1,000 members, delivery p99 ms", "fanout", "m1000_r100", "p99_ms", False, None,
     "autobahn-ceiling"),
    ("fan-out to 10,000 members, deliveries/s", "fanout", "m10000_r5", "deliveries_per_s", True,
     None, "autobahn-ceiling"),
    ("backend XADD → client, 1,000 events/s over 100 rooms: p99 ms (p50, max)", "xadd_latency",
     "r100_1000eps", "p99_ms", False, "p50_ms,max_ms", "websockets-uvloop-redis"),
    ("AI streaming, 50 sessions x 50 chunks/s: p99 ms (p50)", "ai_stream", "s50_c50", "p99_ms",
     False, "p50_ms", "autobahn-ceiling"),
    ("idle memory per connection, 10,000 conns (KiB)", "idle_memory", "n10000",
     "rss_per_conn_kib", False, None, "autobahn-ceiling"),
    ("idle memory per connection, 19,000 conns in one process (KiB)", "idle_memory", "n19000",
     "rss_per_conn_kib", False, None, "autobahn-ceiling"),
    ("connect + auth, conns/s at concurrency 200", "connect_rate", "n3000_c200", "conns_per_s",
     True, None, "autobahn-ceiling"),
    ("reconnect storm, 1,000 clients rejoin with cursors: s until all recovered",
     "reconnect_storm", "n1000", "time_to_all_s", False, None, "autobahn-ceiling"),
]

# the Redis-ingress rows compare with the peer reading the same ingress
INGRESS_PEER = {"xadd_latency": "websockets-uvloop-redis"}


def _median(summary: dict[tuple[str, str, str], dict[str, Any]], server: str, scenario: str,
            case: str, metric: str) -> float | None:
    row = summary.get((server, scenario, case))
    if row is None or row.get("status") != "ok":
        return None
    value = row["metrics"].get(metric)
    return None if value is None else value["median"]


def table(results: dict[str, Any]) -> str:
    summary = {(r["server"], r["scenario"], r["case"]): r for r in results["summary"]}
    lines = ["| scenario | " + " | ".join(TITLES) + " |", "|---" * (len(TITLES) + 1) + "|"]
    for title, scenario, case, metric, higher, extra, reference in ROWS:
        cells = []
        for server in COLUMNS:
            if server == "websockets-uvloop" and scenario in INGRESS_PEER:
                server = INGRESS_PEER[scenario]
            value = _median(summary, server, scenario, case, metric)
            if value is None:
                cells.append("n/a")
                continue
            cell = _fmt(value)
            if extra:
                extras = [_median(summary, server, scenario, case, m) for m in extra.split(",")]
                cell += " (" + ", ".join(_fmt(v) for v in extras) + ")"
            if server in OURS:
                ratios = []
                for ref in (reference, "django-ipc"):
                    base = _median(summary, ref, scenario, case, metric)
                    if base:
                        ratio = value / base if higher else base / value
                        ratios.append(f"{ratio:.2f}{TIMES}")
                if ratios:
                    cell = f"{cell} = **{ratios[0]}**" + (f", {ratios[1]}" if len(ratios) > 1 else "")
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    meta = results["meta"]
    return (f"Medians of {meta['runs']} runs started {meta['started']}. Ratios: ours against the "
            "reference (bold: the Autobahn ceiling; websockets+uvloop on the same Redis ingress "
            "for XADD → client) and against django-ipc, oriented so that > 1 means we are "
            "better.\n\n" + "\n".join(lines))


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results/latest.json")
    print(table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
