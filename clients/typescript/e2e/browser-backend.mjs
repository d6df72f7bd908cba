// Browser test driver for the example's "Backend task" panel (run by
// tests/test_clients_browser.py against a node with Redis and a worker serving
// examples/backend_methods.py): click Run, progress shows, click Cancel,
// "cancelled" shows; then a short run to the end.  Prints one JSON line with
// what the DOM showed; exits non-zero on failure.
//
// Env: UNREALON_TEST_WS_URL / UNREALON_TEST_HTTP_URL (a node with Redis),
// CHROMIUM (default /usr/bin/chromium), UNREALON_TEST_SCREENSHOT (a PNG path).
import { runInBrowser } from "../testlib/browser-driver.mjs";

async function main() {
  const wsUrl = process.env.UNREALON_TEST_WS_URL;
  const httpUrl = process.env.UNREALON_TEST_HTTP_URL;
  await runInBrowser(async (page) => {
    const tokenUrl = `${httpUrl}/token?sub=alice&rooms=workspace:*&methods=demo.*`;
    const fragment = new URLSearchParams({ ws: wsUrl, tokenUrl, workspace: "42", delay: "0.05" });
    await page.goto(`${httpUrl}/examples/browser/index.html#${fragment}`);
    await page.waitForSelector('body[data-joined="workspace:42"]', { timeout: 10_000 });
    // the worker's declaration reaches the node within 2 s of its start: retry until it runs
    const status = () => page.$eval("#task-status", (el) => ({ state: el.dataset.state, text: el.textContent }));
    const end = Date.now() + 15_000;
    for (;;) {
      await page.fill("#task-to", "1000");
      await page.click("#task-run");
      await page.waitForFunction(() => document.getElementById("task-status").dataset.state !== "running"
        || document.getElementById("task-progress").value >= 3, null, { timeout: 10_000 });
      if ((await status()).state === "running") break;
      if (Date.now() > end) throw new Error(`the task never ran: ${JSON.stringify(await status())}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    const progressBeforeCancel = await page.$eval("#task-progress", (el) => el.value);
    const runningText = (await status()).text;
    await page.click("#task-cancel");
    await page.waitForSelector('#task-status[data-state="cancelled"]', { timeout: 2_000 });
    const cancelled = await status();
    const progressAtCancel = await page.$eval("#task-progress", (el) => el.value);
    await new Promise((r) => setTimeout(r, 300));
    const progressAfterCancel = await page.$eval("#task-progress", (el) => el.value);

    await page.fill("#task-to", "3");
    await page.click("#task-run");
    await page.waitForSelector('#task-status[data-state="done"]', { timeout: 10_000 });
    const done = await status();
    const progressDone = await page.$eval("#task-progress", (el) => [el.value, el.max]);
    return { progressBeforeCancel, runningText, cancelled, progressAtCancel, progressAfterCancel, done, progressDone };
  });
}

await main();
