// Drives middleman's /console in headless Chromium (run by tests/console_browser.rs).
//
//   node console.mjs http://127.0.0.1:PORT SCREENSHOT.png
//
// Protocol with the Rust test, one line each:
//   stdout "READY <json>"   the page is live; <json> is what it showed before any load
//   stdin  "LOADED <json>"  the test has connected its peers and is publishing; <json>
//                           holds what the page must come to show
//   stdout "RESULT <json>"  what the page showed under load (screenshot taken), exit 0
//   stdout "FAIL <why>"     exit 1
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const [base, screenshot] = process.argv.slice(2);
if (!base || !screenshot) {
  console.log("FAIL usage: node console.mjs BASE_URL SCREENSHOT");
  process.exit(1);
}
const fail = (why) => {
  console.log("FAIL " + why);
  process.exit(1);
};
const overall = setTimeout(() => fail("overall time limit (90 s) reached"), 90_000);

const stdinLines = createInterface({ input: process.stdin });
const nextStdinLine = () => new Promise((resolve, reject) => {
  stdinLines.once("line", resolve);
  stdinLines.once("close", () => reject(new Error("stdin closed")));
});

// "2.5k" -> 2500 (the page's number format).
const num = (s) => parseFloat(s) * ({ k: 1e3, M: 1e6 }[s.slice(-1)] || 1);

// What the page shows, read from the DOM and the canvas.
const read = (page) => page.evaluate(() => {
  const t = (id) => document.getElementById(id).textContent;
  const c = document.getElementById("chart");
  const rows = (id) => [...document.querySelectorAll(`#${id} tr`)].map((tr) =>
    [...tr.cells].map((td) => td.textContent));
  return {
    updates: Number(document.getElementById("status").dataset.updates || 0),
    status: t("status"),
    service: t("conn-service"), client: t("conn-client"), monitor: t("conn-monitor"),
    rate_in: t("rate-in"), rate_out: t("rate-out"),
    total_in: t("total-in"), total_out: t("total-out"),
    pending: t("pending"), subscriptions: t("subscriptions"), topics: t("topics"),
    grants: t("grants"), hist_topics: t("hist-topics"), config: t("config"),
    busiest: rows("busiest"), closes: rows("closes"),
    chart_points: Number(c.dataset.points), chart_max: Number(c.dataset.max),
    chart: c.toDataURL(),
  };
});

const userDataDir = mkdtempSync(join(tmpdir(), "mm-console-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 900 },
    timeout: 30_000,
  });
  const page = context.pages()[0] || await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const resp = await page.goto(base + "/console", { timeout: 15_000 });
  if (!resp || resp.status() !== 200) throw new Error("GET /console gave " + (resp && resp.status()));
  // Two polls of /stats rendered: the page is live.
  await page.waitForFunction(() => Number(document.getElementById("status").dataset.updates) >= 2,
    null, { timeout: 15_000 });
  const before = await read(page);
  console.log("READY " + JSON.stringify({ ...before, chart: undefined }));

  const want = JSON.parse((await nextStdinLine()).replace(/^LOADED /, ""));
  // Wait (bounded) until the page shows the load: the numbers and the chart move.
  const deadline = Date.now() + 30_000;
  let now;
  for (;;) {
    now = await read(page);
    const topRow = now.busiest[0] || [];
    const closes = Object.fromEntries(now.closes.map((r) => [r[0], r[1]]));
    const ok = now.service === String(want.service) && now.client === String(want.client)
      && now.pending === String(want.pending)
      && topRow[0] === want.topic && topRow[1] === String(want.subscribers)
      && closes["bad key"] === String(want.bad_key_closes)
      && num(now.rate_in) > 0 && num(now.rate_out) > 0
      && now.total_in !== before.total_in
      && now.chart !== before.chart && now.chart_max > before.chart_max
      && now.updates >= before.updates + 3;
    if (ok) break;
    if (Date.now() > deadline) {
      throw new Error("the page never showed the load: " +
        JSON.stringify({ ...now, chart: undefined }));
    }
    await page.waitForTimeout(250);
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  if (errors.length) throw new Error("page errors: " + errors.join(" | "));
  console.log("RESULT " + JSON.stringify({ ...now, chart: undefined, chart_changed: true }));
  await context.close();
  context = undefined;
} catch (e) {
  console.log("FAIL " + String((e && e.message) || e).replace(/\n/g, " "));
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(overall);
  stdinLines.close();
}
