// Drive the web example in headless Chromium (Debian's, via playwright-core) against a running gateway.
//
// Environment: E2E_PAGE_URL (the page), E2E_WEB_DIR (deploy/examples/web, whose node_modules has
// playwright-core), E2E_ARTIFACTS (screenshots go there), E2E_FORBIDDEN (JSON list of strings the page must
// never receive), E2E_EXPIRED_TOKEN (a JWT for carol that expired long ago), CHROMIUM (executable, default
// /usr/bin/chromium).
// Prints one JSON line with what it saw; exits 1 with a message on the first failed expectation.

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = process.env;
const require = createRequire(join(env.E2E_WEB_DIR, "package.json"));
const { chromium } = require("playwright-core");

const PAGE_URL = env.E2E_PAGE_URL;
const ARTIFACTS = env.E2E_ARTIFACTS;
const FORBIDDEN = JSON.parse(env.E2E_FORBIDDEN ?? "[]");
const EXPIRED_TOKEN = env.E2E_EXPIRED_TOKEN;
const STEP_TIMEOUT = 10_000;
const CHROMIUM_FLAGS = [
  "--no-sandbox",
  "--use-fake-ui-for-media-stream",
  "--use-fake-device-for-media-stream",
  "--disable-background-networking",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-component-update",
  "--disable-sync",
];

class Failure extends Error {}

function expect(condition, message) {
  if (!condition) throw new Failure(message);
}

// Progress goes to stderr, so a failure says how far the flow got.
function step(message) {
  process.stderr.write(`[browser flow ${new Date().toISOString().slice(11, 23)}] ${message}\n`);
}

// The page whose error box a timeout reports: what the user would have seen explains most failures.
let watched = null;

