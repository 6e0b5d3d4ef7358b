// Checks of the JS client shared by the Chromium run (run.mjs appends this file to the
// page's module script, where `connect` comes from the server's /middleman.js) and the
// Node run (node.mjs imports it, with `connect` from clients/js/middleman.js). Needs the
// Rust service of tests/client_browser.rs: "room" is EPUB/ESUB-enabled for clients and
// "echo" answers with the request's body. Returns the names of the checks that held;
// throws on the first that does not. No imports: it must run inline in the page too.
export async function sharedChecks(lib, url, clientKey, serviceKey) {
  const { connect, MiddlemanError } = lib;
  const WAIT = 10000;
  const passed = [];
  const show = (v) =>
    JSON.stringify(v, (_, x) => (x instanceof Uint8Array ? `bytes[${Array.from(x)}]` : x));
  const eq = (got, want, what) => {
    if (show(got) !== show(want)) throw new Error(`${what}: got ${show(got)}, want ${show(want)}`);
  };
  const outcome = (p) =>
    p.then(
      (v) => ({ ok: true, value: v }),
      (e) => ({
        ok: false,
        middleman: e instanceof MiddlemanError,
        reason: e.reason,
        cmd: e.cmd,
        target: e.target,
      }),
    );
  // One message on `topic` matching `pred`, or a rejection after WAIT.
  const nextOn = (mm, topic, pred) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nothing on ${topic} within ${WAIT} ms`)), WAIT);
      const off = mm.subscribe(topic, (m) => {
        if (!pred(m)) return;
        clearTimeout(timer);
        off();
        resolve(m);
      });
    });

  const errors = [];
  const cli = await connect(url, clientKey, { reconnect: false });
  cli.onerror = (e) => errors.push(`client: ${e.reason} ${e.cmd} ${e.target}`);
  const svcErrors = [];
  const svc = await connect(url, serviceKey, { reconnect: false });
  svc.onerror = (e) => svcErrors.push(`${e.reason} ${e.cmd} ${e.target}`);
  try {
    // subscribe confirmation, several in flight at once.
    const room = [];
    const [a, b, c, d] = await Promise.all([
      outcome(cli.subscribe("secret-a", () => {})),
      outcome(cli.subscribe("room", (m) => room.push(m))),
      outcome(cli.subscribe("secret-b")),
      outcome(cli.subscribe("room", () => {})), // the same topic: shares the answer
    ]);
    const refused = (target) => ({ ok: false, middleman: true, reason: "not permitted", cmd: "SUB", target });
    eq(a, refused("secret-a"), "refused subscribe");
    eq(b, { ok: true, value: { topic: "room", unsubscribe: undefined } }, "allowed subscribe");
    eq(c, refused("secret-b"), "second refused subscribe");
    eq(d.ok, true, "second subscribe of the same topic");
    eq(typeof b.value.unsubscribe, "function", "the resolved value's unsubscribe");
    const svcSub = await outcome(svc.subscribe("anything.svc"));
    eq(svcSub.ok, true, "a service's subscribe");
    passed.push("subscribe resolves when taken and rejects with the server's reason when refused");

    // The allowed subscription really is live, the refused ones are gone.
    const token = `live-${Math.random()}`;
    cli.publish("room", token);
    const seen = await nextOn(cli, "room", (m) => m.body === token);
    eq(seen.body, token, "message on the confirmed subscription");
    const again = await outcome(cli.subscribe("secret-a"));
    eq(again, refused("secret-a"), "a refused topic is asked again, and refused again");
    eq(errors, [], "refusals someone awaited stay out of onerror");
    cli.subscribe("secret-c"); // nobody awaits it: onerror hears of it
    await outcome(cli.subscribe("secret-d")); // refused after secret-c, awaited
    eq(errors, ["client: not permitted SUB secret-c"], "a refusal nobody awaited goes to onerror");
    errors.length = 0;
    passed.push("confirmed subscription delivers; unawaited refusals reach onerror");

    // respond: a JS service answers requests of another client.
    const stopEcho = svc.respond("js.echo", async (req) => {
      await new Promise((r) => setTimeout(r, 5));
      return { body: req.bytes, headers: { "X-Seen": req.header("X-In") ?? "-", rid: "ignored" } };
    });
    await stopEcho;
    await svc.respond("js.text", (req) => `text:${req.body}`);
    await svc.respond("js.fail", () => {
      throw new Error("boom\nline two");
    });
    const res = await cli.request("js.echo", "hello\n.dot", { headers: { "X-In": "1" }, timeoutMs: WAIT });
    eq(res.cmd, "RES", "answer cmd");
    eq(res.body, "hello\n.dot", "answer body");
    eq(res.header("X-Seen"), "1", "answer header");
    eq(res.header("rid"), undefined, "rid removed by the server");
    eq(res.cid, svc.cid, "answered by the JS service");
    const text = await cli.request("js.text", "x", { timeoutMs: WAIT });
    eq(text.body, "text:x", "a plain string answer");
    const failed = await cli.request("js.fail", "", { timeoutMs: WAIT });
    eq([failed.body, failed.header("error")], ["", "boom line two"], "a throwing handler answers with an error header");
    eq(svcErrors, ["responder failed: boom line two REQ js.fail"], "the handler's error reaches the service's onerror");
    svcErrors.length = 0;
    const cliRespond = await outcome(cli.respond("not.mine", () => ""));
    eq(cliRespond, { ok: false, middleman: true, reason: "not permitted", cmd: "EREQ", target: "not.mine" }, "a client's respond");
    await stopEcho(); // the server has processed the DREQ
    const gone = await outcome(cli.request("js.echo", "x", { timeoutMs: WAIT }));
    // A server with DREQ (protocol 1.1): no responder; without: the client answers.
    eq(
      gone.ok ? gone.value.header("error") : gone.reason,
      gone.ok ? "not responding" : "no responder",
      "after stop, no answer from the handler",
    );
    passed.push("respond: a JS service answers another client's requests (and errors are answered)");

    // Binary bodies: not valid UTF-8, with line breaks and dots at line starts.
    const bytes = new Uint8Array([0xff, 0x2e, 0x0a, 0x2e, 0x2e, 0x0d, 0x0a, 0x2e, 0x00, 0x80, 0xc3, 0x0a, 0x2e]);
    const onRoom = nextOn(cli, "room", (m) => m.header("X-Kind") === "binary");
    cli.publish("room", bytes, { "X-Kind": "binary" });
    const got = await onRoom;
    eq(got.bytes, bytes, "published bytes");
    eq(got.body, new TextDecoder().decode(bytes), "their text view");
    await svc.respond("js.bytes", (req) => req.bytes); // a bare Uint8Array answer
    const viaJs = await cli.request("js.bytes", bytes.buffer, { timeoutMs: WAIT });
    eq(viaJs.bytes, bytes, "bytes through the JS responder (sent as an ArrayBuffer)");
    const viaRust = await cli.request("echo", bytes.subarray(1), { timeoutMs: WAIT });
    eq(viaRust.bytes, bytes.subarray(1), "bytes through the Rust responder (a view)");
    const utf = new TextEncoder().encode("h\u00e9llo \u{1f600}\n.");
    const onUtf = nextOn(cli, "room", (m) => m.header("X-Kind") === "utf8");
    cli.publish("room", utf, { "X-Kind": "utf8" });
    const gotUtf = await onUtf;
    eq([gotUtf.body, gotUtf.bytes], ["h\u00e9llo \u{1f600}\n.", utf], "UTF-8 bytes arrive as text too");
    eq(errors, [], "no client errors");
    eq(svcErrors, [], "no service errors");
    passed.push("binary bodies round trip byte for byte (publish, JS and Rust responders)");

    // Protocol 1.1 (services): grants to one connection, their withdrawal, disable*.
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const until = async (what, pred) => {
      const end = Date.now() + WAIT;
      while (!pred()) {
        if (Date.now() > end) throw new Error(`${what}: not within ${WAIT} ms`);
        await sleep(20);
      }
    };
    const other = await connect(url, clientKey, { reconnect: false });
    try {
      await svc.grantSub(cli.cid, "js.g");
      await cli.subscribe("js.g");
      eq(await outcome(other.subscribe("js.g")), refused("js.g"), "a grant is for that connection alone");
      eq((await svc.presence("js.g")).count, 1, "subscribed with the grant");
      await svc.revokeSub(cli.cid, "js.g");
      eq((await svc.presence("js.g")).count, 0, "revoking the last right unsubscribes");
      const up = [];
      await svc.subscribe("js.up", (m) => up.push([m.body, m.cid]));
      await svc.grantPub(cli.cid, "js.up");
      cli.publish("js.up", "granted");
      await until("the granted publish", () => up.length === 1);
      eq(up, [["granted", cli.cid]], "a granted publish");
      await svc.revokePub(cli.cid, "js.up");
      cli.publish("js.up", "revoked");
      await outcome(cli.subscribe("secret-e")); // a barrier: refused after the PUB's error
      eq(errors, ["client: not permitted PUB js.up"], "a revoked publish is refused");
      errors.length = 0;
      await svc.grantReq(cli.cid, "js.ask");
      eq((await outcome(cli.request("js.ask", "", { timeoutMs: WAIT }))).reason, "no responder", "a granted request");
      await svc.revokeReq(cli.cid, "js.ask");
      await svc.enableSubscribe("js.open");
      await other.subscribe("js.open");
      await svc.disableSubscribe("js.open");
      eq(await outcome(cli.subscribe("js.open")), refused("js.open"), "after disableSubscribe");
      await svc.enablePublish("js.in");
      await svc.disablePublish("js.in");
      await svc.respond("js.d", () => "d");
      await svc.disableRequests("js.d");
      eq((await outcome(svc.request("js.d", "", { timeoutMs: WAIT }))).reason, "no responder", "after disableRequests");
      const badCid = await outcome(svc.grantSub("Not A Cid", "js.g"));
      eq([badCid.reason, badCid.cmd, badCid.target], ["bad cid", "ESUB", "js.g"], "a forcid that is no cid");
      await svc.grantSub("zz0000000000", "js.g"); // not connected: a silent no-op
      eq(await outcome(cli.grantSub(svc.cid, "x")), { ok: false, middleman: true, reason: "not permitted", cmd: "ESUB", target: "x" }, "a client's grant");
      eq([errors, svcErrors], [[], []], "no unexpected errors");
      passed.push("grants, revokes and disable* (protocol 1.1)");

      // subscribeFor / unsubscribeFor, presence, kick.
      svc.send("INT", "UID", "", { forcid: other.cid, setuid: "olga" }); // not confirmed: the next call is
      await svc.subscribeFor(other.cid, "js.p");
      await svc.subscribeFor(cli.cid, "js.p");
      const members = [
        { cid: other.cid, uid: "olga" },
        { cid: cli.cid, uid: "" },
      ].sort((x, y) => (x.cid < y.cid ? -1 : 1));
      eq(await svc.presence("js.p"), { count: 2, users: 1, members, truncated: false, partial: false }, "presence");
      eq(await svc.presence("js.p", { limit: 1 }), { count: 2, users: 1, members: members.slice(0, 1), truncated: true, partial: false }, "presence with a limit");
      const seenP = [];
      cli.onmessage = (m) => seenP.push(m.body);
      svc.publish("js.p", "server-side");
      await until("a message on the server-side subscription", () => seenP.length === 1);
      cli.onmessage = null;
      await svc.unsubscribeFor(other.cid, "js.p");
      eq((await svc.presence("js.p", { limit: 0 })).count, 1, "after unsubscribeFor");
      eq((await outcome(cli.presence("js.p"))).reason, "not permitted", "a client's presence");
      const badTopic = await outcome(svc.subscribeFor(cli.cid, "SYS:CONNECT"));
      eq([badTopic.reason, badTopic.cmd, badTopic.target], ["not permitted", "INT", "SUB"], "subscribeFor a SYS: topic");
      const k = await connect(url, clientKey, { reconnect: true, minDelayMs: 20, maxDelayMs: 50 });
      const closes = [];
      k.onclose = (info) => closes.push(info);
      await svc.kick(k.cid, "bye now");
      await until("the kick", () => closes.length === 1);
      eq(closes, [{ code: 4000, reason: "bye now", reconnecting: false }], "a kicked client's onclose");
      await sleep(200);
      eq(k.connected, false, "a kicked client does not reconnect");
      k.close();
      passed.push("subscribeFor, presence, kick (close 4000 reaches onclose, no reconnect)");

      // Events.
      const evs = [];
      const gone = [];
      const offEv = svc.events((ev) => evs.push(ev));
      await offEv;
      const offGone = svc.events(["disconnect"], (ev) => gone.push(ev));
      await offGone;
      const e2 = await connect(url, clientKey, { reconnect: false });
      const e2cid = e2.cid;
      await svc.subscribeFor(e2cid, "js.e");
      await svc.unsubscribeFor(e2cid, "js.e");
      e2.close();
      await until("the disconnect event", () => gone.some((ev) => ev.cid === e2cid));
      const about = (list) => list.filter((ev) => ev.cid === e2cid).map((ev) => [ev.kind, ev.uid, ev.role, ev.topic, ev.reason]);
      eq(
        about(evs),
        [
          ["connect", "", "client", null, null],
          ["sub", "", "client", "js.e", null],
          ["uns", "", "client", "js.e", null],
          ["disconnect", "", "client", null, "normal"],
        ],
        "events of every kind",
      );
      eq(about(gone), [["disconnect", "", "client", null, "normal"]], "events of one kind");
      eq(evs[0].message.target, "SYS:CONNECT", "the event's message");
      await offEv();
      await offGone();
      const cliEv = await outcome(cli.events(() => {}));
      eq([cliEv.reason, cliEv.cmd], ["not permitted", "SUB"], "a client's events");
      eq([errors, svcErrors], [[], []], "no unexpected errors");
      passed.push("events: connect, sub, uns, disconnect with their headers");
    } finally {
      other.close();
    }
  } finally {
    cli.close();
    svc.close();
  }
  return passed;
}
