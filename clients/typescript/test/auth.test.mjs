// Tokens: refresh before exp, new token on 4001/4009, 4003 stops, bad fixed token stops.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import WebSocket from "ws";

import { ConnectionClosedError, UnrealonClient, decodeJwtPayload } from "../dist/index.js";
import { client, freshRoom, mint, server, sleep, waitFor } from "../testlib/server.mjs";

const open = [];
after(() => open.forEach((c) => c.close()));

async function connected(options, tokenOptions) {
  const c = await client(options, tokenOptions);
  open.push(c);
  await c.connect();
  return c;
}

test("a short-lived token is refreshed before it expires, on the same connection", async () => {
  const c = await connected({}, { ttl: 3 });
  const room = freshRoom();
  await c.rooms.join({ room });
  const firstExp = decodeJwtPayload(await mint({ ttl: 3 })).exp;
  await waitFor(() => c.mints.count >= 3, 9000, "two refreshes");
  assert.ok(!c.states.some((s) => s.state === "reconnecting"), "never reconnected");
  assert.ok(Date.now() / 1000 > firstExp, "outlived the first token");
  const got = new Promise((resolve) => c.on("workspace.snapshot_created", resolve));
  await c.call("test.publish", { room, event: "workspace.snapshot_created", data: { workspace_id: "w", snapshot_id: "s1" } });
  assert.equal((await got).snapshot_id, "s1");
});

for (const code of [4001, 4009]) {
  test(`close ${code}: a new token from the provider, then reconnect and rejoin`, async () => {
    const c = await connected();
    const room = freshRoom();
    await c.rooms.join({ room });
    const before = c.mints.count;
    await c.call("test.drop", { code });
    await waitFor(() => c.states.some((s) => s.state === "reconnecting" && s.code === code), 3000, "reconnecting");
    await waitFor(() => c.state === "open", 3000, "open again");
    assert.equal(c.mints.count, before + 1);
    assert.equal(c.states.find((s) => s.code === code).delayMs, 0);
    assert.ok((await c.rooms.list()).rooms.includes(room), "the room was joined again");
  });
}

test("close 4003 stops reconnecting: state closed with the reason", async () => {
  const c = await connected();
  const pending = c.call("test.sleep", { ms: 2000 });
  const rejected = assert.rejects(pending, (e) => e instanceof ConnectionClosedError && e.code === 4003);
  await c.call("test.drop", { code: 4003, reason: "banned" });
  await waitFor(() => c.state === "closed", 3000, "closed");
  const closed = c.states.at(-1);
  assert.equal(closed.code, 4003);
  assert.equal(closed.reason, "banned");
  await rejected;
  const mints = c.mints.count;
  await sleep(400);
  assert.equal(c.state, "closed");
  assert.equal(c.mints.count, mints, "no new connection attempt");
  await assert.rejects(c.system.ping(), ConnectionClosedError);
});

test("close 4009 with a fixed token (no provider) closes for good", async () => {
  const { wsUrl } = await server();
  const c = new UnrealonClient({ url: wsUrl, WebSocket, token: await mint() });
  open.push(c);
  const states = [];
  c.on("state", (s) => states.push(s));
  await c.connect();
  await c.call("test.drop", { code: 4009 });
  await waitFor(() => c.state === "closed", 3000, "closed");
  assert.equal(states.at(-1).code, 4009);
});

test("an invalid fixed token: connect() rejects, state closed", async () => {
  const { wsUrl } = await server();
  const c = new UnrealonClient({ url: wsUrl, WebSocket, token: "not-a-jwt" });
  open.push(c);
  await assert.rejects(c.connect(), (e) => e instanceof ConnectionClosedError && e.code === 4001);
  assert.equal(c.state, "closed");
});

test("an expired token from the provider is retried with a fresh one", async () => {
  let calls = 0;
  const c = await client({ tokenProvider: async () => (++calls === 1 ? mint({ ttl: -60 }) : mint()) });
  open.push(c);
  const errors = [];
  c.on("error", (e) => errors.push(e));
  await c.connect();
  assert.equal(calls, 2);
  assert.equal(errors[0].code, -32001);
});

test("a room revoked by a refreshed token is forgotten, not rejoined", async () => {
  let rooms = ["workspace:*"];
  const c = await client({ tokenProvider: () => mint({ rooms }) });
  open.push(c);
  await c.connect();
  const room = freshRoom();
  await c.rooms.join({ room });
  const revoked = new Promise((resolve) => c.on("rooms.revoked", (p) => resolve(p.room)));
  rooms = ["session:*"];
  await c.auth.refresh({ token: await mint({ rooms }) });
  assert.equal(await revoked, room);
  assert.ok(!c.joinedRooms().has(room));
  const recoveries = [];
  c.on("recovery", (r) => recoveries.push(r));
  await c.call("test.drop", { code: 1001 });
  await waitFor(() => c.states.filter((s) => s.state === "open").length >= 2, 3000, "open again");
  assert.ok(!(await c.rooms.list()).rooms.includes(room));
  assert.ok(!recoveries.some((r) => r.room === room));
});

test("a room the new token no longer grants fails its rejoin: recovery carries the error", async () => {
  let rooms = ["workspace:*"];
  const c = await client({ tokenProvider: () => mint({ rooms }) });
  open.push(c);
  await c.connect();
  const room = freshRoom();
  await c.rooms.join({ room });
  const recovery = new Promise((resolve) => c.on("recovery", (r) => r.room === room && resolve(r)));
  rooms = ["session:*"];
  await c.call("test.drop", { code: 4009 });
  const info = await recovery;
  assert.equal(info.recovered, false);
  assert.equal(info.error.code, -32003);
  assert.ok(!c.joinedRooms().has(room));
});
