// Streamed messages in the client (PROTOCOL.md section 5.1) against a scripted
// in-memory WebSocket that plays the server exactly as the contract says: a
// join's `streaming`, a rejoin's `missed` (recovered) and a rejoin that cannot
// recover (`recovered: false`, `streaming` again).  No server needed, so the
// client side is checked whatever a node does; run by
// tests/test_clients_message_streams.py with `node --test` (the real node is in
// messages.test.mjs).
import assert from "node:assert/strict";
import { test } from "node:test";

import { MessageStreamError, UnrealonClient } from "../dist/index.js";
import { ScriptedSocket } from "../testlib/scripted-socket.mjs";

const ROOM = "session:s1";
const CHUNKS = Array.from({ length: 10 }, (_, i) => `c${i} `);
const FULL = CHUNKS.join("");

/** A session.message notification covering chunks first..last of `messageId`. */
function chunkEvent(messageId, first, last, cursor, extra = {}) {
  return {
    jsonrpc: "2.0",
    method: "session.message",
    params: {
      room: ROOM,
      cursor,
      data: {
        session_id: "s1", message_id: messageId, role: "assistant", content: CHUNKS.slice(first, last + 1).join(""),
        seq: first, last_seq: last, done: last === CHUNKS.length - 1, ...extra,
      },
    },
  };
}

/** One connection the test plays the server of; `joins` answers rooms.join by connection number. */
class JoinScriptedSocket extends ScriptedSocket {
  static all = [];
  static joins = () => null;
  constructor(url) {
    super(url);
    this.index = JoinScriptedSocket.all.length;
    JoinScriptedSocket.all.push(this);
  }
  answer(msg) {
    if (msg.method === "rooms.join") {
      this.push({ id: msg.id, result: JoinScriptedSocket.joins(this.index, msg.params) });
    }
  }
  /** The server drops the connection. */
  drop() {
    this.readyState = 3;
    this.onclose?.({ code: 1006, reason: "" });
  }
}

const tick = (ms = 20) => new Promise((r) => setTimeout(r, ms));

async function until(predicate, what) {
  for (let i = 0; i < 200; i++) {
    if (predicate()) return;
    await tick(5);
  }
  throw new Error(`timed out waiting for ${what}`);
}

function scriptedClient() {
  JoinScriptedSocket.all = [];
  const c = new UnrealonClient({
    url: "ws://scripted/ws",
    token: "t",
    WebSocket: JoinScriptedSocket,
    trackImplicitRooms: false,
    heartbeatMs: 0,
    backoff: { initialMs: 5, maxMs: 5, jitter: 0 },
  });
  c.errors = [];
  c.on("error", (e) => c.errors.push(e));
  return c;
}

