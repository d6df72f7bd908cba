// Helpers of the streamed-message tests (PROTOCOL.md section 5.1): an AI answer
// cut into chunks, published the way a backend does through the node's HTTP API
// (section 8: POST /api/session.message with an API key).
//
// Env (set by tests/test_clients_message_streams.py): UNREALON_TEST_API_URL (the
// node's HTTP listener, e.g. http://127.0.0.1:8766) and UNREALON_TEST_API_KEY.

/** The answer's chunks: `count` pieces whose concatenation is the full text. */
export function answerChunks(count, label = "answer") {
  return Array.from({ length: count }, (_, i) => `${label}-${i}${i % 7 === 6 ? ".\n" : " "}`);
}

let sessionCounter = 0;
/** A session id no other test uses (its room is session:<id>). */
export function freshSession(prefix = "s") {
  return `${prefix}-${process.pid}-${Date.now() % 100000}-${++sessionCounter}`;
}

/** POST /api/<method> with the test API key; resolves with the result, throws on an error status. */
export async function api(method, params) {
  const url = process.env.UNREALON_TEST_API_URL;
  const key = process.env.UNREALON_TEST_API_KEY;
  if (!url || !key) throw new Error("UNREALON_TEST_API_URL and UNREALON_TEST_API_KEY are required");
  const response = await fetch(`${url}/api/${method}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `apikey ${key}` },
    body: JSON.stringify(params),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(`${method}: HTTP ${response.status} ${JSON.stringify(body)}`);
  return body.result;
}

/** Publish chunk `seq` of message `messageId` (its text chunks[seq]); the last one with done. */
export function publishChunk(sessionId, messageId, chunks, seq, extra = {}) {
  return api("session.message", {
    session_id: sessionId,
    message_id: messageId,
    role: "assistant",
    content: chunks[seq],
    seq,
    done: seq === chunks.length - 1,
    ...extra,
  });
}

/** Publish chunks first..last (inclusive) one after the other. */
export async function publishChunks(sessionId, messageId, chunks, first, last) {
  for (let seq = first; seq <= last; seq++) await publishChunk(sessionId, messageId, chunks, seq);
}

/** The text of chunks 0..lastSeq. */
export function textUpTo(chunks, lastSeq) {
  return chunks.slice(0, lastSeq + 1).join("");
}