async function until(check, message, timeout = STEP_TIMEOUT) {
  step(`waiting for ${message}`);
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) {
      const shown = watched ? await watched.textContent("#error", { timeout: 1000 }).catch(() => "") : "";
      throw new Failure(`timed out: ${message}${shown ? ` (the page says: ${shown})` : ""}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// Everything the page receives: every HTTP response (status, headers, body) and every WebSocket frame.
function record(page, received, problems, expectedFailures = new Set()) {
  const pending = [];
  page.on("response", (response) => {
    pending.push(
      (async () => {
        const headers = await response.allHeaders().catch(() => ({}));
        // A body the page never reads may never finish loading: give up on it loudly rather than hang.
        const body = await Promise.race([
          response.body().catch(() => Buffer.alloc(0)),
          new Promise((_, reject) => {
            setTimeout(() => reject(new Failure(`no body for ${response.url()}`)), STEP_TIMEOUT).unref();
          }),
        ]);
        received.push({
          kind: "http",
          url: response.url(),
          status: response.status(),
          headers,
          text: `${JSON.stringify(headers)}\n${body.toString("latin1")}`,
        });
      })(),
    );
  });
  page.on("websocket", (socket) => {
    received.push({ kind: "websocket", url: socket.url(), text: socket.url() });
    socket.on("framereceived", ({ payload }) => {
      received.push({ kind: "frame", url: socket.url(), text: String(payload) });
    });
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    // Chromium logs every 4xx a page fetches; only the failures a test provokes on purpose are not problems.
    const provoked = /status of 4\d\d/.test(message.text()) && expectedFailures.has(message.location().url);
    if (message.type() === "error" && !provoked) problems.push(`console error: ${message.text()}`);
  });
  return () => Promise.all(pending);
}

async function signIn(page, user) {
  watched = page;
  await page.goto(PAGE_URL);
  await page.waitForSelector("body[data-ready=true]");
  await page.fill("#user", user);
  await page.click("#dev-token");
  await until(async () => (await page.inputValue("#token")).length > 20, `a dev token for ${user}`);
  await page.click("#sign-in");
  await until(async () => (await page.textContent("#who")) === `Signed in as ${user}`, `signed in as ${user}`);
  await waitForList(page);
}

async function waitForList(page) {
  await until(async () => {
    const text = await page.textContent("#history-status");
    return text !== "" && text !== "Loading…";
  }, "the conversation list");
}

async function listedIds(page) {
  return page.$$eval("#conversations tbody tr", (rows) => rows.map((row) => row.dataset.id));
}

async function messages(page, role) {
  return page.$$eval(`#messages li.${role}`, (items) => items.map((item) => item.textContent));
}

async function converse(page, mode) {
  await page.check(`input[name=mode][value=${mode}]`);
  await page.click("#start");
  await until(async () => (await page.textContent("#status")) === "connected", `${mode} session connected`);
  const id = await page.textContent("#conversation-id");
  expect(/^conv_[0-9a-z]{26}$/.test(id), `a conversation id is shown, got ${id}`);
  if (mode === "text") {
    await page.fill("#message", "Where is my order?");
    await page.click("#send");
    await until(
      async () => (await messages(page, "agent")).some((text) => text.includes("You said: Where is my order?")),
      "the agent's text reply",
    );
  } else {
    // The fake microphone streams audio; the emulator answers every second of it with a transcript and a reply.
    await until(
      async () => (await messages(page, "agent")).some((text) => text.includes("seconds of audio")),
      "the agent's reply to the microphone audio",
    );
    const heard = await messages(page, "user");
    expect(heard.some((text) => text.includes("s of speech")), `a user transcript is shown, got ${heard}`);
  }
  await page.click("#end");
  await until(async () => (await page.textContent("#status")) === "disconnected", `${mode} session ended`);
  return id;
}

async function rowState(page, id) {
  return page
    .locator(`#conversations tr[data-id="${id}"] td.state`)
    .textContent({ timeout: 500 })
    .catch(() => null);
}

async function feedback(page, id, score) {
  await page.click(`#conversations tr[data-id="${id}"] button.feedback.${score}`);
  await until(
    async () => (await page.textContent(`#conversations tr[data-id="${id}"] .recorded`)) === score,
    `feedback ${score} on ${id} read back through the gateway`,
  );
}

// A headless Chromium on a fresh --user-data-dir of its own (launchPersistentContext passes it): each user gets
// a separate browser, so nothing (storage, cookies, cache) can carry over from one to the other.
async function openBrowser(profiles, viewport) {
  const profile = mkdtempSync(join(tmpdir(), "convai-e2e-chromium-"));
  profiles.push(profile);
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: CHROMIUM_FLAGS,
    permissions: ["microphone"],
    viewport,
  });
  context.setDefaultTimeout(STEP_TIMEOUT);
  return context;
}

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const profiles = [];
  const contexts = [];
  const received = [];
  const problems = [];
  const result = {};
  try {
    const context = await openBrowser(profiles, { width: 1100, height: 900 });
    contexts.push(context);
    const alice = context.pages()[0] ?? (await context.newPage());
    const flushAlice = record(alice, received, problems);
    await signIn(alice, "alice");
    const textId = await converse(alice, "text");
    const voiceId = await converse(alice, "voice");
    // The page refreshes its list when a call ends; upstream marks the call done a moment after the close.
    await until(async () => {
      await alice.click("#refresh");
      await waitForList(alice);
      return (await rowState(alice, textId)) === "done" && (await rowState(alice, voiceId)) === "done";
    }, "both new conversations listed as done");
    await feedback(alice, textId, "like");
    await feedback(alice, voiceId, "dislike");
    await alice.screenshot({ path: join(ARTIFACTS, "web-example.png"), fullPage: true });
    result.alice = { textId, voiceId, listed: await listedIds(alice) };

    // Bob, in a fresh browser of his own, sees only his history and cannot touch alice's.
    const other = await openBrowser(profiles, { width: 1100, height: 700 });
    contexts.push(other);
    const bob = other.pages()[0] ?? (await other.newPage());
    const probe = new URL(`/v1/convai/conversations/${textId}/feedback`, await alice.textContent("#gateway-url"));
    const flushBob = record(bob, received, problems, new Set([probe.href]));
    await signIn(bob, "bob");
    result.bob = { listed: await listedIds(bob) };
    // The token lives in the page's memory only: not in the DOM, where the browser's form restoration would keep
    // it in session history (and on disk, for session restore) and hand it back to a page loaded later.
    result.bob.tokenInDom = await bob.inputValue("#token");
    step("bob leaves the page and comes back");
    await bob.goto("about:blank");
    await bob.goBack();
    await bob.waitForSelector("body[data-ready=true]");
    result.bob.tokenAfterBack = await bob.inputValue("#token");
    expect(result.bob.tokenInDom === "", "the signed-in page keeps the token in the DOM (#token)");
    expect(result.bob.tokenAfterBack === "", "the token came back into the page after navigating away and back");
    await signIn(bob, "bob");
    step("bob tries to send feedback on alice's conversation");
    result.bob.feedbackOnAlices = await bob.evaluate(async (url) => {
      const { token } = await (await fetch("dev-token?sub=bob")).json();
      const response = await fetch(url, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
        body: JSON.stringify({ feedback: "dislike" }),
      });
      return { status: response.status, body: await response.json() };
    }, probe.href);

    // Carol's token expired long ago (as any token does while its page stays open): the page must drop it and
    // ask for a new sign-in, not keep saying "Signed in" while every call is refused.
    step("carol signs in with an expired token");
    const carol = await other.newPage();
    watched = carol;
    const listUrl = new URL("/v1/convai/conversations?page_size=20", probe).href;
    const flushCarol = record(carol, received, problems, new Set([listUrl]));
    await carol.goto(PAGE_URL);
    await carol.waitForSelector("body[data-ready=true]");
    await carol.fill("#token", EXPIRED_TOKEN);
    await carol.click("#sign-in");
    const shown = await until(() => carol.textContent("#error"), "the page to report the refused token");
    result.carol = { error: shown, who: await carol.textContent("#who") };
    expect(result.carol.who === "Signed out", `an expired token leaves the page signed out, got ${result.carol.who}`);
    expect(/sign in again/i.test(shown), `the page asks for a new sign-in, got ${shown}`);
    await carol.close();
    watched = bob;

    step("screenshot of bob's page");
    await bob.screenshot({ path: join(ARTIFACTS, "web-example-bob.png"), fullPage: true });
    step("collecting every response body the pages received");
    await Promise.all([flushAlice(), flushBob(), flushCarol()]);
    step("scanning them");

    const leaks = [];
    for (const item of received) {
      for (const secret of FORBIDDEN) {
        if (item.text.toLowerCase().includes(secret.toLowerCase())) leaks.push(`${secret} in ${item.kind} ${item.url}`);
      }
    }
    const pageOrigin = new URL(PAGE_URL).origin;
    result.received = {
      http: received.filter((item) => item.kind === "http").length,
      frames: received.filter((item) => item.kind === "frame").length,
      websockets: received.filter((item) => item.kind === "websocket").map((item) => new URL(item.url).host),
      corsAllowed: received.filter((item) => item.headers?.["access-control-allow-origin"] === pageOrigin).length,
      frameTypes: [...new Set(received.filter((i) => i.kind === "frame").map((i) => JSON.parse(i.text).type))].sort(),
    };
    result.leaks = leaks;
    result.problems = problems;
    expect(leaks.length === 0, `secrets reached the page: ${leaks.join("; ")}`);
    expect(problems.length === 0, `the page reported errors: ${problems.join("; ")}`);
    console.log(JSON.stringify(result));
  } finally {
    await Promise.all(contexts.map((context) => context.close().catch(() => {})));
    for (const profile of profiles) rmSync(profile, { recursive: true, force: true });
  }
}

const watchdog = setTimeout(() => {
  console.error("browser flow: gave up after 50 s");
  process.exit(1);
}, 50_000);
try {
  await main();
} catch (error) {
  console.error(error instanceof Failure ? `browser flow failed: ${error.message}` : error);
  process.exitCode = 1;
} finally {
  clearTimeout(watchdog);
}
