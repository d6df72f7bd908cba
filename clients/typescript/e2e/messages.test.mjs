// Streamed messages end to end (PROTOCOL.md section 5.1), run by
// tests/test_clients_message_streams.py with `node --test`: the compiled client
// against a node with Redis (UNREALON_HISTORY_SIZE 5), chunks published through
// the node's HTTP API as a backend would.  `client.messages(room)` must hold
// exactly the full text at the end, whatever happened to the connection
// meanwhile.  Not in test/ (which `npm run test:client` runs whole): it needs
// Redis and an API key.
import assert from "node:assert/strict";
import { after, test } from "node:test";

import { answerChunks, api, freshSession, publishChunk, publishChunks, textUpTo } from "../testlib/answers.mjs";
import { client, waitFor } from "../testlib/server.mjs";

const open = [];
after(() => open.forEach((c) => c.close()));

async function connected(options = {}) {
  const c = await client({ callTimeoutMs: 10_000, ...options });
  open.push(c);
  await c.connect();
  return c;
}

/** Every snapshot of `room` (handler), and the last one per message. */
function watch(c, room) {
  const seen = [];
  const latest = new Map();
  const feed = c.messages(room, (m) => {
    seen.push(m);
    latest.set(m.messageId, m);
  });
  return { feed, seen, latest };
}

/** Every snapshot's text is a prefix of the full text, and texts never shrink: no repeat, no disorder. */
function assertGrowing(snapshots, full) {
  let previous = "";
  for (const m of snapshots) {
    assert.ok(full.startsWith(m.text), `not a prefix of the answer: ${JSON.stringify(m.text.slice(-40))}`);
    assert.ok(m.text.length >= previous.length, "the text shrank");
    previous = m.text;
  }
}

test("an answer streams into messages(room) across a dropped connection, to exactly its full text", async () => {
  const c = await connected();
  const session = freshSession();
  const room = `session:${session}`;
  const chunks = answerChunks(40);
  const full = chunks.join("");
  const recoveries = [];
  c.on("recovery", (r) => r.room === room && recoveries.push(r));
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const { seen, latest } = watch(c, room);
  const iterated = (async () => {
    const texts = [];
    for await (const m of c.messages(room)) {
      texts.push(m.text);
      if (m.done) break;
    }
    return texts;
  })();
  const joined = await c.rooms.join({ room });
  assert.deepEqual(joined.streaming, []);

  await publishChunks(session, "m1", chunks, 0, 14);
  await waitFor(() => latest.get("m1")?.lastSeq === 14, 5000, "chunk 14");
  assert.equal(latest.get("m1").text, textUpTo(chunks, 14));

  await c.call("test.drop", {}); // the node aborts the TCP connection
  await waitFor(() => c.state === "reconnecting", 3000, "the drop");
  await publishChunks(session, "m1", chunks, 15, 29); // while the client is away: recovered from missed
  await waitFor(() => c.state === "open", 8000, "open again");
  await publishChunks(session, "m1", chunks, 30, 39);
  await waitFor(() => latest.get("m1")?.done === true, 8000, "the last chunk");

  const last = latest.get("m1");
  assert.equal(last.text, full);
  assert.equal(last.lastSeq, 39);
  assert.deepEqual([last.error, last.gaps, last.lost, last.streamed], [null, [], false, true]);
  assert.equal(last.role, "assistant");
  assert.equal(last.sessionId, session);
  assertGrowing(seen, full);
  assert.equal(seen.filter((m) => m.done).length, 1);
  assert.ok(recoveries.some((r) => r.recovered === true), JSON.stringify(recoveries));
  const texts = await iterated;
  assert.equal(texts.at(-1), full);
  assert.deepEqual(errors, []);
});

