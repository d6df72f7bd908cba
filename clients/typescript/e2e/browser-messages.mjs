// Browser test driver for the example's "Assistant" panel (run by
// tests/test_clients_message_streams.py against a node with Redis and its HTTP
// API on): the backend streams an answer into session:<id>; the page shows it
// growing; the page is reloaded mid-answer and must show the answer so far as
// soon as it has joined (the join's `streaming`), before any later chunk; the
// test then closes the page's WebSocket mid-answer (Playwright's routeWebSocket
// sits between page and node) while chunks keep coming, and the page must end
// with exactly the full text.  Every text the panel showed is recorded (a
// MutationObserver) so that a repeat or a disorder shows.  Prints one JSON line
// with what the DOM showed; exits non-zero on failure.
//
// Env: UNREALON_TEST_WS_URL, UNREALON_TEST_HTTP_URL, UNREALON_TEST_API_URL,
// UNREALON_TEST_API_KEY, CHROMIUM (default /usr/bin/chromium),
// UNREALON_TEST_SCREENSHOT (a PNG path).
import { answerChunks, freshSession, publishChunks, textUpTo } from "../testlib/answers.mjs";
import { runInBrowser } from "../testlib/browser-driver.mjs";

/** Installed before the page's scripts: records every text the answer shows. */
function recordAnswerTexts() {
  window.answerTexts = [];
  const record = () => {
    const text = document.querySelector('#answers article[data-message-id="m1"] .text');
    if (text && window.answerTexts.at(-1) !== text.textContent) window.answerTexts.push(text.textContent);
  };
  new MutationObserver(record).observe(document, { subtree: true, childList: true, characterData: true });
}

async function main() {
  const wsUrl = process.env.UNREALON_TEST_WS_URL;
  const httpUrl = process.env.UNREALON_TEST_HTTP_URL;
  await runInBrowser(async (page) => {
    await page.addInitScript(recordAnswerTexts);
    // every WebSocket of the page goes through here, so the test can close one,
    // and keep the page away (each attempt closed at once) while chunks come
    const sockets = [];
    let refuse = false;
    let refused = 0;
    await page.routeWebSocket(/\/ws$/, (ws) => {
      if (refuse) {
        refused++;
        void ws.close({ code: 4000, reason: "refused by the test" });
        return;
      }
      ws.connectToServer();
      sockets.push(ws);
    });

    const session = freshSession("browser");
    const room = `session:${session}`;
    const chunks = answerChunks(40, "browser");
    const full = chunks.join("");
    const tokenUrl = `${httpUrl}/token?sub=alice&rooms=workspace:*,session:*`;
    const fragment = new URLSearchParams({ ws: wsUrl, tokenUrl, workspace: "42", session });
    const answerText = () => page.$eval('#answers article[data-message-id="m1"] .text', (el) => el.textContent).catch(() => null);
    const answerState = () => page.$eval('#answers article[data-message-id="m1"]', (el) => el.dataset.state).catch(() => null);
    const waitForText = (text, timeout = 8_000) =>
      page.waitForFunction((t) => document.querySelector('#answers article[data-message-id="m1"] .text')?.textContent === t, text, { timeout });

    await page.goto(`${httpUrl}/examples/browser/index.html#${fragment}`);
    await page.waitForSelector(`body[data-session="${room}"]`, { timeout: 10_000 });
    await publishChunks(session, "m1", chunks, 0, 9);
    await waitForText(textUpTo(chunks, 9));
    const textsBeforeReload = await page.evaluate(() => window.answerTexts);

    await page.reload();
    await page.waitForSelector(`body[data-session="${room}"]`, { timeout: 10_000 });
    // no chunk was published since: this text came with the join's reply
    const textAtJoin = await answerText();
    const stateAtJoin = await answerState();

    await publishChunks(session, "m1", chunks, 10, 19);
    await waitForText(textUpTo(chunks, 19));
    const socketsBeforeDrop = sockets.length;
    refuse = true;
    await sockets.at(-1).close({ code: 4000, reason: "closed by the test" });
    await page.waitForSelector('#status[data-state="reconnecting"]', { timeout: 5_000 });
    await publishChunks(session, "m1", chunks, 20, 29); // while the page is away: the rejoin's missed
    for (const end = Date.now() + 5_000; refused === 0 && Date.now() < end;) await new Promise((r) => setTimeout(r, 20));
    const textWhileAway = await answerText();
    refuse = false;
    await page.waitForSelector('#status[data-state="open"]', { timeout: 10_000 });
    await publishChunks(session, "m1", chunks, 30, 39);
    await page.waitForSelector('#answers article[data-message-id="m1"][data-state="done"]', { timeout: 10_000 });

    const dom = await page.evaluate(() => ({
      texts: window.answerTexts,
      answers: [...document.querySelectorAll("#answers article")].map((a) => ({
        id: a.dataset.messageId,
        state: a.dataset.state,
        role: a.querySelector(".role").textContent,
        text: a.querySelector(".text").textContent,
        note: a.querySelector(".note").textContent,
      })),
      status: document.getElementById("status").dataset.state,
    }));
    return {
      full, textBeforeReload: textUpTo(chunks, 9), textsBeforeReload, textAtJoin, stateAtJoin,
      textWhileAway, socketsBeforeDrop, sockets: sockets.length, refused, ...dom,
    };
  });
}

await main();
