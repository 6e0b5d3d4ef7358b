// middleman.js: a browser (and Node) client for middleman servers (protocol version 1 and
// the 1.1 additions: grants, server-side subscriptions, kicks, presence, events).
// An ES module with no dependencies; the server serves it at GET /middleman.js.
//
//   import { connect } from "/middleman.js";
//   const mm = await connect("ws://127.0.0.1:8765/", key, { reconnect: true });
//   const off = mm.subscribe("news", (msg) => console.log(msg.header("cid"), msg.body));
//   await off;            // resolves once the server took the SUB, rejects on refusal
//   mm.publish("news", "hello", { "X-Lang": "en" });
//   mm.publish("raw", new Uint8Array([0xff, 0x00]));     // bytes: msg.bytes on arrival
//   const res = await mm.request("time", "", { headers: {}, timeoutMs: 5000 });
//   mm.respond("time", (req) => ({ body: "12:00", headers: { Zone: "UTC" } })); // services
//   mm.onerror = (err) => console.warn(err.reason, err.cmd, err.target);
//   mm.onclose = ({ code, reason }) => code === 4000 && console.log("kicked:", reason);
//   mm.close();
//
// Services (protocol 1.1): await mm.grantSub(cid, "room:1"); await mm.subscribeFor(cid, t);
//   const { count, users, members } = await mm.presence("room:1", { limit: 100 });
//   const off = mm.events(["disconnect"], (ev) => console.log(ev.cid, ev.uid, ev.reason));
//   await mm.kick(cid, "bye");
//
// Node 22 and later have a global WebSocket; Node 20 needs `node --experimental-websocket`,
// or pass a constructor: connect(url, key, { WebSocket }) (e.g. from the `ws` package).
//
// Framing follows docs/protocol.md section 2: CRLF line ends, every header sent, body lines
// starting with "." stuffed on the way out and unstuffed on the way in, body line breaks
// kept as they are. Requests are matched by their ReqID header (case-insensitive); the
// server's PUB ERROR for a request rejects its promise with a MiddlemanError carrying the
// server's reason. SUB and EREQ are confirmed by a probe sent after them (see
// _scheduleProbe). After a lost connection the client reconnects with exponential backoff
// and jitter, authenticates again (a new cid), re-subscribes every topic and sends its
// EREQs again.

const MAX_TARGET = 255;
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();
/** Bodies keep a leading byte order mark (it is part of the body). */
const bodyText = new TextDecoder("utf-8", { ignoreBOM: true });
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });
/** The command of the probe that confirms SUB/EREQ: unknown to the server, so it always
 *  answers with an error, after the errors of everything sent before it (section 4). */
const PROBE_CMD = "SYNC";
/** The close code of a connection a service kicked (INT KICK, protocol 1.1). */
export const KICK_CODE = 4000;
/** The event topics (protocol 1.1) by kind. */
export const EVENT_TOPICS = Object.freeze({
  connect: "SYS:CONNECT",
  disconnect: "SYS:DISCONNECT",
  sub: "SYS:SUB",
  uns: "SYS:UNS",
});
const EVENT_KINDS = new Map(Object.entries(EVENT_TOPICS).map(([k, t]) => [t, k]));

/** The topics of `kinds` ("connect", "disconnect", "sub", "uns" or the topics themselves);
 *  all four when none is given. */
function eventTopics(kinds) {
  if (kinds == null) kinds = [];
  if (typeof kinds === "string") kinds = [kinds];
  const out = [];
  for (const k of kinds) {
    const key = String(k).toLowerCase().replace(/^sys:/, "");
    const topic = Object.hasOwn(EVENT_TOPICS, key) ? EVENT_TOPICS[key] : undefined;
    if (!topic) throw new TypeError(`middleman: unknown event kind ${JSON.stringify(k)}`);
    if (!out.includes(topic)) out.push(topic);
  }
  return out.length > 0 ? out : Object.values(EVENT_TOPICS);
}

/** A connection event from its message (PUB SYS:CONNECT|DISCONNECT|SUB|UNS), or null
 *  (exported for tests). */
export function parseEvent(m) {
  const kind = m.cmd === "PUB" ? EVENT_KINDS.get(m.target) : undefined;
  if (!kind) return null;
  return {
    kind,
    cid: m.header("cid") ?? "",
    uid: m.header("uid") ?? "",
    role: m.header("role") ?? "",
    topic: kind === "sub" || kind === "uns" ? (m.header("topic") ?? null) : null,
    reason: kind === "disconnect" ? (m.header("reason") ?? null) : null,
    message: m,
  };
}

/** The answer to REQ SYS:PRESENCE as { count, users, members: [{ cid, uid }], truncated,
 *  partial } (exported for tests). */
export function parsePresence(m) {
  const num = (name) => {
    const v = Number.parseInt(m.header(name) ?? "", 10);
    return Number.isFinite(v) ? v : 0;
  };
  const members = [];
  for (const raw of m.body.split("\n")) {
    const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    if (line === "") continue;
    const sp = line.indexOf(" ");
    members.push(sp < 0 ? { cid: line, uid: "" } : { cid: line.slice(0, sp), uid: line.slice(sp + 1) });
  }
  return {
    count: num("count"),
    users: num("users"),
    members,
    truncated: m.header("truncated") === "true",
    partial: m.header("partial") === "true",
  };
}

