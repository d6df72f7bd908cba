"""
A browser's call to a backend method, two ways, side by side in one run
(issue 15): round-trip p50/p99 and throughput at N concurrent callers.

    .venv/bin/python bench/backend_rpc.py [--callers 100] [--seconds 10] [--runs 3] [--smoke]

1. through unrealon-ws: each caller holds one WebSocket to a node (Redis
   engine) and calls ``bench.echo`` again as soon as the last reply came;
   the node appends the call to ``stream:backend``, a worker of the backend
   package (``python -m unrealon_backend worker``, sync handler in its
   thread pool) runs it and appends the result to the node's reply stream;
2. direct: the same handler as a Django view under gunicorn (``gthread``,
   one process, 32 threads), each caller on one keep-alive HTTP connection.

Server-side processes (node and worker; gunicorn) are pinned to CPU 0, the
load client and Redis to CPU 1 (bench/README.md), so both paths get the
same CPU.  Server CPU per call is read from /proc.  What it leaves out: the
HTTP path does no authentication per request (the WebSocket authenticated
once), so it is the cheapest a Django view gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "bench-backend-secret-0123456789abcdef0123456789"
TEXT = "def handler(request):  # a line of code the IDE sends"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children still running (gunicorn's workers)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_port(port: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Processes:
    """Processes of one run, each stopped by its pid at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- the load --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measure(callers: list[Any], seconds: float, warmup: float) -> list[float]:
    """Run every caller's loop; keep the latencies after the warm-up, for C{seconds}."""
    latencies: list[float] = []
    start = time.perf_counter()
    keep_from, stop_at = start + warmup, start + warmup + seconds

    async def loop(call: Any) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call()
            if t0 >= keep_from:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(loop(c) for c in callers))
    return latencies


async def ws_callers(port: int, n: int) -> tuple[list[Any], list[Any]]:
    from websockets.asyncio.client import connect

    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600, "methods": ["bench.*"]},
                       SECRET, algorithm="HS256")
    sockets = [await connect(f"ws://127.0.0.1:{port}/ws?token={token}", max_size=None,
                             compression=None) for _ in range(n)]
    # the method is callable once a worker's declaration reached the node (within 2 s)
    for _ in range(100):
        await sockets[0].send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "rpc.discover"}))
        doc = json.loads(await sockets[0].recv())
        if any(m["name"] == "bench.echo" for m in doc["result"]["methods"]):
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("bench.echo never became callable")
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "bench.echo",
                          "params": {"text": TEXT}})

    def caller(ws: Any) -> Any:
        async def call() -> None:
            await ws.send(request)
            reply = json.loads(await ws.recv())
            if "result" not in reply:
                raise RuntimeError(f"bench.echo failed: {reply}")
        return call

    return [caller(ws) for ws in sockets], sockets


async def http_callers(port: int, n: int) -> tuple[list[Any], list[Any]]:
    body = json.dumps({"text": TEXT}).encode()
    request = (b"POST /rpc/bench.echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]

    def caller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        async def call() -> None:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            reply = json.loads(await reader.readexactly(length))
            if not head.startswith(b"HTTP/1.1 200") or "result" not in reply:
                raise RuntimeError(f"the view failed: {head[:40]!r}")
        return call

    return [caller(r, w) for r, w in conns], [w for _, w in conns]


# -- the two paths -----------------------------------------------------------------------


def run_unrealon(procs: Processes, args: argparse.Namespace) -> dict[str, Any]:
    sock = procs.work / "redis.sock"
    procs.start("redis", pinned("1", ["redis-server", "--port", "0", "--unixsocket", str(sock),
                                      "--save", "", "--appendonly", "no"]))
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    url = f"unix://{sock}"
    port = free_port()
    env = {**os.environ, "JWT_SECRET": SECRET, "REDIS_URL": url, "UNREALON_LOG_LEVEL": "warn",
           "UNREALON_RATE_LIMIT": "1000000", "UNREALON_NODE_ID": "bench-node"}
    profile = ([sys.executable, "-m", "cProfile", "-o", args.profile_node]
               if args.profile_node else [])
    node = procs.start("node", pinned("0", [*profile, str(ROOT / ".venv/bin/twist"), "unrealon-ws",
                                            "--ws", f"tcp:{port}:interface=127.0.0.1",
                                            "--http", "tcp:0:interface=127.0.0.1"]),
                       env=env, cwd=procs.work)
    wprofile = (["-m", "cProfile", "-o", args.profile_worker] if args.profile_worker else [])
    worker = procs.start("worker", pinned("0", [
        sys.executable, *wprofile, "-m", "unrealon_backend", "worker", "--redis", url,
        "--handlers", "backend_handlers", "--concurrency", "32"]),
        env={**os.environ, "PYTHONPATH": str(HERE)}, cwd=HERE)
    wait_port(port)

    async def go() -> dict[str, Any]:
        callers, sockets = await ws_callers(port, args.callers)
        node0, worker0 = cpu_seconds(node.pid), cpu_seconds(worker.pid)
        t0 = time.perf_counter()
        latencies = await measure(callers, args.seconds, args.warmup)
        wall = time.perf_counter() - t0
        node_cpu = cpu_seconds(node.pid) - node0
        worker_cpu = cpu_seconds(worker.pid) - worker0
        for ws in sockets:
            await ws.close()
        result = summary(latencies, node_cpu + worker_cpu, wall, args)
        # the split: what the node costs, and what the backend package's worker does
        result["node_cpu_us_per_call"] = result["server_cpu_us_per_call"] * node_cpu / max(
            1e-9, node_cpu + worker_cpu)
        return result

    return asyncio.run(go())


def run_django(procs: Processes, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    gunicorn = procs.start("gunicorn", pinned("0", [
        str(ROOT / ".venv/bin/gunicorn"), "-k", "gthread", "--threads", "32", "-w", "1",
        "--bind", f"127.0.0.1:{port}", "--keep-alive", "60", "--log-level", "warning",
        "django_echo:application"]), cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)})
    wait_port(port)

    async def go() -> dict[str, Any]:
        callers, writers = await http_callers(port, args.callers)
        cpu0 = cpu_seconds(gunicorn.pid)
        t0 = time.perf_counter()
        latencies = await measure(callers, args.seconds, args.warmup)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(gunicorn.pid) - cpu0
        for w in writers:
            w.close()
        return summary(latencies, cpu, wall, args)

    return asyncio.run(go())


