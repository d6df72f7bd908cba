"""Benchmark entry point.

    .venv/bin/python bench/run.py                 # full: 5 runs, all servers, all scenarios
    .venv/bin/python bench/run.py --smoke         # seconds-sized, 1 run, < 60 s
    .venv/bin/python bench/run.py --servers autobahn-ceiling,unrealon-redis \
        --scenarios rpc,fanout --runs 3

Servers are pinned to CPU 0, load clients and Redis to CPU 1. A server that
cannot start is recorded as "unavailable" and the run goes on. The exit code
is non-zero only when the harness itself is broken: an exception here, or
(in ``--smoke``) a failed case or check on one of our own peers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report
from harness import wait_quiet
from scenarios import BUSY_LIMIT, FULL, RUNNERS, SCENARIOS, SMOKE, Ctx, case
from servers import SERVERS, RunningServer, ServerUnavailable, make_token


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 run: checks the harness")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma list (default: all)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list (default: all)")
    ap.add_argument("--runs", type=int, default=None, help="repetitions (default 5, smoke 1)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="seconds to wait before each server start for other processes\n"
                         "to leave the CPUs idle (default 60, smoke 0)")
    args = ap.parse_args(argv)
    for kind, names, known in (("server", args.servers, SERVERS), ("scenario", args.scenarios, RUNNERS)):
        bad = [n for n in names.split(",") if n not in known]
        if bad:
            ap.error("unknown {} {}; known: {}".format(kind, bad, ", ".join(known)))
    return args


def log(msg: str) -> None:
    print("[bench {}] {}".format(time.strftime("%H:%M:%S"), msg), flush=True)


class Runner:
    """Drives runs x scenarios x servers and collects case dicts."""

    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.smoke = args.smoke
        self.servers = args.servers.split(",")
        self.scenarios = args.scenarios.split(",")
        self.runs = args.runs or (1 if args.smoke else 5)
        self.ctx = Ctx(sizes=SMOKE if args.smoke else FULL, logdir=logdir)
        self.token = make_token()
        self.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0 if args.smoke else 60)
        self.unavailable: dict[str, str] = {}
        self.results: list[dict[str, Any]] = []

    def _add(self, run: int, server: str, cases: list[dict[str, Any]]) -> None:
        for c in cases:
            c.update(run=run, server=server)
            self.results.append(c)
            flag = c["status"] if c["status"] != "ok" else ("ok, " + "; ".join(c["checks"])
                                                            if c["checks"] else "ok")
            log(f"  {server:<24} {c['scenario']:<16} {c['case']:<14} {flag} "
                f"{c.get('reason', '')[:160]}")

    async def _start(self, name: str) -> RunningServer | None:
        if name in self.unavailable:
            return None
        if self.quiet_wait > 0:
            await wait_quiet(self.quiet_wait, BUSY_LIMIT, log)
        srv = RunningServer(SERVERS[name], self.ctx.logdir, self.token)
        try:
            await srv.start()
            return srv
        except ServerUnavailable as exc:
            srv.stop()
            self.unavailable[name] = str(exc)
            log(f"  {name} unavailable: {str(exc)[:300]}")
            return None

    async def _scenario(self, run: int, name: str, scen: str, srv: RunningServer | None) -> None:
        spec = SERVERS[name]
        na = spec.na_reason(scen)
        if na:
            self._add(run, name, [case(scen, "-", {}, status="n/a", reason=na)])
            return
        if srv is None:
            self._add(run, name, [case(scen, "-", {}, status="unavailable",
                                       reason=self.unavailable.get(name, "not started"))])
            return
        t0 = time.monotonic()
        cases = await RUNNERS[scen](self.ctx, srv)
        log(f"  {name} {scen}: {time.monotonic() - t0:.1f}s")
        if not srv.alive():
            for c in cases:
                if c["status"] == "ok":
                    c["checks"].append("server died during the scenario")
            cases.append(case(scen, "-", {}, status="error", reason="server process died"))
        self._add(run, name, cases)

    async def run(self) -> None:
        for run in range(self.runs):
            log(f"run {run + 1}/{self.runs}")
            if self.smoke:
                # One start per server: starts dominate a seconds-long smoke run.
                for name in self.servers:
                    needed = [s for s in self.scenarios if not SERVERS[name].na_reason(s)]
                    srv = await self._start(name) if needed else None
                    try:
                        for scen in self.scenarios:
                            await self._scenario(run, name, scen, srv)
                            if srv is not None and not srv.alive():
                                self.unavailable[name] = f"died during {scen}"
                                srv.stop()
                                srv = None
                    finally:
                        if srv is not None:
                            srv.stop()
                continue
            # Full: a fresh server per scenario (RSS baselines, no carry-over),
            # servers interleaved within each scenario so drift hits all alike.
            for scen in self.scenarios:
                for name in self.servers:
                    srv = None if SERVERS[name].na_reason(scen) else await self._start(name)
                    try:
                        await self._scenario(run, name, scen, srv)
                    finally:
                        if srv is not None:
                            srv.stop()

    def harness_broken(self) -> list[str]:
        """Smoke verdict: every case on our own peers must be ok with no failed check."""
        bad = []
        for c in self.results:
            if not SERVERS[c["server"]].builtin or c["status"] == "n/a":
                continue
            about_machine = ("client-bound", "machine busy")
            if c["status"] != "ok" or [k for k in c["checks"] if not k.startswith(about_machine)]:
                bad.append("{} {}/{}: {} {} {}".format(c["server"], c["scenario"], c["case"],
                                                   c["status"], c["reason"], c["checks"]))
        return bad


def meta(args: argparse.Namespace, runner: Runner, started: float) -> dict[str, Any]:
    import importlib.metadata as md

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1), "smoke": args.smoke, "runs": runner.runs,
        "servers": runner.servers, "scenarios": runner.scenarios,
        "unavailable": runner.unavailable, "sizes": runner.ctx.sizes,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "server_cpu": 0, "client_cpu": 1},
        "versions": {p: ver(p) for p in ("autobahn", "twisted", "websockets", "picows", "uvloop",
                                         "redis", "unrealon-ws")},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = out / "runs" / (stamp + ("-smoke" if args.smoke else ""))
    logdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runner = Runner(args, logdir)
    try:
        asyncio.run(runner.run())
    except Exception:
        traceback.print_exc()
        log(f"harness error; logs in {logdir}")
        return 2
    m = meta(args, runner, started)
    (logdir / "raw.json").write_text(json.dumps({"meta": m, "results": runner.results}, indent=1))
    # A smoke report is a harness check, not a result: keep it with the
    # (git-ignored) run logs so it never lands beside the real results.
    paths = report.write(runner.results, m, logdir if args.smoke else out, smoke=args.smoke)
    log("wrote {} ({:.0f}s)".format(", ".join(str(p) for p in paths), time.time() - started))
    if args.smoke:
        bad = runner.harness_broken()
        if bad:
            log("SMOKE FAILED (harness or peers broken):\n  " + "\n  ".join(bad))
            return 1
        log("smoke ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
