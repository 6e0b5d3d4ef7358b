// The JS client in Node (run by tests/client_browser.rs):
//   node --experimental-websocket node.mjs ws://127.0.0.1:PORT/ CLIENT_KEY SERVICE_KEY
// Node 22 has a global WebSocket; Node 20 needs the flag. Imports the client file itself
// (the server serves the same file at /middleman.js). Prints "restart-now" and waits for
// "restarted" on stdin in the middle (the Rust test restarts the server on the same port);
// prints "node-client: N passed, 0 failed" and exits 0 when every check held.
import * as lib from "../../clients/js/middleman.js";
import { sharedChecks } from "./checks.mjs";
import { createServer } from "node:net";
import { createInterface } from "node:readline";

const [url, clientKey, serviceKey] = process.argv.slice(2);
if (!url || !clientKey || !serviceKey) {
  console.error("usage: node --experimental-websocket node.mjs ws://HOST:PORT/ CLIENT_KEY SERVICE_KEY");
  process.exit(2);
}
let passed = 0;
const ok = (name) => console.log(`ok ${++passed} ${name}`);
const stdinLines = createInterface({ input: process.stdin });
const nextStdinLine = () => new Promise((resolve) => stdinLines.once("line", resolve));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const open = []; // closed at the end, so a failure exits at once instead of reconnecting
try {
  if (typeof globalThis.WebSocket !== "function") {
    throw new Error("no global WebSocket: run node 20 with --experimental-websocket");
  }
  // The codec alone: bytes are stuffed and unstuffed as bytes, text stays text, a body's
  // leading byte order mark is kept, and only invalid UTF-8 makes a binary frame.
  const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  const raw = new Uint8Array([0x2e, 0xff, 0x0a, 0x2e, 0x0d, 0x0a, 0x2e, 0x2e, 0x0a]);
  const frame = lib.encode("PUB", "t", [["A", "b"]], raw);
  if (!(frame instanceof Uint8Array)) throw new Error("invalid UTF-8 must encode to bytes");
  const [back] = lib.decode(frame);
  if (!same(back.bytes, raw) || back.header("A") !== "b") throw new Error(`codec: ${back.bytes}`);
  const bom = "\ufeffx\n.";
  const text = lib.encode("PUB", "t", [], new TextEncoder().encode(bom));
  if (typeof text !== "string") throw new Error("valid UTF-8 bytes must encode to a string");
  const [tb] = lib.decode(text);
  if (tb.body !== bom || !same(tb.bytes, new TextEncoder().encode(bom))) throw new Error(`BOM: ${tb.body}`);
  ok("codec: byte bodies, stuffing, text or binary frames");

  // The WebSocket option: every connection of the shared checks goes through it.
  let made = 0;
  class CountingWebSocket extends globalThis.WebSocket {
    constructor(...args) {
      super(...args);
      made++;
    }
  }
  const viaOption = {
    ...lib,
    connect: (u, k, o) => lib.connect(u, k, { ...o, WebSocket: CountingWebSocket }),
  };
  for (const name of await sharedChecks(viaOption, url, clientKey, serviceKey)) ok(name);
  // cli and svc, and the protocol 1.1 checks' other, kicked and events clients.
  if (made !== 5) throw new Error(`the WebSocket option made ${made} sockets, want 5`);
  ok("the WebSocket option is used");

  // Without the option: the global one.
  const mm = await lib.connect(url, clientKey, { reconnect: false });
  if (!/^[0-9a-z]+$/.test(mm.cid)) throw new Error(`cid ${mm.cid}`);
  await mm.subscribe("room");
  mm.close();
  ok("the global WebSocket");

  const bad = await lib.connect(url, "wrong-key", { reconnect: false }).then(
    () => "connected",
    (e) => e.reason,
  );
  if (bad !== "bad key") throw new Error(`a wrong key: ${bad}`);
  ok("a wrong key is refused");

  // Reconnect across a server restart: the client subscribes again and the JS service
  // sends its EREQ again (a client may only request a target while an EREQ is in force).
  const opts = { reconnect: true, minDelayMs: 100, maxDelayMs: 1000 };
  const rsvc = await lib.connect(url, serviceKey, opts);
  open.push(rsvc);
  await rsvc.respond("js.after", (req) => `after:${req.body}`);
  const rcli = await lib.connect(url, clientKey, opts);
  open.push(rcli);
  const seenRoom = [];
  await rcli.subscribe("room", (m) => seenRoom.push(m.body));
  const oldCids = [rsvc.cid, rcli.cid];
  console.log("restart-now");
  const answer = await nextStdinLine();
  if (answer !== "restarted") throw new Error(`stdin: ${answer}`);
  const deadline = Date.now() + 20000;
  const until = async (what, f) => {
    for (;;) {
      const r = await f().catch((e) => e.message);
      if (r === true) return;
      if (Date.now() > deadline) throw new Error(`${what}: ${JSON.stringify(r)}`);
      await sleep(100);
    }
  };
  await until("reconnected", async () =>
    rsvc.connected && rcli.connected && rsvc.cid !== oldCids[0] && rcli.cid !== oldCids[1],
  );
  await until("the JS service answers again", async () =>
    (await rcli.request("js.after", "x", { timeoutMs: 2000 })).body === "after:x",
  );
  await until("the room subscription delivers again", async () => {
    const b = `p-${Math.random()}`;
    await rcli.request("poke", b, { timeoutMs: 2000 }); // the Rust service publishes first
    return seenRoom.includes(`poked:${b}`);
  });
  rsvc.close();
  rcli.close();
  ok("after a server restart: re-subscribed, and the JS service's EREQ sent again");

  // A port nobody listens on: Node 20's WebSocket fires error but no close there, and
  // connect must still reject (and a reconnect loop go on) rather than hang.
  const free = createServer();
  await new Promise((r) => free.listen(0, "127.0.0.1", r));
  const port = free.address().port;
  await new Promise((r) => free.close(r));
  const refused = await lib.connect(`ws://127.0.0.1:${port}/`, clientKey, { reconnect: false }).then(
    () => "connected",
    (e) => e.reason,
  );
  if (!/^connection failed/.test(refused)) throw new Error(`nobody listening: ${refused}`);
  ok("connect rejects when nobody listens");
  console.log(`node-client: ${passed} passed, 0 failed`);
} catch (e) {
  console.error(`node-client: FAILED after ${passed} checks: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  stdinLines.close();
  for (const mm of open) mm.close();
}