/** An error reported by the server (PUB ERROR) or by this client. */
export class MiddlemanError extends Error {
  constructor(reason, { cmd = "", target = "", reqid = null, retrying = false } = {}) {
    super(reason);
    this.name = "MiddlemanError";
    /** The server's reason ("no responder", "not permitted", ...) or this client's. */
    this.reason = reason;
    this.cmd = cmd;
    this.target = target;
    this.reqid = reqid;
    /** A refused re-subscription after a reconnect that will be retried. */
    this.retrying = retrying;
  }
}

/** One received message. */
export class Message {
  constructor(cmd, target, headers, body, bytes = null) {
    this.cmd = cmd;
    this.target = target;
    /** Every header in order: [name, value] pairs, names as sent. */
    this.headers = headers;
    /** The body as text (invalid UTF-8 replaced by U+FFFD; `bytes` has it exactly). */
    this.body = body;
    this._bytes = bytes;
  }
  /** The body as bytes, exactly as relayed (a Uint8Array). */
  get bytes() {
    if (this._bytes == null) this._bytes = utf8.encode(this.body);
    return this._bytes;
  }
  /** The first header with this name (case-insensitive), or undefined. */
  header(name) {
    const want = name.toLowerCase();
    for (const [n, v] of this.headers) if (n.toLowerCase() === want) return v;
    return undefined;
  }
  /** The sender's connection id (set by the server). */
  get cid() {
    return this.header("cid");
  }
  /** The sender's user id (set by the server). */
  get uid() {
    return this.header("uid");
  }
}

function checkTarget(target) {
  if (
    typeof target !== "string" ||
    target.length === 0 ||
    utf8.encode(target).length > MAX_TARGET ||
    /[\x00-\x1f\x7f]/.test(target) ||
    /^[ \t]|[ \t]$/.test(target)
  ) {
    throw new TypeError(`middleman: invalid target ${JSON.stringify(target)}`);
  }
}

function checkCmd(cmd) {
  if (typeof cmd !== "string" || !/^[A-Za-z]{1,16}$/.test(cmd)) {
    throw new TypeError(`middleman: invalid command ${JSON.stringify(cmd)}`);
  }
}

/** Headers as [name, value] pairs from an object, a Map or an array of pairs. */
function headerPairs(headers) {
  if (headers == null) return [];
  const raw = Array.isArray(headers)
    ? headers
    : headers instanceof Map
      ? [...headers]
      : Object.entries(headers);
  return raw.map(([name, value]) => {
    name = String(name);
    value = String(value);
    if (name.length === 0 || /[:\x00-\x1f\x7f]/.test(name) || name.trim() !== name) {
      throw new TypeError(`middleman: invalid header name ${JSON.stringify(name)}`);
    }
    if (/[\r\n]/.test(value)) {
      throw new TypeError(`middleman: header ${name} holds a line break`);
    }
    return [name, value];
  });
}

const isBytes = (x) => x instanceof ArrayBuffer || ArrayBuffer.isView(x);
const asU8 = (x) =>
  x instanceof ArrayBuffer ? new Uint8Array(x) : new Uint8Array(x.buffer, x.byteOffset, x.byteLength);

/** Body bytes with every line that starts with "." stuffed to "..". */
function stuffBytes(b) {
  let dots = 0;
  for (let i = 0; i < b.length; i++) if (b[i] === 0x2e && (i === 0 || b[i - 1] === 0x0a)) dots++;
  if (dots === 0) return b;
  const out = new Uint8Array(b.length + dots);
  let o = 0;
  for (let i = 0; i < b.length; i++) {
    if (b[i] === 0x2e && (i === 0 || b[i - 1] === 0x0a)) out[o++] = 0x2e;
    out[o++] = b[i];
  }
  return out;
}

/**
 * Encode one protocol message (exported for tests). `body` is a string or bytes (a
 * Uint8Array, another ArrayBuffer view, or an ArrayBuffer). Returns a string when the
 * message is valid UTF-8 (sent as a text frame), else a Uint8Array (a binary frame).
 */
export function encode(cmd, target, headers, body) {
  let s = `${cmd} ${target}\r\n`;
  for (const [n, v] of headers) s += `${n}: ${v}\r\n`;
  s += "\r\n";
  if (isBytes(body)) {
    const head = utf8.encode(s);
    const stuffed = stuffBytes(asU8(body));
    const out = new Uint8Array(head.length + stuffed.length + 5);
    out.set(head, 0);
    out.set(stuffed, head.length);
    out.set([0x0d, 0x0a, 0x2e, 0x0d, 0x0a], head.length + stuffed.length);
    try {
      return strictUtf8.decode(out);
    } catch {
      return out;
    }
  }
  const text = body == null ? "" : String(body);
  s += text
    .split("\n")
    .map((line) => (line.startsWith(".") ? "." + line : line))
    .join("\n");
  return s + "\r\n.\r\n";
}

const trim = (s) => s.replace(/^[ \t]+|[ \t]+$/g, "");

