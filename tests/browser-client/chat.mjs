// Drives the chat example (examples/chat: index.html + chat.js, served by service.py) in
// headless Chromium, three pages against one server and one service (started by
// tests/chat_example.rs):
//   node chat.mjs http://127.0.0.1:HTTP_PORT/ ws://127.0.0.1:PORT/ CLIENT_KEY SCREENSHOT.png
// Prints "ok N <check>" per check and "chat-example: N passed, 0 failed" at the end, and
// exits 0 when every check held (an assertion or a timeout ends it with an error).
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join as pathJoin } from "node:path";
import assert from "node:assert/strict";

const [pageBase, wsUrl, key, screenshot] = process.argv.slice(2);
if (!pageBase || !wsUrl || !key || !screenshot) {
  console.error("usage: node chat.mjs http://127.0.0.1:HTTP_PORT/ ws://127.0.0.1:PORT/ CLIENT_KEY SCREENSHOT.png");
  process.exit(2);
}

let passed = 0;
/** Count a check whose assertions (made before the call) held. */
const ok = (name) => {
  passed++;
  console.log(`ok ${passed} ${name}`);
};

const room = (name) => `section.room[data-room="${name}"]`;

async function open(context, label) {
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.on("console", (m) => console.error(`[${label} ${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => console.error(`[${label} error] ${e.message}`));
  const url = new URL(pageBase);
  url.searchParams.set("server", wsUrl);
  url.searchParams.set("key", key);
  await page.goto(url.href);
  await page.waitForFunction(() => window.chat?.ready === true);
  return page;
}

async function setStatus(page, text) {
  await page.evaluate((t) => (document.getElementById("status").textContent = t), text);
}

/** Fill in the join form and submit it; resolves once the status line changed. */
async function join(page, nick, name, invite = "") {
  await setStatus(page, "");
  await page.fill("#join [name=nick]", nick);
  await page.fill("#join [name=room]", name);
  await page.fill("#join [name=invite]", invite);
  await page.click("#join button");
  await page.waitForFunction(() => document.getElementById("status").textContent !== "");
  return page.textContent("#status");
}

async function say(page, name, text) {
  await page.fill(`${room(name)} .say [name=text]`, text);
  await page.click(`${room(name)} .say button`);
}

const texts = (page, sel) => page.$$eval(sel, (els) => els.map((e) => e.textContent));
const log = (page, name) => texts(page, `${room(name)} .log li`);
const members = (page, name) => texts(page, `${room(name)} .members li`);

/** Wait until the room's log holds `line`. */
async function waitLine(page, name, line) {
  await page.waitForFunction(
    ([sel, l]) => [...document.querySelectorAll(sel)].some((li) => li.textContent === l),
    [`${room(name)} .log li`, line],
  );
}

/** Wait until the room's log holds `line` `n` times. */
async function waitLines(page, name, line, n) {
  await page.waitForFunction(
    ([sel, l, k]) => [...document.querySelectorAll(sel)].filter((li) => li.textContent === l).length === k,
    [`${room(name)} .log li`, line, n],
  );
}

/** Wait until the room's member list is exactly `want` (in any order); returns it. */
async function waitMembers(page, name, want) {
  const sorted = [...want].sort();
  await page.waitForFunction(
    ([sel, w]) => JSON.stringify([...document.querySelectorAll(sel)].map((li) => li.textContent).sort()) === w,
    [`${room(name)} .members li`, JSON.stringify(sorted)],
  );
  return (await members(page, name)).sort();
}

const userDataDir = mkdtempSync(pathJoin(tmpdir(), "mm-chat-chromium-"));
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
  const a = await open(context, "alice");
  const b = await open(context, "bob");

  // --- join and talk in a public room
  assert.equal(await join(a, "alice", "lobby"), "joined lobby as alice");
  await waitLine(a, "lobby", "alice joined");
  assert.deepEqual(await waitMembers(a, "lobby", ["alice"]), ["alice"]);
  ok("alice joins the lobby: her join notice, herself in the member list");
  assert.equal(await join(b, "bob", "lobby"), "joined lobby as bob");
  assert.deepEqual(await waitMembers(b, "lobby", ["alice", "bob"]), ["alice", "bob"]);
  await waitLine(a, "lobby", "bob joined");
  assert.deepEqual(await waitMembers(a, "lobby", ["alice", "bob"]), ["alice", "bob"]);
  ok("alice sees bob join and both members");

  await say(a, "lobby", "hello from alice");
  await waitLine(b, "lobby", "alice: hello from alice");
  await waitLine(a, "lobby", "alice: hello from alice"); // her own, back from the server
  ok("alice's message reaches bob, under her nickname");
  await say(b, "lobby", "hi alice");
  await waitLine(a, "lobby", "bob: hi alice");
  await waitLine(b, "lobby", "bob: hi alice");
  ok("bob's answer reaches alice");

  // --- a private room: alice creates it, bob joins with the invite code
  assert.equal(await join(a, "alice", "private-ab"), "joined private-ab as alice");
  const code = await a.evaluate(() => window.chat.rooms.get("private-ab").invite);
  assert.match(code, /^[A-Za-z0-9_-]{12}$/);
  assert.equal(await a.textContent(`${room("private-ab")} .invite`), `invite code: ${code}`);
  ok("the private room's creator gets an invite code, shown on her page");

  const c = await open(context, "carol");
  assert.equal(await join(c, "carol", "private-ab"), "join private-ab refused: not invited");
  assert.equal(await join(c, "carol", "private-ab", "wrong-code"), "join private-ab refused: not invited");
  assert.equal(await c.$(room("private-ab")), null);
  ok("carol cannot join the private room without the code, nor with a wrong one");

  assert.equal(await join(b, "bob", "private-ab", code), "joined private-ab as bob");
  assert.deepEqual(await waitMembers(b, "private-ab", ["alice", "bob"]), ["alice", "bob"]);
  assert.deepEqual(await waitMembers(a, "private-ab", ["alice", "bob"]), ["alice", "bob"]);
  ok("bob joins with the code; both member lists show alice and bob");

  // carol goes around the service: the server refuses her (no grant).
  const sub = await c.evaluate(async () => {
    try {
      await window.chat.mm.subscribe("room.private-ab");
      return "subscribed";
    } catch (e) {
      return `${e.reason} ${e.cmd} ${e.target}`;
    }
  });
  assert.equal(sub, "not permitted SUB room.private-ab");
  ok("the server refuses carol's own SUB of the private room");
  await c.evaluate(() => {
    window.chat.mm.publish("room.private-ab", "intrusion");
    window.chat.mm.send("INT", "SUB", "", { forcid: window.chat.cid, topic: "room.private-ab" });
  });
  await c.waitForFunction(() => window.chat.errors.length >= 2);
  assert.deepEqual(await c.evaluate(() => window.chat.errors), [
    { reason: "not permitted", cmd: "PUB", target: "room.private-ab" },
    { reason: "not permitted", cmd: "INT", target: "SUB" },
  ]);
  ok("the server refuses carol's PUB to the private room and her INT SUB");
  const listed = await c.evaluate(async () => {
    const res = await window.chat.mm.request("chat.members", "", { headers: { room: "private-ab" } });
    return res.header("error") ?? res.body;
  });
  assert.equal(listed, "not in the room");
  ok("the service does not list the private room's members to carol");

  await say(a, "private-ab", "secret for bob");
  await waitLine(b, "private-ab", "alice: secret for bob");
  await waitLine(a, "private-ab", "alice: secret for bob");
  await say(b, "private-ab", "got it");
  await waitLine(a, "private-ab", "bob: got it");
  await waitLine(b, "private-ab", "bob: got it");
  // A round trip through the server for carol, after bob and alice got both messages.
  await c.evaluate(() => window.chat.mm.request("chat.members", "", { headers: { room: "lobby" } }));
  const carolGot = await c.evaluate(() => window.chat.received.map((m) => m.target));
  assert.deepEqual(carolGot, []);
  ok("carol receives nothing of the private room");
  assert.deepEqual(await log(b, "private-ab"), ["bob joined", "alice: secret for bob", "bob: got it"]);
  assert.deepEqual(await log(a, "private-ab"), [
    "alice joined",
    "bob joined",
    "alice: secret for bob",
    "bob: got it",
  ]);
  ok("the private room's logs are exact (no intrusion)");

  // --- carol joins the lobby and leaves it (REQ chat.leave: INT UNS + grants withdrawn)
  assert.equal(await join(c, "carol", "lobby"), "joined lobby as carol");
  await waitLine(a, "lobby", "carol joined");
  assert.deepEqual(await waitMembers(a, "lobby", ["alice", "bob", "carol"]), ["alice", "bob", "carol"]);
  assert.deepEqual(await waitMembers(c, "lobby", ["alice", "bob", "carol"]), ["alice", "bob", "carol"]);
  await say(c, "lobby", "hello both");
  await waitLine(b, "lobby", "carol: hello both");
  await waitLine(a, "lobby", "carol: hello both");
  ok("carol joins the public lobby and talks there");
  await setStatus(c, "");
  await c.click(`${room("lobby")} .leave`);
  await c.waitForFunction(() => document.getElementById("status").textContent !== "");
  assert.equal(await c.textContent("#status"), "left lobby");
  assert.equal(await c.$(room("lobby")), null);
  await waitLine(a, "lobby", "carol left");
  await waitLine(b, "lobby", "carol left");
  assert.deepEqual(await waitMembers(a, "lobby", ["alice", "bob"]), ["alice", "bob"]);
  ok("carol leaves: both see 'carol left', the list is back to two");
  const after = await c.evaluate(async () => {
    window.chat.mm.publish("room.lobby", "still here?");
    try {
      await window.chat.mm.subscribe("room.lobby");
      return "subscribed";
    } catch (e) {
      return e.reason;
    }
  });
  await c.waitForFunction(() => window.chat.errors.length >= 3);
  assert.equal(after, "not permitted");
  assert.deepEqual((await c.evaluate(() => window.chat.errors)).slice(2), [
    { reason: "not permitted", cmd: "PUB", target: "room.lobby" },
  ]);
  ok("after leaving, carol's grants are gone: her PUB and SUB of the lobby are refused");

  // --- carol joins again, then unsubscribes by herself (a plain UNS): the service hears
  // SYS:UNS, tells the room and withdraws her grants.
  assert.equal(await join(c, "carol", "lobby"), "joined lobby as carol");
  assert.deepEqual(await waitMembers(a, "lobby", ["alice", "bob", "carol"]), ["alice", "bob", "carol"]);
  await c.evaluate(() => window.chat.mm.send("UNS", "room.lobby"));
  await waitLines(a, "lobby", "carol left", 2);
  assert.deepEqual(await waitMembers(a, "lobby", ["alice", "bob"]), ["alice", "bob"]);
  await c.evaluate(() => window.chat.mm.publish("room.lobby", "after my UNS"));
  await c.waitForFunction(() => window.chat.errors.length >= 4);
  assert.deepEqual((await c.evaluate(() => window.chat.errors)).slice(3), [
    { reason: "not permitted", cmd: "PUB", target: "room.lobby" },
  ]);
  ok("carol's own UNS: 'carol left' (SYS:UNS), and her grants are withdrawn");

  // --- bob closes his page: SYS:DISCONNECT, "bob left" in both rooms
  assert.deepEqual(await b.evaluate(() => window.chat.errors), []);
  await b.close();
  await waitLine(a, "lobby", "bob left");
  await waitLine(a, "private-ab", "bob left");
  assert.deepEqual(await waitMembers(a, "lobby", ["alice"]), ["alice"]);
  assert.deepEqual(await waitMembers(a, "private-ab", ["alice"]), ["alice"]);
  ok("bob closes his page: alice sees 'bob left' in both rooms, alone in the lists");
  // The notices' reasons: carol by request, bob by SYS:DISCONNECT (his page's socket
  // closed normally).
  const reasons = await a.$$eval(`${room("lobby")} .log li.notice`, (els) =>
    els.map((e) => [e.textContent, e.title]),
  );
  assert.deepEqual(reasons, [
    ["alice joined", ""],
    ["bob joined", ""],
    ["carol joined", ""],
    ["carol left", "left"],
    ["carol joined", ""],
    ["carol left", "unsubscribed"],
    ["bob left", "normal"],
  ]);
  ok("the leave notices carry their reasons: left (request), unsubscribed (UNS), normal (closed)");

  assert.deepEqual(await log(a, "lobby"), [
    "alice joined",
    "bob joined",
    "alice: hello from alice",
    "bob: hi alice",
    "carol joined",
    "carol: hello both",
    "carol left",
    "carol joined",
    "carol left",
    "bob left",
  ]);
  assert.deepEqual(await log(a, "private-ab"), [
    "alice joined",
    "bob joined",
    "alice: secret for bob",
    "bob: got it",
    "bob left",
  ]);
  assert.deepEqual(await a.evaluate(() => window.chat.errors), []);
  ok("alice's logs are exact and she had no error");
  await a.screenshot({ path: screenshot, fullPage: true });
  console.log(`chat-example: ${passed} passed, 0 failed`);
} catch (e) {
  // What each page had, for the failure's report.
  for (const page of (context?.pages() ?? []).filter((p) => p.url() !== "about:blank")) {
    const state = await page
      .evaluate(() => ({
        cid: window.chat?.cid,
        status: document.getElementById("status")?.textContent,
        errors: window.chat?.errors,
        received: window.chat?.received,
        logs: [...document.querySelectorAll("section.room")].map((s) => [
          s.dataset.room,
          [...s.querySelectorAll(".log li")].map((li) => li.textContent),
          [...s.querySelectorAll(".members li")].map((li) => li.textContent),
        ]),
      }))
      .catch((err) => `unavailable: ${err.message}`);
    console.error(`page ${page.url()}: ${JSON.stringify(state)}`);
  }
  throw e;
} finally {
  if (context) await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
