// Typed calls, errors, timeouts and events of the generated client.
import assert from "node:assert/strict";
import { after, test } from "node:test";

import { CallTimeoutError, ConnectionClosedError, ErrorCodes, RpcError } from "../dist/index.js";
import { client, freshRoom, nextEvent, server, sleep, waitFor } from "../testlib/server.mjs";

const open = [];
after(() => open.forEach((c) => c.close()));

async function connected(options, tokenOptions) {
  const c = await client(options, tokenOptions);
  open.push(c);
  await c.connect();
  return c;
}

test("typed calls answer with their results", async () => {
  const c = await connected();
  assert.equal(c.state, "open");
  assert.equal(c.userId, "alice");
  const pong = await c.system.ping();
  assert.equal(pong.pong, true);
  assert.equal(typeof pong.server_time, "number");
  const info = await c.system.info();
  assert.equal(info.protocol, 1);
  const room = freshRoom();
  const joined = await c.rooms.join({ room });
  assert.equal(joined.room, room);
  assert.equal(joined.recovered, false);
  assert.deepEqual(joined.missed, []);
  assert.ok((await c.rooms.list()).rooms.includes(room));
  const presence = await c.presence.list({ room });
  assert.deepEqual(presence.users.map((u) => u.user_id), ["alice"]);
  assert.equal((await c.presence.count({ room })).users, 1);
  assert.deepEqual(await c.rooms.leave({ room }), { room });
  assert.ok(!c.joinedRooms().has(room));
  const doc = await c.rpc.discover();
  assert.ok(doc.methods.some((m) => m.name === "rooms.join"));
});

test("error replies reject with RpcError and their code", async () => {
  const c = await connected({}, { rooms: ["workspace:*"] });
  await assert.rejects(c.rooms.leave({ room: freshRoom() }), (e) => e instanceof RpcError && e.code === ErrorCodes.NOT_FOUND);
  await assert.rejects(c.rooms.join({ room: freshRoom("session") }), (e) => e instanceof RpcError && e.code === ErrorCodes.FORBIDDEN);
  await assert.rejects(c.call("no.such.method"), (e) => e instanceof RpcError && e.code === ErrorCodes.METHOD_NOT_FOUND);
  await assert.rejects(c.call("rooms.join", { room: "bad room!" }), (e) => e.code === ErrorCodes.INVALID_PARAMS && Array.isArray(e.data.errors));
});

test("a call times out on its own timeout", async () => {
  const c = await connected();
  const started = Date.now();
  await assert.rejects(c.call("test.sleep", { ms: 1000 }, { timeoutMs: 100 }), CallTimeoutError);
  assert.ok(Date.now() - started < 900);
  assert.equal((await c.system.ping()).pong, true); // the connection is still fine
});

test("calls in flight are rejected when the connection drops, then the client reconnects", async () => {
  const c = await connected();
  const slow = assert.rejects(c.call("test.sleep", { ms: 3000 }), (e) => e instanceof ConnectionClosedError && e.code === 1006);
  await c.call("test.drop", {});
  await slow;
  await waitFor(() => c.states.some((s) => s.state === "reconnecting"), 3000, "reconnecting");
  await waitFor(() => c.state === "open", 5000, "open again");
  assert.equal((await c.system.ping()).pong, true);
});

test("calls made while disconnected wait for the next connection", async () => {
  const c = await connected({ backoff: { initialMs: 300, maxMs: 300, jitter: 0 } });
  await c.call("test.drop", {});
  await waitFor(() => c.state === "reconnecting", 3000, "reconnecting");
  const pong = await c.system.ping();
  assert.equal(pong.pong, true);
});

test("typed room events arrive with data and {room, cursor}", async () => {
  const c = await connected();
  const room = freshRoom();
  await c.rooms.join({ room });
  const got = nextEvent(c, "workspace.file_changed");
  const any = [];
  c.onAny((name, payload) => any.push(name));
  const data = { workspace_id: room.split(":")[1], path: "src/a.py", change: "modified" };
  const published = await c.call("test.publish", { room, event: "workspace.file_changed", data });
  const [payload, meta] = await got;
  assert.deepEqual(payload, data);
  assert.equal(meta.kind, "room");
  assert.equal(meta.room, room);
  assert.equal(meta.cursor, published.cursor);
  assert.equal(meta.replayed, false);
  assert.equal(c.joinedRooms().get(room), published.cursor);
  assert.ok(any.includes("workspace.file_changed"));
});

