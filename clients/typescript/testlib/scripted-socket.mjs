// An in-memory WebSocket a test plays the server of, for runtime tests that
// need no node: it opens at once, answers auth.authenticate, records every
// request the client sends, and pushes what the test scripts.  Subclasses
// answer other methods (`answer`) and add the server's moves they need.

export class ScriptedSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.({});
    }, 0);
  }
  send(text) {
    const msg = JSON.parse(text);
    this.sent.push(msg);
    if (msg.method === "auth.authenticate") {
      this.push({ id: msg.id, result: { user_id: "alice", expires_at: Date.now() / 1000 + 3600 } });
    } else {
      this.answer(msg);
    }
  }
  /** A request other than auth.authenticate: nothing unless a subclass answers it. */
  answer(_msg) {}
  /** The server sends `obj` (a JSON-RPC message without its "jsonrpc" member). */
  push(obj) {
    setTimeout(() => this.onmessage?.({ data: JSON.stringify({ jsonrpc: "2.0", ...obj }) }), 0);
  }
  close() {
    this.readyState = 3;
  }
}
