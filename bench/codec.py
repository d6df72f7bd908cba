"""
The JSON codec, fast path against the reference (``unrealon.jsoncodec``),
in process: CPU per decode of typical requests and per encode of typical
replies and events.  The end-to-end effect is in ``bench/run.py``'s rpc
scenario.

    .venv/bin/python bench/codec.py
"""

from __future__ import annotations

import timeit

from unrealon import jsoncodec

REQUESTS = {
    "system.ping": b'{"jsonrpc":"2.0","id":17,"method":"system.ping"}',
    "rooms.join": b'{"jsonrpc":"2.0","id":"a7","method":"rooms.join","params":{"room":"workspace:42","since":"k3:1733400000000-0"}}',
    "event 1 KB": b'{"jsonrpc":"2.0","id":3,"method":"chat.post","params":{"room":"r","text":"' + b"x" * 1000 + b'"}}',
}
REPLIES = {
    "ping reply": {"jsonrpc": "2.0", "id": 17, "result": {"pong": True, "server_time": 1796490468075}},
    "join reply": {"jsonrpc": "2.0", "id": "a7", "result": {"room": "workspace:42", "cursor": "k3:1733400000000-0", "recovered": True, "missed": []}},
    "event": {"jsonrpc": "2.0", "method": "file.changed", "params": {"room": "workspace:42", "cursor": "k3:1-0", "data": {"path": "src/app.py", "size": 1234, "by": "alice", "t": 1733400000.25}}},
    "event, null field": {"jsonrpc": "2.0", "method": "task.status", "params": {"room": "r", "data": {"id": 1, "error": None}}},
}


def per_call_us(fn, arg, n: int = 200_000) -> float:
    return min(timeit.repeat(lambda: fn(arg), number=n, repeat=5)) / n * 1e6


def main() -> None:
    print(f"codec: {jsoncodec.BACKEND}")
    print(f"{'case':22s} {'reference µs':>13s} {'fast µs':>9s} {'ratio':>7s}")
    for name, payload in REQUESTS.items():
        ref = per_call_us(jsoncodec.reference_decode, payload)
        fast = per_call_us(jsoncodec.decode, payload)
        print(f"decode {name:15s} {ref:13.2f} {fast:9.2f} {fast / ref:6.2f}x")
    for name, value in REPLIES.items():
        ref = per_call_us(jsoncodec.reference_encode, value)
        fast = per_call_us(jsoncodec.encode, value)
        print(f"encode {name:15s} {ref:13.2f} {fast:9.2f} {fast / ref:6.2f}x")


if __name__ == "__main__":
    main()
