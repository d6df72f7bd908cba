// Browser test driver (run by tests/test_clients_browser.py): headless Chromium
// (Debian's, through playwright-core: no browser download) opens the example
// page served by the test server; another user joins, the "backend" publishes
// from a separate connection, and the page must show both.  Prints one JSON
// line with what the DOM showed; exits non-zero on failure.
//
// Env: UNREALON_TEST_WS_URL / UNREALON_TEST_HTTP_URL (else a test server is
// started), CHROMIUM (default /usr/bin/chromium), UNREALON_TEST_SCREENSHOT (a
// PNG path to save the final page to).
import WebSocket from "ws";

import { UnrealonClient } from "../dist/index.js";
import { runInBrowser } from "../testlib/browser-driver.mjs";
import { mint, server } from "../testlib/server.mjs";

async function main() {
  const { wsUrl, httpUrl } = await server();
  const workspace = "42";
  const room = `workspace:${workspace}`;
  const others = [];
  const cleanup = async () => others.forEach((c) => c.close());
  await runInBrowser(async (page) => {
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
    return { presenceWithBob, ...dom };
  }, { cleanup });
}

await main();
