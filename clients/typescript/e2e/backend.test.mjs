// Backend methods end to end (PROTOCOL.md section 9), run by
// tests/test_clients_node.py with `node --test`: the compiled client, a node
// with Redis, and a real worker (tests/backend_demo_handlers.py) that logs
// what it saw to UNREALON_TEST_BACKEND_LOG.  Not in test/ (which
// `npm run test:client` runs whole): it needs Redis and a worker.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, test } from "node:test";

import { CallCancelledError, ErrorCodes, RpcError } from "../dist/index.js";
import { client, sleep, waitFor } from "../testlib/server.mjs";

const open = [];
after(() => open.forEach((c) => c.close()));

async function connected(tokenOptions = { methods: ["demo.*"] }) {
  const c = await client({ callTimeoutMs: 10_000 }, tokenOptions);
  open.push(c);
  await c.connect();
  return c;
}

function workerLog() {
  try {
    return readFileSync(process.env.UNREALON_TEST_BACKEND_LOG, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));
  } catch {
    return [];
  }
}

/** The node lists the worker's methods within 2 s of its declaring them. */
async function discovered(c, name) {
  const end = Date.now() + 15_000;
  for (;;) {
    const doc = await c.rpc.discover();
    const found = doc.methods.find((m) => m.name === name);
    if (found) return found;
    if (Date.now() > end) throw new Error(`${name} never appeared in rpc.discover`);
    await sleep(100);
  }
}

test("rpc.discover lists the worker's methods with their extension fields", async () => {
  const c = await connected();
  const m = await discovered(c, "demo.logged_count");
  assert.equal(m["x-backend"], true);
  assert.deepEqual(m["x-progress"].properties, { n: { type: "integer" } });
  assert.equal(m["x-timeout"], 30);
  assert.equal(m["x-idempotent"], false);
  assert.ok(!("x-additional-params" in m));
  assert.ok((await discovered(c, "demo.count"))["x-backend"]);
});

test("progress arrives in order, then the result", async () => {
  const c = await connected();
  await discovered(c, "demo.logged_count");
  const items = [];
  const result = await c.call("demo.logged_count", { to: 5, delay: 0.01 }, {
    onProgress: (item, seq) => items.push([seq, item.n]),
  });
  assert.deepEqual(result, { counted: 5 });
  assert.deepEqual(items, [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]);
});

test("abort rejects at once, and the worker sees the cancel", async () => {
  const c = await connected();
  await discovered(c, "demo.logged_count");
  const controller = new AbortController();
  const items = [];
  const call = c.call("demo.logged_count", { to: 1000, delay: 0.05 }, {
    signal: controller.signal,
    onProgress: (item) => items.push(item.n),
  });
  await waitFor(() => items.length >= 2, 10_000, "two progress items");
  const aborted = Date.now();
  controller.abort();
  await assert.rejects(call, (e) => e instanceof CallCancelledError && e.code === ErrorCodes.CANCELLED && e.name === "AbortError");
  assert.ok(Date.now() - aborted < 100, "rejected at once");
  await waitFor(() => workerLog().some((e) => e.event === "cancelled"), 10_000, "the worker's cancel");
  const cancelled = workerLog().find((e) => e.event === "cancelled");
  assert.ok(cancelled.at < 1000, JSON.stringify(cancelled)); // long before its end (and its 30 s deadline)
  const seen = items.length;
  await sleep(300);
  assert.equal(items.length, seen, "no progress after the cancel");
  assert.ok(!workerLog().some((e) => e.event === "finished" && e.call_id === cancelled.call_id));
  assert.equal((await c.system.ping()).pong, true);
});

test("errors: no methods claim, bad params", async () => {
  const c = await connected();
  await discovered(c, "demo.logged_count");
  await assert.rejects(c.call("demo.logged_count", { to: 0 }), (e) => e instanceof RpcError && e.code === ErrorCodes.INVALID_PARAMS);
  const other = await connected({});
  const doc = await other.rpc.discover();
  assert.ok(!doc.methods.some((m) => m.name.startsWith("demo.")), "listed without a methods claim");
  await assert.rejects(other.call("demo.logged_count", { to: 1 }), (e) => e instanceof RpcError && e.code === ErrorCodes.FORBIDDEN);
});
