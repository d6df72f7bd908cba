// Reconnect and room recovery: complete sequences, no duplicates, recovered: false surfaced.
import assert from "node:assert/strict";
import { after, test } from "node:test";

import { client, freshRoom, waitFor } from "../testlib/server.mjs";

const open = [];
after(() => open.forEach((c) => c.close()));

async function connected(options, tokenOptions) {
  const c = await client(options, tokenOptions);
  open.push(c);
  await c.connect();
  return c;
}

const range = (n) => Array.from({ length: n }, (_, i) => i);

async function streamAcrossDrop(dropParams) {
  const c = await connected();
  const room = freshRoom();
  await c.rooms.join({ room });
  const seen = [];
  const replayed = [];
  const recoveries = [];
  c.on("workspace.state_changed", (data, meta) => {
    seen.push(data.n);
    if (meta.replayed) replayed.push(data.n);
  });
  c.on("recovery", (info) => recoveries.push(info));
  const count = 60;
  await c.call("test.stream", { room, event: "workspace.state_changed", count, interval_ms: 15, data: { workspace_id: "w", state: "running" } });
  await waitFor(() => seen.length >= 10, 5000, "10 events before the drop");
  await c.call("test.drop", dropParams);
  await waitFor(() => c.states.some((s) => s.state === "reconnecting"), 3000, "the drop");
  await waitFor(() => seen.length >= count, 8000, `all ${count} events`);
  await waitFor(() => c.state === "open", 3000, "open");
  assert.deepEqual(seen, range(count), "every event once, in order");
  assert.ok(recoveries.some((r) => r.room === room && r.recovered === true));
  assert.ok(!recoveries.some((r) => r.recovered === false));
  return { c, replayed };
}

test("after the server aborts the TCP connection mid-stream, the sequence is complete", async () => {
  const { c, replayed } = await streamAcrossDrop({});
  const drop = c.states.find((s) => s.state === "reconnecting");
  assert.equal(drop.code, 1006);
  assert.ok(replayed.length > 0, "some events came from the missed replay");
});

test("close 1001 reconnects at once, and recovers the room", async () => {
  const { c } = await streamAcrossDrop({ code: 1001 });
  const drop = c.states.find((s) => s.state === "reconnecting");
  assert.equal(drop.code, 1001);
  assert.equal(drop.delayMs, 0);
});

test("more missed events than the history keeps: recovered false reaches the application", async () => {
  const c = await connected({ backoff: { initialMs: 1000, maxMs: 1000, jitter: 0 } });
  const backend = await connected({}, { sub: "backend-test" });
  const room = freshRoom();
  await c.rooms.join({ room });
  const recovery = new Promise((resolve) => c.on("recovery", (info) => info.room === room && resolve(info)));
  await c.call("test.drop", {});
  await waitFor(() => c.state === "reconnecting", 3000, "reconnecting");
  // the test server keeps 50 events per room
  await backend.call("test.publish", { room, event: "workspace.state_changed", count: 60, data: { workspace_id: "w", state: "x" } });
  const info = await recovery;
  assert.equal(info.room, room);
  assert.equal(info.recovered, false);
  assert.equal(info.missed, 0);
  // live events still flow after a failed recovery
  const live = new Promise((resolve) => c.on("workspace.state_changed", (d) => resolve(d)));
  await backend.call("test.publish", { room, event: "workspace.state_changed", data: { workspace_id: "w", state: "after" } });
  assert.equal((await live).state, "after");
});

test("events of the implicit user room sent while away are replayed after reconnect", async () => {
  const c = await connected({ backoff: { initialMs: 1000, maxMs: 1000, jitter: 0 } }, { sub: "carol" });
  const backend = await connected({}, { sub: "backend-test" });
  const notes = [];
  c.on("notification.send", (data, meta) => notes.push([data.title, meta.replayed]));
  await backend.call("test.publish", { room: "user:carol", event: "notification.send", data: { user_id: "carol", title: "one", message: "m" } });
  await waitFor(() => notes.length === 1, 3000, "the first notification");
  await c.call("test.drop", {});
  await waitFor(() => c.state === "reconnecting", 3000, "reconnecting");
  await backend.call("test.publish", { room: "user:carol", event: "notification.send", data: { user_id: "carol", title: "two", message: "m" } });
  await waitFor(() => notes.length === 2, 5000, "the missed notification");
  assert.deepEqual(notes, [["one", false], ["two", true]]);
});
