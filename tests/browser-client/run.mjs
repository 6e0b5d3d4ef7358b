// Drives headless Chromium against a running middleman (started by tests/client_browser.rs):
//   node run.mjs http://127.0.0.1:PORT CLIENT_KEY SERVICE_KEY SCREENSHOT.png
// Prints "restart-now" and waits for "restarted" on stdin in the middle; prints
// "browser-client: N passed, 0 failed" and exits 0 when every check held. The page also
// runs checks.mjs (shared with node.mjs), and /demo is checked in a second page (its
// screenshot after joining goes to SCREENSHOT.png).
import { chromium } from "playwright-core";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import assert from "node:assert/strict";

const [base, key, serviceKey, screenshot] = process.argv.slice(2);
if (!base || !key || !serviceKey || !screenshot) {
  console.error("usage: node run.mjs http://127.0.0.1:PORT CLIENT_KEY SERVICE_KEY SCREENSHOT.png");
  process.exit(2);
}
const wsUrl = base.replace(/^http:/, "ws:") + "/";
const here = dirname(fileURLToPath(import.meta.url));
// checks.mjs has no imports, so it can follow page.js in the same inline module.
const pageScript =
  readFileSync(join(here, "page.js"), "utf8") + "\n" + readFileSync(join(here, "checks.mjs"), "utf8");
const stdinLines = createInterface({ input: process.stdin });
const nextStdinLine = () => new Promise((resolve) => stdinLines.once("line", resolve));

const userDataDir = mkdtempSync(join(tmpdir(), "mm-chromium-"));
let passed = 0;
const check = (name, fn) => {
  fn();
  passed++;
  console.log(`ok ${passed} ${name}`);
};

let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.MM_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 60000,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30000);
  page.on("console", (m) => console.error(`[page ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[page error] ${e.message}`));
  // A page of the server's own origin, so "/middleman.js" is the server's and the
  // WebSocket stays within the loopback address space.
  await page.goto(`${base}/healthz`);
  await page.addScriptTag({ type: "module", content: pageScript });
  await page.waitForFunction(() => window.ready === true);

  const cid = await page.evaluate(([u, k]) => window.steps.connect(u, k), [wsUrl, key]);
  check("connect gives a cid", () => assert.match(cid, /^[0-9a-z]+$/));

  const body = ".dot line\n..two\r\nlast.";
  const got = await page.evaluate((b) => window.steps.publishAndReceive(b), body);
  check("subscribe + publish round trip with all headers and exact body", () =>
    assert.deepEqual(got, {
      cmd: "PUB",
      target: "room",
      headers: [
        ["X-One", "1"],
        ["x-one", "again"],
        ["X-Two", "a b"],
        ["cid", cid],
        ["uid", ""],
      ],
      body,
    }),
  );

  const echo = await page.evaluate(() => window.steps.echo("hello\n.from the page"));
  check("request answered by the Rust service", () => {
    assert.equal(echo.cmd, "RES");
    assert.equal(echo.target, "echo");
    assert.equal(echo.body, "hello\n.from the page");
    assert.deepEqual(
      echo.headers.filter(([n]) => n !== "cid" && !/^reqid$/i.test(n)),
      [
        ["Trace-Seen", "t1"],
        ["uid", ""],
      ],
    );
    assert.ok(echo.headers.some(([n]) => n === "ReqID"));
  });

  const nr = await page.evaluate(() => window.steps.noResponder());
  check("no responder rejects with the server's reason", () =>
    assert.deepEqual(nr, {
      isError: true,
      isMiddlemanError: true,
      message: "no responder",
      reason: "no responder",
      cmd: "REQ",
      target: "nobody",
    }),
  );

  const poke = await page.evaluate(() => window.steps.poke("before"));
  check("messages from the service reach the subscription", () => {
    assert.equal(poke.res, "ok");
    assert.equal(poke.seen?.body, "poked:before");
  });

  // Server restart: the Rust test stops the server and starts a new one on the same port.
  console.log("restart-now");
  const answer = await nextStdinLine();
  assert.equal(answer, "restarted");
  const after = await page.evaluate((old) => window.steps.afterRestart(old), cid);
  check("reconnects with a new cid and re-subscribes", () => {
    assert.notEqual(after.cid, cid);
    assert.match(after.cid, /^[0-9a-z]+$/);
    assert.equal(after.poke.res, "ok");
    assert.ok(after.closes.length >= 1 && after.closes.every((c) => c.reconnecting));
    assert.equal(after.closes[0].code, 1001);
    assert.deepEqual(after.opens.at(-1), { cid: after.cid, reconnected: true });
  });
  const echo2 = await page.evaluate(() => window.steps.echo("again"));
  check("requests work after the restart", () => assert.equal(echo2.body, "again"));

  const errors = await page.evaluate(() => window.steps.errors());
  check("no server errors except retried re-subscriptions", () =>
    assert.deepEqual(
      errors.filter((e) => !(e.retrying && e.cmd === "SUB" && e.target === "room")),
      [],
    ),
  );
  const stillConnected = await page.evaluate(() => window.steps.close());
  check("close", () => assert.equal(stillConnected, false));

  const shared = await page.evaluate(
    ([u, k, sk]) => window.steps.shared(u, k, sk),
    [wsUrl, key, serviceKey],
  );
  for (const name of shared) check(name, () => {});
  check("every shared check ran", () => assert.equal(shared.length, 7));

  // The demo page: only the login form before joining, only the message form after.
  const demo = await context.newPage();
  demo.on("pageerror", (e) => console.error(`[demo error] ${e.message}`));
  await demo.goto(`${base}/demo?key=${encodeURIComponent(key)}`);
  const shown = async () => ({
    login: await demo.locator("#login").isVisible(),
    say: await demo.locator("#say").isVisible(),
    display: await demo.evaluate(() =>
      ["login", "say"].map((id) => getComputedStyle(document.getElementById(id)).display),
    ),
  });
  const before = await shown();
  check("demo before joining: login form only", () =>
    assert.deepEqual(before, { login: true, say: false, display: ["flex", "none"] }),
  );
  await demo.fill("#login input[name=name]", "tester");
  await demo.click("#login button");
  await demo.locator("#say").waitFor({ state: "visible" });
  await demo.locator("#log div").first().waitFor(); // "no history: ..." once the request failed
  const joined = await shown();
  await demo.screenshot({ path: screenshot, fullPage: true });
  check("demo after joining: message form only", () =>
    assert.deepEqual(joined, { login: false, say: true, display: ["none", "flex"] }),
  );
  await demo.close();

  console.log(`browser-client: ${passed} passed, 0 failed`);
} catch (e) {
  console.error(`browser-client: FAILED after ${passed} checks: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  stdinLines.close();
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
