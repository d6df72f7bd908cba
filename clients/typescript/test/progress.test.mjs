// Backend calls in the runtime (PROTOCOL.md section 9), against a scripted
// in-memory WebSocket: rpc.progress routed to the call by id and in seq order,
// AbortSignal -> rpc.cancel and CallCancelledError at once, late replies dropped,
// a timed-out call cancelled on the server.  No server needed: what the node
// does is tested end to end in tests/test_backend_clients.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { CallCancelledError, CallTimeoutError, ErrorCodes, RpcError, UnrealonClient } from "../dist/index.js";
import { ScriptedSocket } from "../testlib/scripted-socket.mjs";

/** The scripted server of one call's connection: rpc.progress, and what the client sent. */
class CallScriptedSocket extends ScriptedSocket {
  static last = null;
  constructor(url) {
    super(url);
    CallScriptedSocket.last = this;
  }
  progress(id, seq, data) {
    this.push({ method: "rpc.progress", params: { id, seq, data } });
  }
  /** The first request sent for `method` (waits for it). */
  async request(method) {
    for (let i = 0; i < 200; i++) {
      const found = this.sent.find((m) => m.method === method);
      if (found) return found;
      await new Promise((r) => setTimeout(r, 5));
    }
    throw new Error(`no ${method} request was sent`);
  }
}

async function connected() {
  const c = new UnrealonClient({
    url: "ws://scripted/ws",
    token: "t",
    WebSocket: CallScriptedSocket,
    trackImplicitRooms: false,
    heartbeatMs: 0,
    reconnect: false,
  });
  c.errors = [];
  c.events = [];
  c.on("error", (e) => c.errors.push(e));
  c.onAny((name) => c.events.push(name));
  await c.connect();
  return [c, CallScriptedSocket.last];
}

const tick = () => new Promise((r) => setTimeout(r, 20));

test("the new error codes are exported", () => {
  assert.equal(ErrorCodes.DEADLINE_EXCEEDED, -32012);
  assert.equal(ErrorCodes.NO_WORKER, -32013);
  assert.equal(ErrorCodes.CANCELLED, -32014);
  assert.equal(ErrorCodes.WORKER_LOST, -32015);
});

test("progress goes to its call in seq order, then the result", async () => {
  const [c, ws] = await connected();
  const got = [];
  const other = [];
  const call = c.call("demo.count", { to: 3 }, { onProgress: (item, seq) => got.push([seq, item]) });
  const slow = c.call("demo.other", {}, { onProgress: (item, seq) => other.push([seq, item]) });
  const req = await ws.request("demo.count");
  const req2 = await ws.request("demo.other");
  ws.progress(req.id, 1, { n: 1 });
  ws.progress(req2.id, 1, { n: 100 });
  ws.progress(req.id, 2, { n: 2 });
  ws.progress(req.id, 2, { n: 2 }); // a repeat: dropped
  ws.progress(req.id, 1, { n: 1 }); // older: dropped
  ws.progress(9999, 1, { n: -1 }); // no such call: ignored
  ws.progress(req.id, 3, { n: 3 });
  ws.push({ id: req.id, result: { counted: 3 } });
  ws.progress(req.id, 4, { n: 4 }); // after the reply: dropped
  assert.deepEqual(await call, { counted: 3 });
  await tick();
  assert.deepEqual(got, [[1, { n: 1 }], [2, { n: 2 }], [3, { n: 3 }]]);
  assert.deepEqual(other, [[1, { n: 100 }]]);
  assert.deepEqual(c.events, []); // rpc.progress is no event
  assert.deepEqual(c.errors, []);
  ws.push({ id: req2.id, result: {} });
  await slow;
  c.close();
});

test("a throwing onProgress is reported as an error and the call goes on", async () => {
  const [c, ws] = await connected();
  const call = c.call("demo.count", {}, { onProgress: () => { throw new Error("handler bug"); } });
  const req = await ws.request("demo.count");
  ws.progress(req.id, 1, {});
  ws.push({ id: req.id, result: 1 });
  assert.equal(await call, 1);
  assert.deepEqual(c.errors.map((e) => e.message), ["handler bug"]);
  c.close();
});

test("abort rejects at once with CallCancelledError and sends rpc.cancel; the late reply is dropped", async () => {
  const [c, ws] = await connected();
  const controller = new AbortController();
  const got = [];
  const call = c.call("demo.count", { to: 10 }, { signal: controller.signal, onProgress: (item) => got.push(item) });
  const req = await ws.request("demo.count");
  ws.progress(req.id, 1, { n: 1 });
  await tick();
  controller.abort();
  await assert.rejects(call, (e) => {
    assert.ok(e instanceof CallCancelledError);
    assert.ok(e instanceof RpcError);
    assert.equal(e.code, ErrorCodes.CANCELLED);
    assert.equal(e.name, "AbortError");
    return true;
  });
  const cancel = await ws.request("rpc.cancel");
  assert.deepEqual(cancel.params, { id: req.id });
  ws.progress(req.id, 2, { n: 2 }); // already given up on: dropped
  ws.push({ id: req.id, error: { code: -32014, message: "cancelled" } });
  ws.push({ id: cancel.id, result: { id: req.id, cancelled: true } });
  await tick();
  assert.deepEqual(got, [{ n: 1 }]);
  assert.deepEqual(c.errors, []);
  assert.equal(c.state, "open");
  c.close();
});

test("an already aborted signal sends nothing", async () => {
  const [c, ws] = await connected();
  const reason = new Error("user left");
  await assert.rejects(c.call("demo.count", {}, { signal: AbortSignal.abort(reason) }), (e) => e instanceof CallCancelledError && e.reason === reason);
  await tick();
  assert.deepEqual(ws.sent.map((m) => m.method), ["auth.authenticate"]);
  c.close();
});

test("aborting after the reply changes nothing", async () => {
  const [c, ws] = await connected();
  const controller = new AbortController();
  const call = c.call("demo.count", {}, { signal: controller.signal });
  const req = await ws.request("demo.count");
  ws.push({ id: req.id, result: "done" });
  assert.equal(await call, "done");
  controller.abort();
  await tick();
  assert.ok(!ws.sent.some((m) => m.method === "rpc.cancel"));
  c.close();
});

test("a call that times out on the client is cancelled on the server", async () => {
  const [c, ws] = await connected();
  const call = c.call("demo.count", {}, { timeoutMs: 50 });
  const req = await ws.request("demo.count");
  await assert.rejects(call, CallTimeoutError);
  const cancel = await ws.request("rpc.cancel");
  assert.deepEqual(cancel.params, { id: req.id });
  c.close();
});
