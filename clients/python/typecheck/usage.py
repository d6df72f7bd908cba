"""
Type-checked (never run) by tests/test_codegen.py with ``mypy --strict``: the
generated client's types accept correct use and refuse wrong use (each
``type: ignore[...]`` below must be needed: strict mode reports unused ones).
"""

from __future__ import annotations

from unrealon_client import (
    FileChanged,
    JoinResult,
    MessageFeed,
    MessageSnapshot,
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

    # streamed messages (PROTOCOL.md section 5.1): a handler, an async iterator, or both
    streaming: list[dict[str, object]] = joined["streaming"]

    def show(m: MessageSnapshot) -> None:
        last_seq: int | None = m.last_seq
        gaps: tuple[tuple[int, int], ...] = m.gaps
        print(m.message_id, m.role, m.text, last_seq, gaps, m.done, m.error, m.lost, m.fields)

    feed: MessageFeed = client.messages("session:1", show)
    async with client.messages("session:1") as answers:
        async for m in answers:
            text: str = m.text
            print(text, streaming)
    feed.close()
    client.messages(42)  # type: ignore[arg-type]
    client.messages("session:1", lambda m: m.text.bit_length())  # type: ignore[attr-defined]
    UnrealonClient("ws://h/ws", token="t", chunk_gap=1.0)  # type: ignore[call-arg]

    await client.rooms.join()  # type: ignore[call-arg]
    await client.rooms.join(room="r", since=5)  # type: ignore[arg-type]
    client.on("workspace.file_changed", joined_room)  # type: ignore[call-overload]
    client.on("workspace.nope", changed)  # type: ignore[call-overload]
    (await client.system.ping())["rooms"]  # type: ignore[typeddict-item]
    print(cursor, pong, users)
    await client.close()