test("join streaming, live chunks, a recovered rejoin's missed and a failed one's streaming give exactly the text", async () => {
  const joins = [];
  JoinScriptedSocket.joins = (index, params) => {
    joins.push({ index, params });
    if (index === 0) {
      // a late join: m1 streams, chunks 0..2 so far
      return { room: ROOM, cursor: "c5", recovered: false, missed: [], streaming: [chunkEvent("m1", 0, 2, "c4")] };
    }
    if (index === 1) {
      return { room: ROOM, cursor: "c9", recovered: true, missed: [chunkEvent("m1", 4, 6, "c9")], streaming: [] };
    }
    // recovered false: m1 is still streaming (all of it so far, seq 0), m2 ended meanwhile
    return { room: ROOM, cursor: "c20", recovered: false, missed: [], streaming: [chunkEvent("m1", 0, 8, "c19")] };
  };
  const c = scriptedClient();
  const snapshots = [];
  c.messages(ROOM, (m) => snapshots.push(m));
  const raw = [];
  c.on("session.message", (data, meta) => raw.push([data.seq, data.last_seq, meta.replayed, meta.cursor]));
  const recoveries = [];
  c.on("recovery", (r) => recoveries.push(r));
  await c.connect();
  const joined = await c.rooms.join({ room: ROOM });
  assert.equal(joined.streaming.length, 1);
  assert.equal(snapshots.at(-1).text, CHUNKS.slice(0, 3).join(""));
  assert.deepEqual(raw, [[0, 2, true, "c4"]]); // handlers see the streaming event too, as replayed
  assert.equal(c.joinedRooms().get(ROOM), "c5"); // the streaming event leaves the cursor alone

  JoinScriptedSocket.all[0].push(chunkEvent("m1", 3, 3, "c6"));
  JoinScriptedSocket.all[0].push({ method: "session.message", params: { room: ROOM, cursor: "c7", data: { session_id: "s1", message_id: "m2", role: "assistant", content: "other ", seq: 0, last_seq: 0, done: false } } });
  await until(() => snapshots.some((m) => m.messageId === "m2"), "m2");
  JoinScriptedSocket.all[0].drop();
  await until(() => c.state === "open" && JoinScriptedSocket.all.length === 2, "the first reconnect");
  assert.equal(joins[1].params.since, "c7");
  await until(() => snapshots.at(-1).lastSeq === 6, "m1's missed chunks");
  assert.equal(snapshots.at(-1).text, CHUNKS.slice(0, 7).join(""));

  JoinScriptedSocket.all[1].push(chunkEvent("m1", 7, 7, "c10"));
  await until(() => snapshots.at(-1).lastSeq === 7, "chunk 7");
  JoinScriptedSocket.all[1].drop();
  await until(() => c.state === "open" && JoinScriptedSocket.all.length === 3, "the second reconnect");
  assert.equal(joins[2].params.since, "c10");
  await until(() => recoveries.length === 2, "the second recovery");
  assert.deepEqual(recoveries.map((r) => r.recovered), [true, false]);
  const lost = snapshots.find((m) => m.messageId === "m2" && m.lost);
  assert.deepEqual([lost.text, lost.done], ["other ", false]);
  assert.equal(snapshots.filter((m) => m.messageId === "m1").at(-1).lastSeq, 8);

  JoinScriptedSocket.all[2].push(chunkEvent("m1", 9, 9, "c21"));
  await until(() => snapshots.at(-1).done, "the last chunk");
  const m1 = snapshots.filter((m) => m.messageId === "m1");
  assert.equal(m1.at(-1).text, FULL);
  assert.deepEqual(m1.map((m) => m.lastSeq), [2, 3, 6, 7, 8, 9]);
  assert.ok(m1.every((m) => FULL.startsWith(m.text) && !m.lost));
  assert.deepEqual(c.errors, []);
  c.close();
});

test("the iterator coalesces what a slow reader did not take, and ends when the client closes", async () => {
  JoinScriptedSocket.joins = () => ({ room: ROOM, cursor: "c1", recovered: false, missed: [], streaming: [] });
  const c = scriptedClient();
  await c.connect();
  await c.rooms.join({ room: ROOM });
  const feed = c.messages(ROOM);
  const ws = JoinScriptedSocket.all[0];
  ws.push(chunkEvent("m1", 0, 0, "c2"));
  ws.push(chunkEvent("m1", 1, 4, "c3"));
  ws.push({ method: "session.message", params: { room: ROOM, cursor: "c4", data: { session_id: "s1", message_id: "q", role: "user", content: "whole" } } });
  await tick();
  const got = [];
  for await (const m of feed) {
    got.push([m.messageId, m.text, m.lastSeq, m.done, m.streamed]);
    if (got.length === 2) c.close();
  }
  assert.deepEqual(got, [["m1", CHUNKS.slice(0, 5).join(""), 4, false, true], ["q", "whole", null, true, false]]);
  assert.equal(feed.closed, true);
});

test("events that break the contract are reported on error, and the text stays a prefix", async () => {
  JoinScriptedSocket.joins = () => ({ room: ROOM, cursor: "c1", recovered: false, missed: [], streaming: [] });
  const c = scriptedClient();
  await c.connect();
  await c.rooms.join({ room: ROOM });
  const snapshots = [];
  c.messages(ROOM, (m) => snapshots.push(m));
  const ws = JoinScriptedSocket.all[0];
  ws.push(chunkEvent("m1", 0, 1, "c2"));
  ws.push(chunkEvent("m1", 1, 1, "c3")); // a repeat: ignored quietly
  ws.push(chunkEvent("m1", 4, 4, "c4")); // 2..3 never came
  ws.push(chunkEvent("m1", 3, 5, "c5")); // overlaps
  await until(() => c.errors.length === 2, "two reports");
  assert.ok(c.errors.every((e) => e instanceof MessageStreamError && e.messageId === "m1" && e.room === ROOM));
  assert.deepEqual(snapshots.map((m) => [m.lastSeq, m.gaps]), [[1, []], [4, [[2, 3]]]]);
  assert.equal(snapshots.at(-1).text, "c0 c1 c4 ");
  c.close();
});
