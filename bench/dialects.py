"""Wire encodings the load client speaks: one class per server family.

``jsonrpc`` is our server's protocol (PROTOCOL.md sections 3-5), which the
Autobahn and websockets peers implement too. ``django-ipc`` is that package's
own envelope. Requests are built from byte templates and replies are matched
with regexes on the raw bytes, so the hot path never runs a full JSON decode
(the client has one core and must not be the bottleneck).

Publish payloads for the Redis ingress (``xadd_payload``) live here too,
because their layout is also a per-server wire format.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Tolerant field extraction: matches "t_ns": 1 and "t_ns":1, and the escaped
# form \"t_ns\": 1 that appears when the data travels as a JSON string
# (django-ipc's broadcast message).
RE_T_NS = re.compile(rb'"t_ns\\?"\s*:\s*(\d+)')
RE_SEQ = re.compile(rb'"seq\\?"\s*:\s*(\d+)')
# Streamed messages (PROTOCOL.md section 5.1): an event covers seq..last_seq,
# says done, and lists reported gaps; each bench chunk's text carries its own
# marker "@<index in the session>:<scheduled perf_counter_ns>~" (role_events).
RE_LAST_SEQ = re.compile(rb'"last_seq\\?"\s*:\s*(\d+)')
RE_DONE = re.compile(rb'"done\\?"\s*:\s*true')
RE_GAPS = re.compile(rb'"gaps\\?"\s*:')
RE_MARK = re.compile(rb"@(\d+):(\d+)~")


class Dialect:
    """Base class: how to call, join, publish and recognise events."""

    name = "base"
    auth_frame: bytes | None = None  # sent right after the handshake, if any
    has_cursor = False  # events carry a cursor usable as rooms.join since

    def ping(self, rid: int) -> bytes:
        raise NotImplementedError

    def join(self, rid: int, room: str, since: str | None = None) -> bytes:
        raise NotImplementedError

    def publish(self, rid: int, room: str, event: str, data: dict[str, Any],
                method: str | None = None) -> bytes:
        """A client call that publishes ``event`` to ``room`` (the rpc adapter)."""
        raise NotImplementedError

    def reply_id(self, payload: bytes) -> int | None:
        raise NotImplementedError

    def is_event(self, payload: bytes) -> bool:
        raise NotImplementedError

    def is_error(self, payload: bytes) -> bool:
        raise NotImplementedError

    def check_auth(self, payload: bytes) -> bool:
        return True

    def join_result(self, payload: bytes) -> dict[str, Any]:
        """Decoded join reply: ``cursor``, ``recovered``, ``missed`` (may be absent)."""
        raise NotImplementedError


class JsonRpc(Dialect):
    """JSON-RPC 2.0 (our server, Autobahn ceiling, websockets peer)."""

    name = "jsonrpc"
    has_cursor = True
    _RE_ID = re.compile(rb'"id"\s*:\s*(\d+)')

    def ping(self, rid: int) -> bytes:
        return b'{"jsonrpc":"2.0","id":%d,"method":"system.ping","params":{}}' % rid

    def join(self, rid: int, room: str, since: str | None = None) -> bytes:
        params: dict[str, Any] = {"room": room}
        if since is not None:
            params["since"] = since
        return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "rooms.join",
                           "params": params}).encode()

    def publish(self, rid: int, room: str, event: str, data: dict[str, Any],
                method: str | None = None) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method or "bench.publish",
                           "params": {"room": room, "event": event, "data": data}},
                          separators=(",", ":")).encode()

    def reply_id(self, payload: bytes) -> int | None:
        m = self._RE_ID.search(payload)
        return int(m.group(1)) if m else None

    def is_event(self, payload: bytes) -> bool:
        # Notifications carry "method" and no "result"; a response never has a
        # top-level "method", but a rooms.join result may hold missed
        # notifications, so "method" only counts if no "result" precedes it.
        m = payload.find(b'"method"')
        if m < 0:
            return False
        r = payload.find(b'"result"')
        return r < 0 or r > m

    def is_error(self, payload: bytes) -> bool:
        return b'"error"' in payload and b'"result"' not in payload

    def join_result(self, payload: bytes) -> dict[str, Any]:
        msg = json.loads(payload)
        if "result" not in msg:
            raise RuntimeError(f"rooms.join failed: {payload[:200]!r}")
        result: dict[str, Any] = msg["result"]
        return result


class DjangoIpc(Dialect):
    """django-ipc 1.0.9 envelope (see bench/peers/django_ipc_server.py)."""

    name = "django-ipc"
    auth_frame = b"Bearer bench"
    _RE_ID = re.compile(rb'"correlation_id"\s*:\s*"(\d+)"')

    def ping(self, rid: int) -> bytes:
        return b'{"type":"rpc","method":"system.ping","params":{},"correlation_id":"%d"}' % rid

    def join(self, rid: int, room: str, since: str | None = None) -> bytes:
        return json.dumps({"type": "rpc", "method": "join_room", "params": {"room": room},
                           "correlation_id": str(rid)}).encode()

    def publish(self, rid: int, room: str, event: str, data: dict[str, Any],
                method: str | None = None) -> bytes:
        return json.dumps({"type": "rpc", "method": method or "broadcast",
                           "params": broadcast_params(room, event, data),
                           "correlation_id": str(rid)}, separators=(",", ":")).encode()

    def reply_id(self, payload: bytes) -> int | None:
        m = self._RE_ID.search(payload)
        return int(m.group(1)) if m else None

    def is_event(self, payload: bytes) -> bool:
        head = payload[:24]
        return head.startswith(b'{"type": "broadcast"') or head.startswith(b'{"type":"broadcast"')

    def is_error(self, payload: bytes) -> bool:
        return b'"type":"error"' in payload[:20] or b'"type": "error"' in payload[:20]

    def check_auth(self, payload: bytes) -> bool:
        return b'"auth"' in payload and b'"ok"' in payload

    def join_result(self, payload: bytes) -> dict[str, Any]:
        msg = json.loads(payload)
        if msg.get("type") != "response":
            raise RuntimeError(f"join_room failed: {payload[:200]!r}")
        return {"room": msg["result"].get("room"), "cursor": None, "recovered": False,
                "missed": []}


def broadcast_params(room: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
    """django-ipc ``broadcast`` params: the event data travels as a JSON string."""
    return {"target": "room", "room": room, "title": event,
            "message": json.dumps(data, separators=(",", ":"))}


DIALECTS: dict[str, Dialect] = {d.name: d for d in (JsonRpc(), DjangoIpc())}


def xadd_payload(fmt: str, room: str, event: str, data: dict[str, Any], n: int) -> str:
    """The ``payload`` field of one ingress-stream entry, per server format.

    - ``unrealon``: PROTOCOL.md section 6 ``publish`` (fire-and-forget, no reply_to).
    - ``unrealon-native``: like ``unrealon`` but ``session.message`` events use
      the catalogue method itself (the real AI-streaming path).
    - ``django-ipc``: its ``broadcast`` method; ``reply_to`` is set because its
      bridge logs an error for every entry without one.
    """
    if fmt == "unrealon-native" and event == "session.message":
        return json.dumps({"method": event, "params": data}, separators=(",", ":"))
    if fmt in ("unrealon", "unrealon-native"):
        return json.dumps({"method": "publish",
                           "params": {"room": room, "event": event, "data": data}},
                          separators=(",", ":"))
    if fmt == "django-ipc":
        return json.dumps({"method": "broadcast", "params": broadcast_params(room, event, data),
                           "correlation_id": str(n), "reply_to": "list:response:bench",
                           "timeout": 0}, separators=(",", ":"))
    raise ValueError(f"unknown xadd format {fmt!r}")
