"""PNG charts of the aggregated results (matplotlib, Agg backend: no display).

One figure per theme; each bar or point is a median over runs, with the
IQR as an error bar when there are enough runs. Servers keep one colour in
every chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def _med(row: dict[str, Any] | None, key: str) -> tuple[float | None, float]:
    m = (row or {}).get("metrics", {}).get(key) or {}
    return m.get("median"), (m.get("iqr") or 0.0) / 2


def _bars(ax: Any, rows: list[dict[str, Any]], scen: str, key: str, servers: list[str], title: str,
          ylabel: str, log: bool = False) -> bool:
    """Grouped bars: one group per case, one bar per server."""
    index = {(r["server"], r["case"]): r for r in rows if r["scenario"] == scen and r["status"] == "ok"}
    # Cases in the order they ran (sizes ascending), not alphabetical.
    cases = list(dict.fromkeys(c for (s, c) in index if key in index[(s, c)]["metrics"]))
    if not cases:
        return False
    width = 0.8 / max(1, len(servers))
    for i, s in enumerate(servers):
        xs, ys, es = [], [], []
        for j, c in enumerate(cases):
            v, e = _med(index.get((s, c)), key)
            if v is not None:
                xs.append(j + i * width - 0.4 + width / 2)
                ys.append(v)
                es.append(e)
        if xs:
            ax.bar(xs, ys, width, yerr=es, label=s, color=COLORS[i % len(COLORS)], capsize=2)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    return True


def _rpc_lines(ax: Any, rows: list[dict[str, Any]], servers: list[str], key: str, title: str, ylabel: str) -> bool:
    drawn = False
    for i, s in enumerate(servers):
        pts = sorted((r["params"].get("conns", 0), _med(r, key)) for r in rows
                     if r["server"] == s and r["scenario"] == "rpc" and r["status"] == "ok"
                     and r["case"].startswith("closed_"))
        pts = [(n, v) for n, v in pts if v[0] is not None]
        if pts:
            ax.errorbar([n for n, _ in pts], [v[0] for _, v in pts], yerr=[v[1] for _, v in pts],
                        marker="o", label=s, color=COLORS[i % len(COLORS)], capsize=2)
            drawn = True
    ax.set_xscale("log")
    ax.set_xlabel("connections (closed loop)", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    return drawn


def _save(fig: Any, axes: list[Any], drawn: list[bool], path: Path, out: list[Path]) -> None:
    if any(drawn):
        handles: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=False):
                handles.setdefault(lab, h)
                labels[lab] = lab
        fig.legend(list(handles.values()), list(labels), loc="lower center",
                   ncol=min(4, len(labels)), fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        fig.savefig(path, dpi=110)
        out.append(path)
    plt.close(fig)


def draw(rows: list[dict[str, Any]], meta: dict[str, Any], outdir: Path) -> list[Path]:
    """Write the chart PNGs into ``outdir``; return their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    servers = [s for s in meta["servers"] if any(r["server"] == s and r["status"] == "ok" for r in rows)]
    out: list[Path] = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    d = [_rpc_lines(axes[0], rows, servers, "rps", "RPC round-trips/s", "req/s"),
         _rpc_lines(axes[1], rows, servers, "p99_ms", "RPC p99 latency", "ms"),
         _rpc_lines(axes[2], rows, servers, "server_cpu_us_per_op", "Server CPU per RPC", "µs")]
    _save(fig, list(axes), d, outdir / "rpc.png", out)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    d = [_bars(axes[0], rows, "fanout", "deliveries_per_s", servers, "Fan-out deliveries/s", "msg/s"),
         _bars(axes[1], rows, "fanout", "p99_ms", servers, "Fan-out p99 delivery latency", "ms", log=True),
         _bars(axes[2], rows, "fanout", "server_cpu_us_per_op", servers, "Server CPU per delivery", "µs")]
    _save(fig, list(axes), d, outdir / "fanout.png", out)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    d = [_bars(axes[0], rows, "xadd_latency", "p99_ms", servers, "XADD → client p99", "ms", log=True),
         _bars(axes[1], rows, "ai_stream", "p99_ms", servers, "AI stream chunk p99", "ms", log=True),
         _bars(axes[2], rows, "reconnect_storm", "time_to_all_s", servers,
               "Reconnect storm: time to all recovered", "s")]
    _save(fig, list(axes), d, outdir / "events.png", out)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    d = [_bars(axes[0], rows, "idle_memory", "rss_per_conn_kib", servers, "RSS per idle connection", "KiB"),
         _bars(axes[1], rows, "connect_rate", "conns_per_s", servers, "Connect + auth rate", "conn/s"),
         _bars(axes[2], rows, "connect_rate", "server_cpu_us_per_op", servers, "Server CPU per connect", "µs")]
    _save(fig, list(axes), d, outdir / "connections.png", out)
    return out
