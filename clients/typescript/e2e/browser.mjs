// Browser test driver (run by tests/test_clients_browser.py): headless Chromium
// (Debian's, through playwright-core: no browser download) opens the example
// page served by the test server; another user joins, the "backend" publishes
// from a separate connection, and the page must show both.  Prints one JSON
// line with what the DOM showed; exits non-zero on failure.
//
// Env: UNREALON_TEST_WS_URL / UNREALON_TEST_HTTP_URL (else a test server is
// started), CHROMIUM (default /usr/bin/chromium), UNREALON_TEST_SCREENSHOT (a
// PNG path to save the final page to).
import { chromium } from "playwright-core";
import WebSocket from "ws";

import { UnrealonClient } from "../dist/index.js";
import { mint, server } from "../testlib/server.mjs";

const CHROMIUM_FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

async function main() {
  const { wsUrl, httpUrl } = await server();
  const workspace = "42";
  const room = `workspace:${workspace}`;
  const logs = [];
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: CHROMIUM_FLAGS,
    headless: true,
  });
  const others = [];
  try {
    const page = await browser.newPage();
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
    // the page fetches its tokens from the test server (tokenProvider pattern)
    const tokenUrl = `${httpUrl}/token?sub=alice&rooms=workspace:*`;
    const fragment = new URLSearchParams({ ws: wsUrl, tokenUrl, workspace });
    await page.goto(`${httpUrl}/examples/browser/index.html#${fragment}`);
    await page.waitForSelector(`body[data-joined="${room}"]`, { timeout: 10_000 });
    await page.waitForSelector('#presence li[data-user="alice"]');

    const connect = async (sub) => {
      const c = new UnrealonClient({ url: wsUrl, WebSocket, tokenProvider: () => mint({ sub }) });
      others.push(c);
      await c.connect();
      return c;
    };
    const bob = await connect("bob");
    await bob.rooms.join({ room });
    await page.waitForSelector('#presence li[data-user="bob"]', { timeout: 5_000 });
    const presenceWithBob = await page.$$eval("#presence li", (lis) => lis.map((li) => li.textContent));

    const backend = await connect("backend");
    await backend.call("test.publish", {
      room,
      event: "workspace.file_changed",
      data: { workspace_id: workspace, path: "src/main.py", change: "modified" },
    });
    await page.waitForSelector('#events li[data-event="workspace.file_changed"]', { timeout: 5_000 });

    await bob.rooms.leave({ room });
    await page.waitForSelector('#presence li[data-user="bob"]', { state: "detached", timeout: 5_000 });

    const dom = await page.evaluate(() => ({
      status: document.getElementById("status").textContent,
      state: document.getElementById("status").dataset.state,
      presence: [...document.querySelectorAll("#presence li")].map((li) => li.dataset.user),
      events: [...document.querySelectorAll("#events li")].map((li) => ({
        event: li.dataset.event,
        text: li.textContent,
      })),
    }));
    if (process.env.UNREALON_TEST_SCREENSHOT) {
      await page.screenshot({ path: process.env.UNREALON_TEST_SCREENSHOT, fullPage: true });
    }
    console.log(JSON.stringify({ ok: true, presenceWithBob, ...dom, logs }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: String(e && e.stack ? e.stack : e), logs }));
    process.exitCode = 1;
  } finally {
    others.forEach((c) => c.close());
    await browser.close();
  }
}

await main();
process.exit(process.exitCode ?? 0);
