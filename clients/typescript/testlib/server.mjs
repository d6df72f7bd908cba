// Shared helpers of the Node tests (kept out of test/, which node --test runs whole).
//
// The server: the trial test (tests/test_clients_node.py) starts one in-process and
// passes UNREALON_TEST_WS_URL and UNREALON_TEST_HTTP_URL; run by hand
// (`node --test clients/typescript/test/`), the tests start
// `python -m tests.helpers.testserver --history-size 50` themselves.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

import { UnrealonClient } from "../dist/index.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
let serverPromise = null;

export function server() {
  if (!serverPromise) serverPromise = findServer();
  return serverPromise;
}

async function findServer() {
  if (process.env.UNREALON_TEST_WS_URL && process.env.UNREALON_TEST_HTTP_URL) {
    return { wsUrl: process.env.UNREALON_TEST_WS_URL, httpUrl: process.env.UNREALON_TEST_HTTP_URL };
  }
  const venv = resolve(ROOT, ".venv/bin/python");
  const python = process.env.UNREALON_TEST_PYTHON ?? (existsSync(venv) ? venv : "python3");
  const child = spawn(python, ["-m", "tests.helpers.testserver", "--history-size", "50"], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "inherit"],
  });
  child.unref();
  process.on("exit", () => child.kill("SIGTERM"));
  const lines = createInterface({ input: child.stdout });
  const [line] = await once(lines, "line");
  lines.close();
  child.stdout.destroy();
  const info = JSON.parse(line);
  return { wsUrl: info.ws_url, httpUrl: info.http_url, child };
}

/** A connection token from the test server's /token (TEST ONLY endpoint). */
export async function mint({ sub = "alice", ttl = 300, rooms = ["*"], methods = null } = {}) {
  const { httpUrl } = await server();
  const query = new URLSearchParams({ sub, ttl: String(ttl), rooms: rooms.join(",") });
  if (methods) query.set("methods", methods.join(","));
  const response = await fetch(`${httpUrl}/token?${query}`);
  if (!response.ok) throw new Error(`token: HTTP ${response.status}`);
  return response.text();
}

/** A client with fast backoff; `user` options pass through to UnrealonClient. */
export async function client(options = {}, tokenOptions = {}) {
  const { wsUrl } = await server();
  const mints = { count: 0 };
  const c = new UnrealonClient({
    url: wsUrl,
    WebSocket,
    tokenProvider: async () => {
      mints.count++;
      return mint(tokenOptions);
    },
    backoff: { initialMs: 40, maxMs: 400 },
    callTimeoutMs: 5000,
    ...options,
  });
  c.mints = mints;
  c.states = [];
  c.on("state", (s) => c.states.push(s));
  return c;
}

/** Resolve when predicate() is true (polled), or fail after timeoutMs. */
export async function waitFor(predicate, timeoutMs = 5000, what = "condition") {
  const end = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** The next event `name` on client c, as [payload, meta]. */
export function nextEvent(c, name, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${name} within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = c.on(name, (payload, meta) => {
      clearTimeout(timer);
      off();
      resolve([payload, meta]);
    });
  });
}

let roomCounter = 0;
/** A room name no other test uses. */
export function freshRoom(prefix = "workspace") {
  return `${prefix}:${process.pid}-${Date.now() % 100000}-${++roomCounter}`;
}
