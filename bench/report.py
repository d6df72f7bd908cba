"""Aggregate repeated runs and write JSON, a markdown table and PNG charts.

Numbers are medians over runs with the inter-quartile range (IQR) when there
are at least four runs. Ratios compare the headline metric with the
Autobahn ceiling (the stack's best case) and with django-ipc (the incumbent).
A full run writes ``latest.*`` in ``--out``; ``--smoke`` writes ``smoke.*`` into
its git-ignored run directory, so it never overwrites real results.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from stats import med_iqr

CEILING = "autobahn-ceiling"
INCUMBENT = "django-ipc"
# The ceiling has no Redis ingress: XADD latency compares with the leanest
# server that has one.
REFERENCE = {"xadd_latency": "websockets-uvloop-redis"}
NONE = "\u2013"  # en dash: no value
TIMES = "\u00d7"

# scenario -> (columns to show, headline metric, True if higher is better)
COLUMNS: dict[str, tuple[list[tuple[str, str]], str, bool]] = {
    "rpc": ([("rps", "rps"), ("offered_rps", "offered/s"), ("achieved_rps", "achieved/s"), ("p50_ms", "p50 ms"),
             ("p99_ms", "p99 ms"), ("server_cpu_us_per_op", "srv CPU µs/op")], "rps", True),
    # open-loop rpc rows have no "rps": their ratios use p99 (see _headline)
    "fanout": ([("deliveries_per_s", "deliveries/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                ("missing", "missing"), ("server_cpu_us_per_op", "srv CPU µs/delivery")],
               "deliveries_per_s", True),
    "xadd_latency": ([("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"),
                      ("missing", "missing"), ("server_cpu_us_per_event", "srv CPU µs/event"),
                      ("redis_cpu_us_per_op", "redis CPU µs/delivery")], "p99_ms", False),
    "ai_stream": ([("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("completeness_pct", "complete %"),
                   ("out_of_order", "out of order"), ("chunks_per_event", "chunks/event"),
                   ("server_cpu_us_per_op", "srv CPU µs/chunk"),
                   ("redis_cpu_us_per_op", "redis CPU µs/chunk")],
                  "p99_ms", False),
    "idle_memory": ([("connected", "held"), ("alive_after_hold", "alive after hold"),
                     ("rss_per_conn_kib", "RSS KiB/conn"), ("kernel_tcp_kib_per_conn", "kernel KiB/conn"),
                     ("rss_after_mib", "RSS MiB"), ("idle_cpu_pct", "idle CPU %")],
                    "rss_per_conn_kib", False),
    "connect_rate": ([("conns_per_s", "conns/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                      ("server_cpu_us_per_op", "srv CPU µs/conn")], "conns_per_s", True),
    "reconnect_storm": ([("time_to_all_s", "all recovered s"), ("recovery_p50_ms", "p50 ms"),
                         ("recovery_p99_ms", "p99 ms"), ("complete", "complete"),
                         ("members", "members")], "time_to_all_s", False),
}


# Counts shown exactly: "19.0k" would hide one dropped connection of 19,000.
EXACT = {"connected", "alive_after_hold"}

_PCT = re.compile(r"(\d+)%")
_PER_RUN = ("machine busy", "client-bound")  # about the measurement, one per run


def _merge_notes(runs: list[dict[str, Any]]) -> list[str]:
    """Distinct notes; per-run measurement notes folded to "in k/n runs (up to X%)"."""
    out: list[str] = []
    for kind in _PER_RUN:
        pcts = [int(m.group(1)) for r in runs for c in r["checks"] if c.startswith(kind)
                for m in [_PCT.search(c)] if m]
        if pcts:
            out.append(f"{kind} in {len(pcts)}/{len(runs)} runs (up to {max(pcts)}%)")
    out += sorted({c for r in runs for c in r["checks"] if not c.startswith(_PER_RUN)})
    return out


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (server, scenario, case): medians over ok runs, merged notes."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["server"], r["scenario"], r["case"])].append(r)
    rows = []
    for (server, scen, name), runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        metrics: dict[str, Any] = {}
        if ok:
            keys = {k for r in ok for k, v in r["metrics"].items() if isinstance(v, (int, float))}
            metrics = {k: med_iqr([r["metrics"].get(k) for r in ok]) for k in sorted(keys)}
        checks = _merge_notes(runs)
        rows.append({"server": server, "scenario": scen, "case": name,
                     "status": "ok" if ok else runs[0]["status"],
                     "ok_runs": len(ok), "runs": len(runs),
                     "reason": "" if ok else runs[0].get("reason", ""),
                     "params": runs[0]["params"], "metrics": metrics, "checks": checks})
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return NONE
    a = abs(v)
    if float(v).is_integer() and a < 10000:
        return f"{v:.0f}"
    if a >= 100000:
        return f"{v / 1000:.0f}k"
    if a >= 10000:
        return "%.1fk" % (v / 1000)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _cell(m: dict[str, Any] | None, exact: bool = False) -> str:
    if not m or m.get("median") is None:
        return NONE
    v = m["median"]
    s = (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}") if exact else _fmt(v)
    if m.get("iqr") is not None:
        s += " ±" + _fmt(m["iqr"] / 2)
    return s


def _headline(row: dict[str, Any], key: str, higher: bool) -> tuple[str, bool]:
    """The row's headline metric: the scenario's, else p99 (open-loop rpc rows)."""
    if key in row["metrics"] or "p99_ms" not in row["metrics"]:
        return key, higher
    return "p99_ms", False


def _ratio(row: dict[str, Any], ref: dict[str, Any] | None, key: str, higher: bool) -> str:
    k, up = _headline(row, key, higher)
    a = row["metrics"].get(k, {}).get("median")
    b = ref["metrics"].get(k, {}).get("median") if ref else None
    if a is None or not b:
        return NONE
    return f"{a / b:.2f}{TIMES}" + ("" if k == key else " ({}{})".format(k, "↑" if up else "↓"))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as markdown tables, one per scenario."""
    out = ["# unrealon-ws benchmark results", "",
           "Started {}, {} run(s){}, server on CPU 0, clients + Redis on CPU 1. "
           "Cells: median over runs (± half the IQR when ≥ 4 runs). "
           "Ratios divide the headline metric by the reference server's (the Autobahn "
           "ceiling unless the header says otherwise) and by django-ipc's; the arrow "
           "says which way is better. Open-loop rpc rows run at a fraction of each "
           "server's own closed-loop saturation (c100), so their ratios compare "
           "latency at equal relative load.".format(meta["started"], meta["runs"],
                                              " (SMOKE sizes: not a measurement)" if meta["smoke"] else ""),
           ""]
    if meta.get("unavailable"):
        out += ["**Unavailable servers:**", ""]
        out += ["- `{}`: {}".format(k, v[:400].replace("\n", " ")) for k, v in meta["unavailable"].items()]
        out.append("")
    index = {(r["server"], r["scenario"], r["case"]): r for r in rows}
    order = {s: i for i, s in enumerate(meta["servers"])}
    for scen in meta["scenarios"]:
        cols, head, higher = COLUMNS[scen]
        # Cases in the order they ran (sizes ascending), servers as listed.
        case_order = {c: i for i, c in enumerate(dict.fromkeys(
            r["case"] for r in rows if r["scenario"] == scen))}
        srows = sorted((r for r in rows if r["scenario"] == scen),
                       key=lambda r: (r["case"] == "-", case_order[r["case"]],
                                      order.get(r["server"], 99)))
        if not srows:
            continue
        present = [c for c in cols if any(c[0] in r["metrics"] for r in srows)] or cols[:1]
        arrow = "↑" if higher else "↓"
        ref = REFERENCE.get(scen, CEILING)
        out += [f"## {scen}", "",
                "| case | server | " + " | ".join(t for _, t in present) +
                f" | {head} vs {ref} {arrow} | vs django-ipc | notes |",
                "|" + "---|" * (len(present) + 5)]
        for r in srows:
            if r["status"] != "ok":
                out.append("| {} | {} | {} | | | {}: {} |".format(
                    r["case"], r["server"], " | ".join("" for _ in present), r["status"],
                    r["reason"][:200].replace("|", "/").replace("\n", " ")))
                continue
            ceil = index.get((ref, scen, r["case"]))
            inc = index.get((INCUMBENT, scen, r["case"]))
            notes = "; ".join(r["checks"])[:300].replace("|", "/")
            if r["ok_runs"] < r["runs"]:
                notes = f"{r['ok_runs']}/{r['runs']} runs ok; " + notes
            out.append("| {} | {} | {} | {} | {} | {} |".format(
                r["case"], r["server"], " | ".join(_cell(r["metrics"].get(k), k in EXACT) for k, _ in present),
                _ratio(r, ceil, head, higher), _ratio(r, inc, head, higher), notes))
        out.append("")
    return "\n".join(out)


def write(results: list[dict[str, Any]], meta: dict[str, Any], outdir: Path, smoke: bool = False) -> list[Path]:
    """Write <prefix>.json, <prefix>.md and charts; return the paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    prefix = "smoke" if smoke else "latest"
    rows = aggregate(results)
    pj = outdir / (prefix + ".json")
    pj.write_text(json.dumps({"meta": meta, "summary": rows, "raw": results}, indent=1,
                             default=str))
    pm = outdir / (prefix + ".md")
    pm.write_text(markdown(rows, meta))
    paths = [pj, pm]
    try:
        import charts

        paths += charts.draw(rows, meta, outdir / (prefix + "-charts"))
    except Exception as exc:  # charts are a convenience; tables are the result
        print(f"charts skipped: {type(exc).__name__}: {exc}")
    return paths
