"""The JSON-RPC subset that every benchmark peer speaks (pure logic, no I/O).

Both peers (Autobahn/Twisted and websockets/uvloop) use this one module, so
the only difference between them is the network stack: same JSON library
(stdlib ``json``, as our server), same room bookkeeping, same history.

Subset (PROTOCOL.md sections 3-5):
- ``system.ping`` -> ``{"pong": true, "server_time": <epoch ms>}``
- ``rooms.join {room, since?}`` -> ``{room, cursor, recovered, missed}``
- ``rooms.leave {room}`` -> ``{room}``
- ``bench.publish {room, event, data}`` -> ``{room, cursor}``; pushes the
  notification ``{"jsonrpc","method": event, "params": {room, cursor, data}}``
  to every member of the room. This is the peers' publish path (our server
  publishes from the backend instead).

Cursors are per-room decimal counters. Each room keeps its last
``history_size`` events so ``since`` can replay them, like
``UNREALON_HISTORY_SIZE`` (never a partial replay: too old -> recovered false).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

Conn = Hashable
Broadcast = Callable[[set[Any], str], None]

_dumps = json.dumps


class Room:
    """Members, the last cursor and the replay buffer of one room."""

    __slots__ = ("history", "members", "seq")

    def __init__(self, history_size: int) -> None:
        self.members: set[Any] = set()
        self.seq = 0
        self.history: deque[tuple[int, str]] = deque(maxlen=history_size)


def _error(mid: Any, code: int, message: str) -> str:
    return _dumps({"jsonrpc": "2.0", "id": mid, "error": {"code": code, "message": message}})


class Hub:
    """Room registry plus method dispatch; the stack supplies ``broadcast``."""

    def __init__(self, broadcast: Broadcast, history_size: int = 1000) -> None:
        self.broadcast = broadcast
        self.history_size = history_size
        self.rooms: dict[str, Room] = {}
        self.conn_rooms: dict[Conn, set[str]] = {}

    def _room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(self.history_size)
        return room

    def publish(self, room_name: str, event: str, data: Any) -> str:
        """Append an event to a room's history and push it to its members."""
        room = self._room(room_name)
        room.seq += 1
        cursor = str(room.seq)
        payload = _dumps({"jsonrpc": "2.0", "method": event,
                          "params": {"room": room_name, "cursor": cursor, "data": data}})
        room.history.append((room.seq, payload))
        if room.members:
            self.broadcast(room.members, payload)
        return cursor

    def drop(self, conn: Conn) -> None:
        """Forget a closed connection."""
        for name in self.conn_rooms.pop(conn, ()):
            room = self.rooms.get(name)
            if room is not None:
                room.members.discard(conn)

    def _join(self, conn: Conn, mid: Any, params: dict[str, Any]) -> str:
        name = params["room"]
        if not isinstance(name, str):
            raise TypeError("room")
        room = self._room(name)
        missed: list[str] = []
        recovered = False
        since = params.get("since")
        if since is not None:
            try:
                s = int(since)
            except (TypeError, ValueError):
                s = -1
            if 0 <= s <= room.seq:
                oldest = room.history[0][0] if room.history else room.seq + 1
                if s + 1 >= oldest or s == room.seq:
                    recovered = True
                    missed = [p for (q, p) in room.history if q > s]
        # Register before the reply is written: the reply is written
        # synchronously by both stacks, so no event can slip in between the
        # cursor we report and the first live event (no gap, no duplicate).
        room.members.add(conn)
        self.conn_rooms.setdefault(conn, set()).add(name)
        reply = _dumps({"jsonrpc": "2.0", "id": mid, "result": {
            "room": name, "cursor": str(room.seq), "recovered": recovered, "missed": []}})
        # Splice the stored notifications (already JSON text) into "missed": []
        # instead of decoding and re-encoding them; reply ends with "]}}".
        return reply[:-3] + ", ".join(missed) + reply[-3:]

    def handle(self, conn: Conn, raw: bytes | str) -> str | None:
        """Handle one client message; return the reply text (None for notifications)."""
        try:
            msg = json.loads(raw)
        except ValueError:
            return _error(None, -32700, "Parse error")
        if not isinstance(msg, dict):
            return _error(None, -32600, "Invalid request")
        mid = msg.get("id")
        method = msg.get("method")
        params = msg.get("params") or {}
        try:
            if method == "system.ping":
                result: Any = {"pong": True, "server_time": int(time.time() * 1000)}
            elif method == "rooms.join":
                reply = self._join(conn, mid, params)
                return reply if "id" in msg else None
            elif method == "rooms.leave":
                name = params["room"]
                self.conn_rooms.get(conn, set()).discard(name)
                room = self.rooms.get(name)
                if room is not None:
                    room.members.discard(conn)
                result = {"room": name}
            elif method == "bench.publish":
                cursor = self.publish(params["room"], params["event"], params.get("data", {}))
                result = {"room": params["room"], "cursor": cursor}
            else:
                return _error(mid, -32601, "Method not found") if "id" in msg else None
        except (KeyError, TypeError, AttributeError):
            return _error(mid, -32602, "Invalid params") if "id" in msg else None
        if "id" not in msg:
            return None
        return _dumps({"jsonrpc": "2.0", "id": mid, "result": result})
