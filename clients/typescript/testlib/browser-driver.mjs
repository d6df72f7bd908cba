// The frame of every browser test driver (e2e/browser*.mjs, run by the Python
// tests): Debian's Chromium headless through playwright-core, one page whose
// console and errors are collected, a screenshot when UNREALON_TEST_SCREENSHOT
// names a PNG path, and one JSON line on stdout: {ok: true, ...what the driver
// returned, logs} or {ok: false, error, logs} with a non-zero exit.
//
// Env: CHROMIUM (default /usr/bin/chromium), UNREALON_TEST_SCREENSHOT.
import { chromium } from "playwright-core";

const CHROMIUM_FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/**
 * Run `drive(page, logs)` in a fresh page and report as above; `cleanup` runs
 * before the browser closes, whatever happened.  Exits the process.
 */
export async function runInBrowser(drive, { cleanup = async () => {} } = {}) {
  const logs = [];
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: CHROMIUM_FLAGS,
    headless: true,
  });
  try {
    const page = await browser.newPage();
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
    const result = await drive(page, logs);
    if (process.env.UNREALON_TEST_SCREENSHOT) {
      await page.screenshot({ path: process.env.UNREALON_TEST_SCREENSHOT, fullPage: true });
    }
    console.log(JSON.stringify({ ok: true, ...result, logs }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: String(e && e.stack ? e.stack : e), logs }));
    process.exitCode = 1;
  } finally {
    await cleanup();
    await browser.close();
  }
  process.exit(process.exitCode ?? 0);
}