test("presence.joined and presence.left come from other users", async () => {
  const room = freshRoom();
  const a = await connected();
  await a.rooms.join({ room });
  const joined = nextEvent(a, "presence.joined");
  const b = await connected({}, { sub: "bob" });
  await b.rooms.join({ room });
  const [params, meta] = await joined;
  assert.equal(params.user_id, "bob");
  assert.equal(params.room, room);
  assert.equal(meta.kind, "direct");
  const left = nextEvent(a, "presence.left");
  await b.rooms.leave({ room });
  assert.equal((await left)[0].user_id, "bob");
});

test("session.message events reach handlers as the server sends them (it orders chunks, not the client)", async () => {
  const c = await connected();
  const room = freshRoom("session");
  const sid = room.split(":")[1];
  await c.rooms.join({ room });
  const seen = [];
  c.on("session.message", (m) => seen.push(`${m.message_id}/${m.seq ?? "-"}`));
  // test.publish bypasses the server's chunk ordering (PROTOCOL.md 5.1): what it sends arrives as sent
  const chunk = (message_id, seq, done = false) =>
    c.call("test.publish", { room, event: "session.message", data: { session_id: sid, message_id, role: "assistant", content: `c${seq}`, seq, done } });
  await chunk("m1", 1);
  await chunk("m1", 0);
  await c.call("test.publish", { room, event: "session.message", data: { session_id: sid, message_id: "m3", role: "user", content: "whole" } });
  await waitFor(() => seen.length >= 3, 3000, "3 events");
  await sleep(50);
  assert.deepEqual(seen, ["m1/1", "m1/0", "m3/-"]);
});

test("the server's URL comes from the test server", async () => {
  const { wsUrl } = await server();
  assert.match(wsUrl, /^ws:\/\/127\.0\.0\.1:\d+\/ws$/);
});

test("a handshake that never completes times out and backs off; close() stops it", async () => {
  const { createServer } = await import("node:net");
  const silent = createServer(() => undefined).listen(0, "127.0.0.1");
  await new Promise((r) => silent.once("listening", r));
  try {
    const c = await client({ url: `ws://127.0.0.1:${silent.address().port}/ws`, connectTimeoutMs: 150 });
    const connecting = c.connect();
    const outcome = assert.rejects(connecting, ConnectionClosedError);
    await waitFor(() => c.states.filter((s) => s.state === "reconnecting").length >= 2, 3000, "two attempts");
    assert.ok(c.states.every((s) => s.state !== "reconnecting" || s.code === 1006));
    c.close();
    await outcome;
    assert.equal(c.state, "closed");
  } finally {
    silent.close();
  }
});

test("a connection whose pings go unanswered is dropped and replaced (heartbeat)", async () => {
  const { WebSocketServer } = await import("ws");
  // a server that authenticates and joins, then never answers system.ping
  const wss = new WebSocketServer({ port: 0, host: "127.0.0.1" });
  await new Promise((r) => wss.once("listening", r));
  let connections = 0;
  wss.on("connection", (sock) => {
    connections++;
    sock.on("message", (raw) => {
      const m = JSON.parse(String(raw));
      const reply = (result) => sock.send(JSON.stringify({ jsonrpc: "2.0", id: m.id, result }));
      if (m.method === "auth.authenticate") reply({ user_id: "alice", expires_at: Date.now() / 1000 + 300 });
      else if (m.method === "rooms.join") reply({ room: m.params.room, cursor: "c0", recovered: false, missed: [] });
    });
  });
  try {
    const c = await client({ url: `ws://127.0.0.1:${wss.address().port}/ws`, heartbeatMs: 150 });
    open.push(c);
    await c.connect();
    await waitFor(() => connections >= 2, 3000, "a second connection");
    const drop = c.states.find((s) => s.state === "reconnecting");
    assert.equal(drop.code, 1006);
    assert.equal(drop.reason, "heartbeat timeout");
    c.close();
  } finally {
    for (const s of wss.clients) s.terminate();
    wss.close();
  }
});
