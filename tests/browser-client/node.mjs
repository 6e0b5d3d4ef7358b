// The JS client in Node (run by tests/client_browser.rs):
//   node --experimental-websocket node.mjs ws://127.0.0.1:PORT/ CLIENT_KEY SERVICE_KEY
// Node 22 has a global WebSocket; Node 20 needs the flag. Imports the client file itself
// (the server serves the same file at /middleman.js). Prints "node-client: N passed,
// 0 failed" and exits 0 when every check held.
import * as lib from "../../clients/js/middleman.js";
import { sharedChecks } from "./checks.mjs";
import { createServer } from "node:net";

const [url, clientKey, serviceKey] = process.argv.slice(2);
if (!url || !clientKey || !serviceKey) {
  console.error("usage: node --experimental-websocket node.mjs ws://HOST:PORT/ CLIENT_KEY SERVICE_KEY");
  process.exit(2);
}
let passed = 0;
const ok = (name) => console.log(`ok ${++passed} ${name}`);
try {
  if (typeof globalThis.WebSocket !== "function") {
    throw new Error("no global WebSocket: run node 20 with --experimental-websocket");
  }
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
  if (made !== 2) throw new Error(`the WebSocket option made ${made} sockets, want 2`);
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
}
