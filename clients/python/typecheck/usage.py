"""
Type-checked (never run) by tests/test_codegen.py with ``mypy --strict``: the
generated client's types accept correct use and refuse wrong use (each
``type: ignore[...]`` below must be needed: strict mode reports unused ones).
"""

from __future__ import annotations

from unrealon_client import (
    FileChanged,
    JoinResult,
    PresenceJoined,
    RecoveryInfo,
    RoomEventMeta,
    StateChange,
    UnrealonClient,
)
from unrealon_client.runtime import DirectEventMeta


async def usage() -> None:
    client = UnrealonClient("ws://127.0.0.1:8765/ws", token="t")
    await client.connect()
    joined: JoinResult = await client.rooms.join(room="workspace:1", since=None)
    cursor: str = joined["cursor"]
    pong: bool = (await client.system.ping())["pong"]
    users = [u["user_id"] for u in (await client.presence.list(room="workspace:1"))["users"]]

    def changed(data: FileChanged, meta: RoomEventMeta) -> None:
        print(data["path"], data["change"], meta.cursor)

    def joined_room(params: PresenceJoined, meta: DirectEventMeta) -> None:
        print(params["user_id"])

    def recovered(info: RecoveryInfo) -> None:
        print(info.recovered)

    def state(change: StateChange) -> None:
        print(change.state)

    client.on("workspace.file_changed", changed)
    client.on("presence.joined", joined_room)
    client.on("recovery", recovered)
    client.on("state", state)

    await client.rooms.join()  # type: ignore[call-arg]
    await client.rooms.join(room="r", since=5)  # type: ignore[arg-type]
    client.on("workspace.file_changed", joined_room)  # type: ignore[call-overload]
    client.on("workspace.nope", changed)  # type: ignore[call-overload]
    (await client.system.ping())["rooms"]  # type: ignore[typeddict-item]
    print(cursor, pong, users)
    await client.close()
