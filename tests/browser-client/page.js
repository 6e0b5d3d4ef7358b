// The test page's module script: run.mjs loads GET /healthz from the server (so the page
// has the server's origin and address space) and adds this as a module script, which
// imports the real /middleman.js.
// Steps driven by run.mjs through page.evaluate; each returns plain data to assert on.
// run.mjs appends checks.mjs (sharedChecks) to this script.
import { connect, MiddlemanError } from "/middleman.js";

const WAIT = 10000;
const state = { mm: null, room: [], errors: [], opens: [], closes: [], waiters: [] };

function roomMessage(pred, what) {
  const found = state.room.find(pred);
  if (found) return Promise.resolve(found);
  return new Promise((resolve, reject) => {
    const w = { pred, resolve };
    state.waiters.push(w);
    setTimeout(() => reject(new Error(`no room message ${what} within ${WAIT} ms`)), WAIT);
  });
}

function plain(m) {
  return { cmd: m.cmd, target: m.target, headers: m.headers, body: m.body };
}

window.steps = {
  async connect(url, key) {
    const mm = await connect(url, key, { reconnect: true, minDelayMs: 100, maxDelayMs: 1000 });
    state.mm = mm;
    mm.onerror = (e) => state.errors.push({ reason: e.reason, cmd: e.cmd, target: e.target, retrying: e.retrying });
    mm.onopen = (info) => state.opens.push(info);
    mm.onclose = (info) => state.closes.push(info);
    mm.subscribe("room", (m) => {
      state.room.push(m);
      state.waiters = state.waiters.filter((w) => !(w.pred(m) && (w.resolve(m), true)));
    });
    return mm.cid;
  },

  async publishAndReceive(body) {
    state.mm.publish("room", body, [["X-One", "1"], ["x-one", "again"], ["X-Two", "a b"]]);
    return plain(await roomMessage((m) => m.body === body, "published by the page"));
  },

  async echo(body) {
    const res = await state.mm.request("echo", body, { headers: { Trace: "t1" }, timeoutMs: WAIT });
    return plain(res);
  },

  async noResponder() {
    try {
      await state.mm.request("nobody", "x", { timeoutMs: WAIT });
      return { resolved: true };
    } catch (e) {
      return {
        isError: e instanceof Error,
        isMiddlemanError: e instanceof MiddlemanError,
        message: e.message,
        reason: e.reason,
        cmd: e.cmd,
        target: e.target,
      };
    }
  },

  // The service publishes "poked:<body>" to the room before answering, so the message
  // is here when the request resolves, if the subscription is live.
  async poke(body) {
    const res = await state.mm.request("poke", body, { timeoutMs: WAIT });
    const seen = state.room.find((m) => m.body === `poked:${body}`);
    return { res: res.body, seen: seen ? plain(seen) : null };
  },

  cid() {
    return state.mm.cid;
  },

  // After the server restarted: wait for the new authentication, then poke until the
  // re-established subscription delivers (a re-subscription can be refused while the
  // service is not back yet; the client retries it).
  async afterRestart(oldCid) {
    const deadline = Date.now() + 20000;
    while (!(state.mm.connected && state.mm.cid !== oldCid)) {
      if (Date.now() > deadline) throw new Error("no reconnect within 20 s");
      await new Promise((r) => setTimeout(r, 50));
    }
    let tries = 0;
    for (;;) {
      tries++;
      let r;
      try {
        r = await this.poke(`after-restart-${tries}`);
      } catch (e) {
        r = { error: e.message };
      }
      if (r.seen) return { cid: state.mm.cid, tries, poke: r, opens: state.opens, closes: state.closes };
      if (Date.now() > deadline) throw new Error(`no delivery after the restart: ${JSON.stringify(r)}`);
      await new Promise((res) => setTimeout(res, 100));
    }
  },

  errors() {
    return state.errors;
  },

  close() {
    state.mm.close();
    return state.mm.connected;
  },

  // checks.mjs, appended to this module by run.mjs.
  shared(url, clientKey, serviceKey) {
    // eslint-disable-next-line no-undef
    return sharedChecks({ connect, MiddlemanError }, url, clientKey, serviceKey);
  },
};
window.ready = true;