test("a client joining mid-answer gets the answer so far at once (streaming), then the rest", async () => {
  const session = freshSession();
  const room = `session:${session}`;
  const chunks = answerChunks(20, "late");
  await publishChunks(session, "m1", chunks, 0, 9);
  const c = await connected();
  const { seen, latest } = watch(c, room);
  const joined = await c.rooms.join({ room });
  assert.equal(joined.streaming.length, 1, JSON.stringify(joined));
  const event = joined.streaming[0].params.data;
  assert.deepEqual([event.message_id, event.seq, event.last_seq, event.content], ["m1", 0, 9, textUpTo(chunks, 9)]);
  // given by the join's reply itself, before any later chunk is published
  assert.equal(latest.get("m1")?.text, textUpTo(chunks, 9));

  const late = [];
  c.messages(room, (m) => late.push(m)); // a feed made now gets the message in progress at once
  assert.deepEqual(late.map((m) => m.lastSeq), [9]);

  await publishChunks(session, "m1", chunks, 10, 19);
  await waitFor(() => latest.get("m1")?.done === true, 8000, "the last chunk");
  assert.equal(latest.get("m1").text, chunks.join(""));
  assertGrowing(seen, chunks.join(""));
});

test("recovered false: the answer so far comes back from streaming (seq 0 replaces); one that ended meanwhile is lost", async () => {
  const c = await connected({ backoff: { initialMs: 1000, maxMs: 1000, jitter: 0 } });
  const session = freshSession();
  const room = `session:${session}`;
  const a = answerChunks(30, "kept");
  const b = answerChunks(12, "ended");
  const recoveries = [];
  c.on("recovery", (r) => r.room === room && recoveries.push(r));
  const { seen, latest } = watch(c, room);
  await c.rooms.join({ room });
  await publishChunks(session, "a", a, 0, 9);
  await publishChunks(session, "b", b, 0, 4);
  await waitFor(() => latest.get("a")?.lastSeq === 9 && latest.get("b")?.lastSeq === 4, 5000, "the first chunks");

  await c.call("test.drop", {});
  await waitFor(() => c.state === "reconnecting", 3000, "the drop");
  // more events than the history keeps (UNREALON_HISTORY_SIZE 5): the rejoin cannot recover
  for (let i = 0; i < 8; i++) {
    await api("session.task_status", { session_id: session, task_id: `t${i}`, status: "running" });
  }
  await publishChunks(session, "a", a, 10, 19);
  await publishChunks(session, "b", b, 5, 11); // b ends while the client is away
  await waitFor(() => recoveries.length > 0, 8000, "the rejoin");
  assert.equal(recoveries[0].recovered, false);
  await waitFor(() => latest.get("a")?.lastSeq === 19, 3000, "a's text so far from streaming");
  assert.equal(latest.get("a").text, textUpTo(a, 19));
  const lostB = latest.get("b");
  assert.deepEqual([lostB.lost, lostB.done, lostB.text], [true, false, textUpTo(b, 4)]);

  await publishChunks(session, "a", a, 20, 29);
  await waitFor(() => latest.get("a")?.done === true, 8000, "a's last chunk");
  assert.equal(latest.get("a").text, a.join(""));
  assert.ok(!seen.some((m) => m.messageId === "a" && m.lost));
  assertGrowing(seen.filter((m) => m.messageId === "a"), a.join(""));
});

test("a message published whole, and one that ends in an error", async () => {
  const c = await connected();
  const session = freshSession();
  const room = `session:${session}`;
  const { seen } = watch(c, room);
  await c.rooms.join({ room });
  await api("session.message", { session_id: session, message_id: "q", role: "user", content: "What is 6 x 7?" });
  const chunks = ["It is ", "4", ""];
  await publishChunk(session, "e", chunks, 0);
  await publishChunk(session, "e", chunks, 1);
  await publishChunk(session, "e", chunks, 2, { error: "the model failed" });
  await waitFor(() => seen.some((m) => m.messageId === "e" && m.done), 5000, "the failed answer");
  const whole = seen.find((m) => m.messageId === "q");
  assert.deepEqual([whole.text, whole.done, whole.streamed, whole.lastSeq, whole.role], ["What is 6 x 7?", true, false, null, "user"]);
  const failed = seen.find((m) => m.messageId === "e" && m.done);
  assert.deepEqual([failed.text, failed.error, failed.lastSeq], ["It is 4", "the model failed", 2]);
});
