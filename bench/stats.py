"""Latency histogram and small statistics helpers shared by client and harness.

The load client records hundreds of thousands of latencies per second, so it
cannot keep raw samples (and cannot ship them over a pipe between processes).
It keeps a log-bucketed histogram instead: bucket ``i`` covers microsecond
values whose ``log(v + 1) * SCALE`` truncates to ``i``, i.e. about 2 % relative
width. Histograms from several client processes merge by adding counts, which
is how the 10k fan-out (two receiver processes) gets one p50/p99.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import median, quantiles
from typing import Any

SCALE = 50.0  # buckets per e-fold: exp(1/50) = 1.0202, ~2 % resolution
NBUCKETS = 1200  # exp(1200/50) - 1 us = 2.6e10 us (7 h): never clamped in practice


class Hist:
    """Log-bucketed histogram of latencies in microseconds (exact n/min/max/sum)."""

    __slots__ = ("counts", "n", "total", "vmax", "vmin")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * NBUCKETS
        self.n = 0
        self.total = 0.0
        self.vmin = math.inf
        self.vmax = 0.0

    def clear(self) -> None:
        """Forget every sample (start of a measured window)."""
        self.__init__()  # type: ignore[misc]

    def add(self, us: float) -> None:
        """Record one latency (microseconds; negative clock skew clamps to 0)."""
        if us < 0.0:
            us = 0.0
        i = int(math.log(us + 1.0) * SCALE)
        self.counts[i if i < NBUCKETS else NBUCKETS - 1] += 1
        self.n += 1
        self.total += us
        if us < self.vmin:
            self.vmin = us
        if us > self.vmax:
            self.vmax = us

    def merge(self, other: "Hist") -> None:
        """Add another histogram's samples into this one."""
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.n += other.n
        self.total += other.total
        self.vmin = min(self.vmin, other.vmin)
        self.vmax = max(self.vmax, other.vmax)

    def percentile(self, p: float) -> float | None:
        """Value (us) at percentile ``p`` in [0, 100], bucket midpoint; None if empty."""
        if self.n == 0:
            return None
        rank = max(1, math.ceil(self.n * p / 100.0))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                mid = math.exp((i + 0.5) / SCALE) - 1.0
                # The bucket midpoint may fall outside the exact extremes.
                return min(max(mid, self.vmin), self.vmax)
        return self.vmax

    def summary_ms(self) -> dict[str, float | None]:
        """p50/p90/p99/max/mean in milliseconds, rounded for the report."""
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v / 1000.0, 3)
        return {
            "n": self.n,
            "p50_ms": ms(self.percentile(50)),
            "p90_ms": ms(self.percentile(90)),
            "p99_ms": ms(self.percentile(99)),
            "max_ms": ms(self.vmax if self.n else None),
            "mean_ms": ms(self.total / self.n if self.n else None),
        }

    def to_dict(self) -> dict[str, Any]:
        """Compact form for JSON: only non-empty buckets."""
        return {
            "b": {str(i): c for i, c in enumerate(self.counts) if c},
            "n": self.n,
            "sum": self.total,
            "min": self.vmin if self.n else 0.0,
            "max": self.vmax,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hist":
        """Inverse of :meth:`to_dict`."""
        h = cls()
        for k, c in d.get("b", {}).items():
            h.counts[int(k)] = int(c)
        h.n = int(d.get("n", 0))
        h.total = float(d.get("sum", 0.0))
        h.vmin = float(d.get("min", 0.0)) if h.n else math.inf
        h.vmax = float(d.get("max", 0.0))
        return h


def merged(hists: Iterable[dict[str, Any]]) -> Hist:
    """Merge serialized histograms from several client processes."""
    out = Hist()
    for d in hists:
        out.merge(Hist.from_dict(d))
    return out


def med_iqr(values: list[float | None]) -> dict[str, float | None]:
    """Median and inter-quartile range of repeated-run values (None-safe)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"median": None, "iqr": None, "n": 0}
    if len(vals) < 4:
        return {"median": median(vals), "iqr": None, "n": len(vals)}
    q1, _, q3 = quantiles(vals, n=4, method="inclusive")
    return {"median": median(vals), "iqr": q3 - q1, "n": len(vals)}
