"""
The JSON codec, fast path against the reference (``unrealon.jsoncodec``),
in process: CPU per decode of typical requests and per encode of typical
replies and events, and the reply to a rejoin with missed events as the
Redis engine makes it (the stored notifications copied in as
``jsoncodec.RawJSON``) against decoding them and encoding them again (what it
did before).  The end-to-end effects are in ``bench/run.py``'s rpc and
reconnect_storm scenarios.

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


def stored_events(n: int) -> list[str]:
    """C{n} notifications as the publish script stores them (head .. cursor .. tail)."""
    from unrealon.engine.redisbroker import split_notification

    out = []
    for i in range(n):
        head, tail = split_notification(
            "bench.tick", "bench:storm", {"seq": i, "t": 1796490468075.5, "by": "alice"})
        out.append(f"{head}k3:1733400000000-{i}{tail}")
    return out


def join_reply(missed: list[object]) -> bytes:
    return jsoncodec.encode({"jsonrpc": "2.0", "id": "a7", "result": {
        "room": "bench:storm", "cursor": "k3:1733400000000-0", "recovered": True,
        "missed": missed, "streaming": []}})


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
    print(f"{'rejoin reply':22s} {'decoded µs':>13s} {'stored µs':>9s} {'ratio':>7s}")
    for n in (1, 10, 20):
        texts = stored_events(n)
        decoded = per_call_us(lambda t: join_reply([jsoncodec.decode(x) for x in t]), texts,
                              20_000)
        raw = per_call_us(lambda t: join_reply([jsoncodec.RawJSON(x) for x in t]), texts, 20_000)
        print(f"{n:2d} missed events        {decoded:13.2f} {raw:9.2f} {raw / decoded:6.2f}x")


if __name__ == "__main__":
    main()