def summary(latencies: list[float], cpu: float, wall: float, args: argparse.Namespace
            ) -> dict[str, Any]:
    calls = len(latencies)
    measured_share = args.seconds / (args.seconds + args.warmup)
    return {
        "calls": calls,
        "calls_per_s": calls / args.seconds,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        # CPU was read over warm-up and measurement: spread over the calls of both
        "server_cpu_us_per_call": 1e6 * cpu / max(1, calls / measured_share),
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians reported")
    parser.add_argument("--smoke", action="store_true", help="10 callers, 1 s, 1 run: checks it runs")
    parser.add_argument("--profile-node", metavar="FILE",
                        help="run the node under cProfile, stats to FILE")
    parser.add_argument("--profile-worker", metavar="FILE",
                        help="run the backend worker under cProfile, stats to FILE")
    parser.add_argument("--out", default=str(HERE / "results" / "backend-rpc.json"))
    args = parser.parse_args()
    if args.smoke:
        args.callers, args.seconds, args.warmup, args.runs = 10, 1.0, 0.5, 1
    if hasattr(os, "sched_setaffinity") and shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    results: dict[str, Any] = {"callers": args.callers, "seconds": args.seconds,
                               "runs": args.runs, "unrealon_runs": [], "django_runs": []}
    for run_number in range(args.runs):
        for name, run in (("unrealon", run_unrealon), ("django", run_django)):
            work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
            procs = Processes(work)
            try:
                r = run(procs, args)
            finally:
                procs.stop()
                shutil.rmtree(work, ignore_errors=True)
            results[f"{name}_runs"].append(r)
            node = (f" (node {r['node_cpu_us_per_call']:.0f})" if "node_cpu_us_per_call" in r
                    else "")
            print(f"run {run_number + 1} {name:9} {r['calls_per_s']:8.0f} calls/s  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                  f"server CPU {r['server_cpu_us_per_call']:6.0f} us/call" + node, flush=True)
    for name in ("unrealon", "django"):
        runs = results[f"{name}_runs"]
        results[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    u, d = results["unrealon"], results["django"]
    results["ratios"] = {
        # above 1: unrealon-ws is better (faster, or less CPU); medians of the runs
        "throughput": u["calls_per_s"] / d["calls_per_s"],
        "p50": d["p50_ms"] / u["p50_ms"],
        "p99": d["p99_ms"] / u["p99_ms"],
        "cpu_per_call": d["server_cpu_us_per_call"] / u["server_cpu_us_per_call"],
    }
    for name in ("unrealon", "django"):
        r = results[name]
        print(f"median {name:9} {r['calls_per_s']:8.0f} calls/s  p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  server CPU {r['server_cpu_us_per_call']:6.0f} us/call")
    print("ratios (django / unrealon, above 1 = unrealon-ws better): " + ", ".join(
        f"{k} {v:.2f}x" for k, v in results["ratios"].items()))
    if not args.smoke:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