function concatBytes(parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/**
 * Decode the protocol messages in one WebSocket message (exported for tests): a string
 * (a text frame) or bytes (a binary frame). Each Message has `body` (text) and `bytes`.
 */
export function decode(data) {
  const b = typeof data === "string" ? utf8.encode(data) : asU8(data);
  const out = [];
  let pos = 0;
  // [start, end of content (without CR/LF), end of raw line (after its LF)]
  const nextLine = () => {
    const nl = b.indexOf(0x0a, pos);
    if (nl < 0) throw new Error("middleman: incomplete message from server");
    const start = pos;
    pos = nl + 1;
    const end = nl > start && b[nl - 1] === 0x0d ? nl - 1 : nl;
    return [start, end, nl + 1];
  };
  const text = (start, end) => fromUtf8.decode(b.subarray(start, end));
  const isDot = (start, end) => end === start + 1 && b[start] === 0x2e;
  while (pos < b.length) {
    const [fs, fe] = nextLine();
    if (fe === fs) continue; // empty lines between messages
    const first = text(fs, fe);
    const sp = first.indexOf(" ");
    if (sp <= 0) throw new Error(`middleman: unparsable line from server: ${first}`);
    const cmd = first.slice(0, sp);
    const target = trim(first.slice(sp + 1));
    const headers = [];
    let ended = false;
    for (;;) {
      const [s, e] = nextLine();
      if (e === s) break;
      if (isDot(s, e)) {
        ended = true;
        break;
      }
      const line = text(s, e);
      const colon = line.indexOf(":");
      if (colon < 0) throw new Error(`middleman: header line without ':' from server`);
      headers.push([trim(line.slice(0, colon)), trim(line.slice(colon + 1))]);
    }
    let body = new Uint8Array(0);
    if (!ended) {
      const parts = [];
      for (;;) {
        const [s, e, r] = nextLine();
        if (isDot(s, e)) break;
        const unstuff = b[s] === 0x2e && b[s + 1] === 0x2e ? 1 : 0;
        parts.push(b.subarray(s + unstuff, r));
      }
      body = concatBytes(parts);
      // Without the line break just before the terminator.
      let n = body.length;
      if (n >= 1 && body[n - 1] === 0x0a) n -= n >= 2 && body[n - 2] === 0x0d ? 2 : 1;
      body = body.subarray(0, n);
    }
    out.push(new Message(cmd, target, headers, bodyText.decode(body), body));
  }
  return out;
}

/** Make `fn` awaitable: it settles like rec.ready, with `value` on success. */
function thenable(fn, rec, value) {
  const settled = () => rec.ready.then(() => value);
  fn.then = (ok, fail) => {
    rec.handled = true;
    return settled().then(ok, fail);
  };
  fn.catch = (fail) => fn.then(undefined, fail);
  fn.finally = (f) => fn.then().finally(f);
  return fn;
}

/**
 * Connect, authenticate with `key` and resolve with the client once the server has
 * assigned a connection id. Rejects if the first connection fails or the key is refused.
 * Options: reconnect (default true), minDelayMs (250), maxDelayMs (10000),
 * maxQueue (1000 messages kept while disconnected), WebSocket (the constructor to use;
 * default globalThis.WebSocket: browsers, Node 22, Node 20 with --experimental-websocket;
 * for the `ws` package pass its WebSocket).
 */
export function connect(url, key, options = {}) {
  const mm = new Middleman(url, key, options);
  return mm._ready.then(() => mm);
}

export class Middleman {
  constructor(url, key, options = {}) {
    this.url = url;
    /** The current connection id (a new one after each reconnect). */
    this.cid = null;
    /** Called with a MiddlemanError for a server error not tied to a request. */
    this.onerror = null;
    /** Called with messages no subscription takes (e.g. on the private channel). */
    this.onmessage = null;
    /** Called after each authentication: ({ cid, reconnected }). */
    this.onopen = null;
    /** Called when a connection ends: ({ code, reason, reconnecting }). */
    this.onclose = null;
    this._key = key;
    this._reconnect = options.reconnect !== false;
    this._minDelay = options.minDelayMs ?? 250;
    this._maxDelay = options.maxDelayMs ?? 10000;
    this._maxQueue = options.maxQueue ?? 1000;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._subs = new Map(); // topic -> { entries: Set of { cb }, confirmed, handled, ready }
    this._responders = new Map(); // target -> { handler, confirmed, handled, ready }
    this._enabled = new Map(); // "EPUB topic" -> { cmd, target, ... }: re-sent on reconnect
    this._stopped = new Set(); // targets whose responder stopped (see respond)
    // SUB/EREQ waiting for the server: { cmd, target, rec, sent, probe, resolve, reject }
    this._confirms = [];
    this._probeSeq = 0;
    this._probeQueued = false;
    this._pending = new Map(); // ReqID -> { resolve, reject, timer, sent }
    this._queue = []; // [text, reqid, kind] waiting for a connection
    this._resubscribing = new Map(); // topic -> { attempt, timer } after a reconnect
    this._nextId = 0;
    this._prefix = Math.random().toString(36).slice(2, 8);
    this._attempt = 0;
    this._everOpen = false;
    this._closed = false;
    this._ws = null;
    this._state = "closed"; // "key" | "cid" | "open" | "closed"
    this._timer = null;
    this._ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this._open();
  }

  /** Whether the connection is authenticated right now. */
  get connected() {
    return this._state === "open";
  }

  /**
   * Subscribe to `topic`; `cb(msg)` gets each message published to it (without `cb` they
   * go to `onmessage`). Returns a function that removes this subscription (UNS when it was
   * the topic's last; calling it returns a promise that resolves once the server has
   * processed the UNS, and never rejects). The function is also a promise (then/catch/finally): it resolves
   * with `{ topic, unsubscribe }` once the server has taken the SUB and rejects with the
   * server's MiddlemanError ("not permitted", ...) when it refuses it. A refusal goes to
   * `onerror` only when nobody awaits the subscription.
   */
  subscribe(topic, cb) {
    checkTarget(topic);
    if (cb !== undefined && typeof cb !== "function") {
      throw new TypeError("middleman: the subscribe callback must be a function");
    }
    let rec = this._subs.get(topic);
    if (!rec) {
      rec = { entries: new Set(), confirmed: false, handled: false, ready: null };
      this._subs.set(topic, rec);
      try {
        this._want("SUB", topic, rec);
      } catch (e) {
        this._subs.delete(topic); // closed, or the send queue is full
        throw e;
      }
    }
    const entry = { cb: cb ?? null };
    rec.entries.add(entry);
    const off = () => {
      if (!rec.entries.delete(entry) || rec.entries.size > 0 || this._subs.get(topic) !== rec) {
        return Promise.resolve();
      }
      this._subs.delete(topic);
      this._stopRetry(topic);
      return this._withdraw("UNS", topic);
    };
    return thenable(off, rec, { topic, unsubscribe: off });
  }

  /**
   * Answer requests for `target` (services): sends `EREQ target`, then calls
   * `handler(msg)` for each REQ (it may be async) and answers with `RES target` echoing
   * the request's `rid`. The handler returns the body (a string or bytes), or
   * `{ body, headers }`, or nothing (an empty body). If it throws (or rejects), the
   * request is still answered: a RES with an empty body and a header `error: <message>`,
   * and the error goes to `onerror` (to console.error when there is no onerror).
   * Returns a function that stops answering (`DREQ target`, protocol 1.1; calling it
   * returns a promise that resolves once the server has processed the DREQ, so a request
   * sent after that finds no responder here). A server without DREQ (protocol 1) keeps
   * sending the requests until the connection ends: they are answered with an empty RES
   * with the header `error: not responding`. Like `subscribe`'s, the function is
   * also a promise that resolves once the server took the EREQ and rejects on refusal.
   * After a reconnect the EREQ is sent again.
   */
  respond(target, handler) {
    checkTarget(target);
    if (typeof handler !== "function") throw new TypeError("middleman: respond needs a handler");
    if (this._responders.has(target)) {
      throw new TypeError(`middleman: already responding to ${JSON.stringify(target)}`);
    }
    const rec = { handler, confirmed: false, handled: false, ready: null };
    this._responders.set(target, rec);
    this._stopped.delete(target);
    try {
      this._want("EREQ", target, rec);
    } catch (e) {
      this._responders.delete(target);
      throw e;
    }
    const stop = () => {
      if (this._responders.get(target) !== rec) return Promise.resolve();
      this._responders.delete(target);
      this._stopped.add(target);
      return this._withdraw("DREQ", target, true);
    };
    return thenable(stop, rec, { target, stop });
  }

  /** Publish `body` (a string or bytes: Uint8Array, ArrayBuffer) to `topic`. */
  publish(topic, body = "", headers = {}) {
    checkTarget(topic);
    this._send(encode("PUB", topic, headerPairs(headers), body));
  }

  /**
   * Request `target`; resolves with the RES message, rejects with a MiddlemanError
   * carrying the server's reason ("no responder", ...), "request timed out" after
   * timeoutMs (default 30000), or "connection lost" if the connection ends first.
   */
  request(target, body = "", { headers = {}, timeoutMs = 30000 } = {}) {
    try {
      checkTarget(target);
      const pairs = headerPairs(headers);
      if (pairs.some(([n]) => n.toLowerCase() === "reqid")) {
        throw new TypeError("middleman: ReqID is set by the client");
      }
      const id = `${this._prefix}-${++this._nextId}`;
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          this._pending.delete(id);
          reject(new MiddlemanError("request timed out", { cmd: "REQ", target, reqid: id }));
        }, timeoutMs);
        this._pending.set(id, { resolve, reject, timer, sent: false, target });
        try {
          this._send(encode("REQ", target, [["ReqID", id], ...pairs], body), id);
        } catch (e) {
          clearTimeout(timer);
          this._pending.delete(id);
          reject(e);
        }
      });
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Send any command (services: EPUB, ESUB, EREQ, INT, RES, ...). */
  send(cmd, target, body = "", headers = {}) {
    checkCmd(cmd);
    checkTarget(target);
    this._send(encode(cmd, target, headerPairs(headers), body));
  }

  // ------------------------------------------------------- protocol 1.1 (services)
  // Each of these returns a promise-like (then/catch/finally) that resolves once the
  // server has taken the command and rejects with its MiddlemanError ("not permitted",
  // "bad cid", "bad topic", "too many grants", ...); a refusal goes to onerror only when
  // nobody awaits it.

  /** Let clients publish to `topic` (EPUB); sent again after a reconnect. */
  enablePublish(topic) {
    return this._enable("EPUB", topic);
  }

  /** Let clients subscribe to `topic` (ESUB); sent again after a reconnect. */
  enableSubscribe(topic) {
    return this._enable("ESUB", topic);
  }

  /** Withdraw this service's EPUB of `topic` (DPUB). */
  disablePublish(topic) {
    return this._disable("DPUB", topic);
  }

  /** Withdraw this service's ESUB of `topic` (DSUB); existing subscriptions stay. */
  disableSubscribe(topic) {
    return this._disable("DSUB", topic);
  }

  /** Withdraw this service's EREQ of `target` (DREQ): it is no longer a responder for it
   *  (a respond() handler for it stops too). */
  disableRequests(target) {
    if (this._responders.has(target)) {
      this._responders.delete(target);
      this._stopped.add(target);
    }
    return this._disable("DREQ", target);
  }

  /** Let connection `cid` alone subscribe to `topic` (ESUB with forcid). The grant lasts
   *  until revoked or either connection leaves (not made again after a reconnect). */
  grantSub(cid, topic) {
    return this._command("ESUB", topic, [["forcid", cid]]);
  }

  /** Let connection `cid` alone publish to `topic` (EPUB with forcid). */
  grantPub(cid, topic) {
    return this._command("EPUB", topic, [["forcid", cid]]);
  }

  /** Let connection `cid` alone request `target` (EREQ with forcid; this does not make
   *  this connection a responder). */
  grantReq(cid, target) {
    return this._command("EREQ", target, [["forcid", cid]]);
  }

  /** Withdraw grantSub (DSUB with forcid): if it was the connection's last right to
   *  subscribe to `topic`, it is unsubscribed. */
  revokeSub(cid, topic) {
    return this._command("DSUB", topic, [["forcid", cid]]);
  }

  /** Withdraw grantPub (DPUB with forcid). */
  revokePub(cid, topic) {
    return this._command("DPUB", topic, [["forcid", cid]]);
  }

  /** Withdraw grantReq (DREQ with forcid). */
  revokeReq(cid, target) {
    return this._command("DREQ", target, [["forcid", cid]]);
  }

  /** Subscribe connection `cid` to `topic` (INT SUB); it is not told. */
  subscribeFor(cid, topic) {
    return this._command("INT", "SUB", [["forcid", cid], ["topic", topic]]);
  }

  /** Unsubscribe connection `cid` from `topic` (INT UNS). */
  unsubscribeFor(cid, topic) {
    return this._command("INT", "UNS", [["forcid", cid], ["topic", topic]]);
  }

  /** Close connection `cid` with code 4000 and `reason` (INT KICK; "kicked" when
   *  omitted; the server cuts it to 120 bytes). A cid that is not connected: no-op. */
  kick(cid, reason) {
    const headers = [["forcid", cid]];
    if (reason != null) headers.push(["reason", reason]);
    return this._command("INT", "KICK", headers);
  }

  /**
   * Who is subscribed to `topic` (REQ SYS:PRESENCE): resolves with { count, users,
   * members: [{ cid, uid }], truncated, partial }, at most `limit` members (default 1000;
   * 0: the counts alone; the server caps it at 10000), sorted by cid. Rejects like
   * request().
   */
  presence(topic, { limit = 1000, timeoutMs = 30000 } = {}) {
    if (!Number.isSafeInteger(limit) || limit < 0) {
      return Promise.reject(new TypeError(`middleman: limit must be an integer >= 0, not ${limit}`));
    }
    return this.request("SYS:PRESENCE", "", {
      headers: [
        ["topic", String(topic)],
        ["limit", String(limit)],
      ],
      timeoutMs,
    }).then(parsePresence);
  }

  /**
   * Connection events (services): `cb(event)` gets { kind, cid, uid, role, topic, reason,
   * message } for each event of `kinds` ("connect", "disconnect", "sub", "uns", or their
   * topics; all four when omitted: events(cb) works too). Returns a function that
   * unsubscribes from them, which is also a promise-like that resolves once the server
   * took every SUB and rejects with the first refusal. Sent again after a reconnect.
   */
  events(kinds, cb) {
    if (typeof kinds === "function" && cb === undefined) {
      cb = kinds;
      kinds = undefined;
    }
    if (typeof cb !== "function") throw new TypeError("middleman: events needs a callback");
    const topics = eventTopics(kinds);
    const subs = [];
    const onMsg = (m) => {
      const ev = parseEvent(m);
      if (ev) cb(ev);
    };
    try {
      for (const t of topics) subs.push(this.subscribe(t, onMsg));
    } catch (e) {
      for (const off of subs) off();
      throw e;
    }
    const off = () => Promise.all(subs.map((f) => f())).then(() => undefined);
    const all = () =>
      Promise.all(subs.map((sub) => new Promise((resolve, reject) => sub.then(resolve, reject)))).then(() => ({
        topics,
        unsubscribe: off,
      }));
    off.then = (ok, fail) => all().then(ok, fail);
    off.catch = (fail) => off.then(undefined, fail);
    off.finally = (f) => off.then().finally(f);
    return off;
  }

  /** Close for good: pending requests are rejected, no reconnect. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    for (const topic of [...this._resubscribing.keys()]) this._stopRetry(topic);
    this._failPending(() => true, "closed");
    this._failConfirms("closed");
    this._queue = [];
    const ws = this._ws;
    this._ws = null;
    this._state = "closed";
    if (ws) ws.close(1000);
    if (!this._everOpen) this._rejectReady(new MiddlemanError("closed"));
  }

  _open() {
    this._state = "key";
    let ws;
    try {
      if (typeof this._WebSocket !== "function") {
        throw new MiddlemanError(
          "no WebSocket: Node 20 needs --experimental-websocket (Node 22 has it), or pass options.WebSocket",
        );
      }
      ws = new this._WebSocket(this.url);
    } catch (e) {
      this._closed = true;
      this._rejectReady(e);
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    ws.onopen = () => ws.send(this._key);
    ws.onmessage = (ev) => {
      if (ws === this._ws) this._onData(ws, ev.data);
    };
    ws.onclose = (ev) => {
      if (ws === this._ws) this._onClose(ev.code, ev.reason);
    };
    ws.onerror = () => {
      // Browsers follow with onclose, which has the details. Node 20's WebSocket fires
      // only error when the connection fails: end it here if no close came meanwhile.
      setTimeout(() => {
        if (ws !== this._ws) return;
        try {
          ws.close();
        } catch {
          // already closing
        }
        this._onClose(1006, "");
      }, 100);
    };
  }

  _onData(ws, data) {
    if (this._state === "open") {
      let msgs;
      try {
        msgs = decode(data);
      } catch (e) {
        this._report(new MiddlemanError(e.message));
        return;
      }
      for (const m of msgs) this._dispatch(m);
      return;
    }
    const text = typeof data === "string" ? data : fromUtf8.decode(data);
    if (this._state === "key") {
      if (text !== "MM OK") {
        ws.close(4002, "expected MM OK"); // browsers only send 1000 or 3000-4999
        return;
      }
      this._state = "cid";
      return;
    }
    if (this._state === "cid") this._authenticated(text);
  }

  _authenticated(cid) {
    const reconnected = this._everOpen;
    this.cid = cid;
    this._state = "open";
    this._attempt = 0;
    this._everOpen = true;
    if (reconnected) {
      // Enablements first, so this service's own clients may subscribe again.
      for (const rec of this._enabled.values()) {
        this._ws.send(encode(rec.cmd, rec.target, [], ""));
      }
      for (const [topic, rec] of this._subs) {
        // Only a subscription the server took before is retried when refused now; one
        // still waiting for its first answer is confirmed or refused below.
        if (rec.confirmed) this._resubscribing.set(topic, { attempt: 0, timer: null });
        this._ws.send(encode("SUB", topic, [], ""));
      }
      for (const target of this._responders.keys()) this._ws.send(encode("EREQ", target, [], ""));
    }
    const queued = this._queue;
    this._queue = [];
    for (const [text, reqid, kind] of queued) {
      // After a reconnect the subscriptions were just sent from this._subs.
      if (!(reconnected && kind === "sub")) this._transmit(text, reqid);
    }
    // Everything waiting for confirmation is on the wire now (a withdrawn one is not).
    for (const c of [...this._confirms]) {
      if (!reconnected || this._current(c)) c.sent = true;
      else this._settle(c, null);
    }
    this._scheduleProbe();
    if (!reconnected) this._resolveReady();
    if (this.onopen) this.onopen({ cid, reconnected });
  }

  _dispatch(m) {
    if (m.cmd === "PUB" && m.target === "ERROR") {
      const err = new MiddlemanError(m.header("reason") ?? m.body, {
        cmd: m.header("cmd") ?? "",
        target: m.header("target") ?? "",
        reqid: m.header("ReqID") ?? null,
      });
      if (err.cmd === PROBE_CMD && err.target.startsWith(`${this._prefix}-probe-`)) {
        const n = Number(err.target.slice(this._prefix.length + 7));
        for (const c of [...this._confirms]) if (c.probe != null && c.probe <= n) this._settle(c, null);
        return;
      }
      const c = this._confirms.find((c) => c.sent && c.cmd === err.cmd && c.target === err.target);
      if (c) {
        // The refusal of a SUB/EREQ still waiting: errors come in the order of the
        // commands, so it is the oldest one waiting for that target.
        if (c.kind !== "cmd" && this._current(c)) {
          if (c.cmd === "SUB") this._subs.delete(c.target);
          else if (c.cmd === "EREQ") this._responders.delete(c.target);
          else this._enabled.delete(`${c.cmd} ${c.target}`);
        }
        this._settle(c, err);
        if (!c.rec.handled) this._report(err);
        return;
      }
      const p = err.reqid != null ? this._pending.get(err.reqid) : undefined;
      if (p) {
        this._pending.delete(err.reqid);
        clearTimeout(p.timer);
        p.reject(err);
        return;
      }
      if (err.cmd === "SUB" && this._subs.has(err.target)) {
        const retry = this._resubscribing.get(err.target);
        if (retry) {
          // A topic that was permitted before the reconnect: its service may not be
          // back yet, so try again later.
          err.retrying = true;
          this._scheduleResubscribe(err.target, retry);
        } else {
          this._subs.delete(err.target); // refused at first: not re-sent on reconnect
        }
      }
      this._report(err);
      return;
    }
    if (m.cmd === "RES") {
      const id = m.header("ReqID");
      const p = id != null ? this._pending.get(id) : undefined;
      if (p) {
        this._pending.delete(id);
        clearTimeout(p.timer);
        p.resolve(m);
      }
      return; // late answers to timed-out requests are dropped
    }
    if (m.cmd === "REQ") {
      const r = this._responders.get(m.target);
      const rid = m.header("rid");
      if (r && rid != null) {
        this._answer(r, m, rid);
        return;
      }
      if (rid != null && this._stopped.has(m.target)) {
        // A server without DREQ still routes requests here: answer rather than let the
        // requester wait for its timeout.
        const ws = this._ws;
        ws.send(encode("RES", m.target, [["rid", rid], ["error", "not responding"]], ""));
        return;
      }
    }
    const rec = m.cmd === "PUB" ? this._subs.get(m.target) : undefined;
    const cbs = rec ? [...rec.entries].filter((e) => e.cb) : [];
    if (cbs.length > 0) {
      for (const { cb } of cbs) {
        try {
          cb(m);
        } catch (e) {
          setTimeout(() => {
            throw e;
          });
        }
      }
    } else if (this.onmessage) {
      this.onmessage(m);
    }
  }

  _scheduleResubscribe(topic, retry) {
    const delay = this._backoff(retry.attempt++);
    clearTimeout(retry.timer);
    retry.timer = setTimeout(() => {
      retry.timer = null;
      if (this._state === "open" && this._subs.has(topic)) {
        this._ws.send(encode("SUB", topic, [], ""));
      }
    }, delay);
  }

  _stopRetry(topic) {
    const retry = this._resubscribing.get(topic);
    if (retry) clearTimeout(retry.timer);
    this._resubscribing.delete(topic);
  }

  _onClose(code, reason) {
    this._ws = null;
    this._state = "closed";
    for (const topic of [...this._resubscribing.keys()]) this._stopRetry(topic);
    // The server forgot the requests this connection sent.
    this._failPending((p) => p.sent, "connection lost");
    // Commands waiting for confirmation are sent again after the reconnect; a protocol
    // 1.1 command already sent is not (the server forgot what it did), so it fails.
    for (const c of [...this._confirms]) {
      if (c.kind === "cmd" && c.sent) {
        this._settle(c, new MiddlemanError("connection lost", { cmd: c.cmd, target: c.target }));
        if (!c.rec.handled) this._report(new MiddlemanError("connection lost", { cmd: c.cmd, target: c.target }));
        continue;
      }
      c.sent = false;
      c.probe = null;
    }
    const badKey = code === 1008 && reason === "bad key";
    // A kicked connection (close 4000) does not come back on its own: a service wants it
    // gone. onclose tells the app ({ code: 4000, reason, reconnecting: false }).
    const kicked = code === KICK_CODE;
    if (!this._everOpen) {
      this._closed = true;
      this._failPending(() => true, "connection lost");
      this._failConfirms("connection lost");
      this._rejectReady(
        new MiddlemanError(badKey ? "bad key" : `connection failed (${code}${reason ? " " + reason : ""})`),
      );
      return;
    }
    if (this._closed) return;
    const reconnecting = this._reconnect && !badKey && !kicked;
    if (this.onclose) this.onclose({ code, reason, reconnecting });
    if (!reconnecting) {
      this._closed = true;
      this._failPending(() => true, "connection lost");
      this._failConfirms("connection lost");
      this._queue = [];
      if (badKey) this._report(new MiddlemanError("bad key"));
      return;
    }
    this._timer = setTimeout(() => this._open(), this._backoff(this._attempt++));
  }

  /** Exponential backoff with jitter: half to all of min(max, min * 2^attempt). */
  _backoff(attempt) {
    const full = Math.min(this._maxDelay, this._minDelay * 2 ** Math.min(attempt, 30));
    return full / 2 + (Math.random() * full) / 2;
  }

  _failPending(which, reason) {
    for (const [id, p] of [...this._pending]) {
      if (!which(p)) continue;
      this._pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new MiddlemanError(reason, { cmd: "REQ", target: p.target, reqid: id }));
    }
  }

  /** A confirmed command of protocol 1.1 (grants, INT SUB/UNS/KICK, D*): a promise-like
   *  of the server's answer. Queued while disconnected, like publish. */
  _command(cmd, target, headers) {
    checkTarget(target);
    const pairs = headerPairs(headers);
    const rec = { handled: false, ready: null };
    this._want(cmd, target, rec, pairs, "cmd");
    return thenable({}, rec, undefined);
  }

  _enable(cmd, topic) {
    checkTarget(topic);
    const key = `${cmd} ${topic}`;
    const rec = { cmd, target: topic, handled: false, ready: null };
    this._enabled.set(key, rec);
    try {
      this._want(cmd, topic, rec);
    } catch (e) {
      this._enabled.delete(key);
      throw e;
    }
    return thenable({}, rec, undefined);
  }

  _disable(cmd, topic) {
    checkTarget(topic);
    this._enabled.delete(`E${cmd.slice(1)} ${topic}`);
    return this._command(cmd, topic, []);
  }

  /** Send `cmd target` (SUB, EREQ, UNS, DREQ; with `kind` "cmd" any other) and arrange
   *  for its confirmation (rec.ready). Kind "sub" is not sent from the queue after a
   *  reconnect (it is sent again from this._subs, _responders or _enabled). */
  _want(cmd, target, rec, headers = [], kind = "sub") {
    const c = { cmd, target, rec, kind, sent: false, probe: null, resolve: null, reject: null };
    rec.ready = new Promise((resolve, reject) => {
      c.resolve = resolve;
      c.reject = reject;
    });
    rec.ready.catch(() => {}); // not an unhandled rejection when nobody awaits it
    this._send(encode(cmd, target, headers, ""), null, kind);
    this._confirms.push(c);
    if (this._state === "open") {
      c.sent = true;
      this._scheduleProbe();
    }
  }

  /** Send UNS/DREQ; the promise resolves once the server has processed it (or at once
   *  when closed). It never rejects: a refusal goes to onerror. */
  _withdraw(cmd, target, quiet = false) {
    if (this._closed) return Promise.resolve();
    const rec = { handled: quiet, always: true, ready: null };
    this._want(cmd, target, rec);
    return rec.ready;
  }

  /** Whether `c` still belongs to the live subscription / responder / enablement of its
   *  target, or is a command still queued to be sent. */
  _current(c) {
    if (c.kind === "cmd") return true;
    if (c.cmd === "EPUB" || c.cmd === "ESUB") return this._enabled.get(`${c.cmd} ${c.target}`) === c.rec;
    const map = c.cmd === "SUB" ? this._subs : c.cmd === "EREQ" ? this._responders : null;
    return map != null && map.get(c.target) === c.rec;
  }

  _settle(c, err) {
    const i = this._confirms.indexOf(c);
    if (i >= 0) this._confirms.splice(i, 1);
    if (err && !c.rec.always) c.reject(err);
    else {
      c.rec.confirmed = true;
      c.resolve();
    }
  }

  _failConfirms(reason) {
    for (const c of [...this._confirms]) this._settle(c, new MiddlemanError(reason, { cmd: c.cmd, target: c.target }));
  }

  /** After the current task: one probe for every command sent but not confirmed yet.
   *  The server answers an unknown command with an error, after the errors of the
   *  commands before it, so its answer confirms every SUB/EREQ sent before it. */
  _scheduleProbe() {
    if (this._probeQueued) return;
    this._probeQueued = true;
    queueMicrotask(() => {
      this._probeQueued = false;
      if (this._state !== "open") return;
      const waiting = this._confirms.filter((c) => c.sent && c.probe == null);
      if (waiting.length === 0) return;
      const n = ++this._probeSeq;
      for (const c of waiting) c.probe = n;
      this._ws.send(encode(PROBE_CMD, `${this._prefix}-probe-${n}`, [], ""));
    });
  }

  /** Run a responder's handler for `m` and answer it on the connection it came from. */
  _answer(r, m, rid) {
    const ws = this._ws;
    Promise.resolve()
      .then(() => r.handler(m))
      .then((out) => {
        let body = "";
        let headers = [];
        if (typeof out === "string" || isBytes(out)) body = out;
        else if (out != null && typeof out === "object") {
          body = out.body ?? "";
          headers = headerPairs(out.headers);
        } else if (out != null) body = String(out);
        headers = headers.filter(([n]) => n.toLowerCase() !== "rid");
        return encode("RES", m.target, [["rid", rid], ...headers], body);
      })
      .catch((e) => {
        const text = String(e?.message ?? e).replace(/[\x00-\x1f\x7f]+/g, " ").trim().slice(0, 200) || "error";
        const err = new MiddlemanError(`responder failed: ${text}`, { cmd: "REQ", target: m.target });
        err.cause = e;
        if (this.onerror) this._report(err);
        else console.error(err);
        return encode("RES", m.target, [["rid", rid], ["error", text]], "");
      })
      .then((frame) => {
        // After a lost connection the server has already answered the requester.
        if (this._ws === ws && this._state === "open") ws.send(frame);
      });
  }

  _send(text, reqid = null, kind = "") {
    if (this._closed) throw new MiddlemanError("closed");
    if (this._state === "open") {
      this._transmit(text, reqid);
      return;
    }
    if (this._queue.length >= this._maxQueue) {
      throw new MiddlemanError("not connected (send queue full)");
    }
    this._queue.push([text, reqid, kind]);
  }

  _transmit(text, reqid) {
    if (reqid != null) {
      const p = this._pending.get(reqid);
      if (!p) return; // timed out while queued
      p.sent = true;
    }
    this._ws.send(text);
  }

  _report(err) {
    if (this.onerror) this.onerror(err);
  }
}
