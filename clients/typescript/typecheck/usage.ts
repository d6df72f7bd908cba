// Compiled (never run) by tests/test_clients_node.py with `tsc --strict --noEmit`:
// the generated client's types accept correct use and refuse wrong use.
import {
  ConnectionClosedError,
  RpcError,
  UnrealonClient,
  type EventData,
  type FileChanged,
  type GapRange,
  type JoinResult,
  type MessageFeed,
  type MessageSnapshot,
  type RoomEventMeta,
} from "../dist/index.js";

export async function usage(): Promise<void> {
  // the browser's own WebSocket fits the injectable constructor
  const client = new UnrealonClient({ url: "ws://127.0.0.1:8765/ws", tokenProvider: async () => "t", WebSocket });
  await client.connect();

  const joined: JoinResult = await client.rooms.join({ room: "workspace:1", since: null });
  const cursor: string = joined.cursor;
  const pong: boolean = (await client.system.ping()).pong;
  const users: string[] = (await client.presence.list({ room: "workspace:1" })).users.map((u) => u.user_id);

  client.on("workspace.file_changed", (data: FileChanged, meta: RoomEventMeta) => {
    const change: "created" | "modified" | "deleted" | "renamed" = data.change;
    const where: string = meta.room + meta.cursor + data.path;
    void change;
    void where;
  });
  client.on("presence.joined", (params, meta) => {
    const who: string = params.user_id;
    const kind: "direct" = meta.kind;
    void who;
    void kind;
  });
  client.on("recovery", (info) => {
    const ok: boolean = info.recovered;
    void ok;
  });
  client.on("state", (change) => {
    const state: "connecting" | "open" | "reconnecting" | "closed" = change.state;
    void state;
  });
  const role: EventData<"session.message">["role"] = "assistant";

  // streamed messages (PROTOCOL.md section 5.1): a handler, an async iterator, or both
  const streaming: Record<string, unknown>[] = joined.streaming;
  const feed: MessageFeed = client.messages("session:1", (m: MessageSnapshot) => {
    const text: string = m.text;
    const lastSeq: number | null = m.lastSeq;
    const gaps: readonly GapRange[] = m.gaps;
    const ended: boolean = m.done || m.lost || m.error !== null;
    void [text, lastSeq, gaps, ended, m.messageId, m.role, m.fields.session_id];
  });
  for await (const m of client.messages("session:1")) {
    if (m.done) break;
  }
  feed.close();
  // @ts-expect-error: messages takes a room name
  client.messages(42);
  // @ts-expect-error: a snapshot's text is a string
  client.messages("session:1", (m) => m.text.toFixed());
  // @ts-expect-error: the options of the reorder buffer are gone (the server orders chunks)
  new UnrealonClient({ url: "ws://127.0.0.1:8765/ws", token: "t", chunkGapMs: 1000 });

  // @ts-expect-error: rooms.join needs a room
  await client.rooms.join({});
  // @ts-expect-error: since is a string
  await client.rooms.join({ room: "r", since: 5 });
  // @ts-expect-error: no such event
  client.on("workspace.nope", () => undefined);
  // @ts-expect-error: the data of workspace.file_changed has no field "size" of type number
  client.on("workspace.file_changed", (data: { size: number }) => void data);
  // @ts-expect-error: ping's result has no "rooms"
  (await client.system.ping()).rooms;

  try {
    await client.rooms.leave({ room: "workspace:1" });
  } catch (e) {
    if (e instanceof RpcError) void e.code;
    if (e instanceof ConnectionClosedError) void e.reason;
  }
  void [cursor, pong, users, role, streaming];
  client.close();
}
