"""The one load client, used unchanged against every server.

Run by the harness as ``taskset -c 1 python bench/loadclient.py '<spec json>'``
on uvloop with picows connections. The spec's ``role`` picks what it does:

==============  ============================================================
role            what
==============  ============================================================
rpc_closed      N connections, each with one ``system.ping`` in flight
rpc_open        fixed-rate pings spread over N connections (open loop)
receivers       members of rooms; record delivery latency from ``data.t_ns``
publisher       publish at a fixed rate via an adapter (rpc call or XADD)
idle            hold N idle connections (memory per connection)
connect         open N connections at a given concurrency (+ one ping)
storm           room members that all drop and rejoin with ``since``
==============  ============================================================

Control protocol (line-delimited JSON on stdout, commands on stdin): the
client prints ``{"phase": NAME, "wait": true, ...}`` when it reaches a sync
point and waits for a ``go`` line; the harness reads server CPU/RSS there.
The last line is ``{"phase": "done", "result": {...}}``. Every role has a hard
deadline (``max_s``) so no loop runs unbounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import uvloop


class Control:
    """Phase reporting to the harness and waiting for its ``go``."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        reader = self.reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    @staticmethod
    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def phase(self, name: str, wait: bool = True, **info: Any) -> None:
        """Report a phase; with ``wait``, block until the harness says go."""
        self.emit({"phase": name, "wait": wait, **info})
        if wait:
            assert self.reader is not None
            line = await self.reader.readline()
            if line.strip() != b"go":
                raise SystemExit(f"harness said {line!r} instead of go")

    def done(self, result: dict[str, Any]) -> None:
        self.emit({"phase": "done", "wait": False, "result": result})


async def amain(spec: dict[str, Any]) -> None:
    """Dispatch to the role named in the spec, under its hard deadline."""
    import role_conns
    import role_events
    import role_rpc
    import role_storm

    roles = {
        "rpc_closed": role_rpc.rpc_closed,
        "rpc_open": role_rpc.rpc_open,
        "receivers": role_events.receivers,
        "publisher": role_events.publisher,
        "idle": role_conns.idle,
        "connect": role_conns.connect_rate,
        "storm": role_storm.storm,
    }
    ctl = Control()
    await ctl.open()
    try:
        await asyncio.wait_for(roles[spec["role"]](spec, ctl), spec.get("max_s", 300))
    except TimeoutError:
        ctl.emit({"phase": "error", "wait": False, "error": f"client deadline {spec.get('max_s')}s"})
    except Exception as exc:  # reported to the harness, which marks the case
        ctl.emit({"phase": "error", "wait": False,
                  "error": f"{type(exc).__name__}: {exc}",
                  "trace": traceback.format_exc()[-2000:]})


def main() -> None:
    spec = json.loads(sys.argv[1])
    uvloop.run(amain(spec))
    # Skip interpreter teardown of thousands of sockets: the harness only
    # needs our output, and the kernel closes the fds.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
