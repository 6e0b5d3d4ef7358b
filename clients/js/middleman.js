// middleman.js: a browser client for middleman servers (protocol version 1).
// An ES module with no dependencies; the server serves it at GET /middleman.js.
//
//   import { connect } from "/middleman.js";
//   const mm = await connect("ws://127.0.0.1:8765/", key, { reconnect: true });
//   const off = mm.subscribe("news", (msg) => console.log(msg.header("cid"), msg.body));
//   mm.publish("news", "hello", { "X-Lang": "en" });
//   const res = await mm.request("time", "", { headers: {}, timeoutMs: 5000 });
//   mm.onerror = (err) => console.warn(err.reason, err.cmd, err.target);
//   mm.close();
//
// Framing follows PROTOCOL.md section 2: CRLF line ends, every header sent, body lines
// starting with "." stuffed on the way out and unstuffed on the way in, body line breaks
// kept as they are. Requests are matched by their ReqID header (case-insensitive); the
// server's PUB ERROR for a request rejects its promise with a MiddlemanError carrying the
// server's reason. After a lost connection the client reconnects with exponential backoff
// and jitter, authenticates again (a new cid) and re-subscribes every topic.

const MAX_TARGET = 255;
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

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
  constructor(cmd, target, headers, body) {
    this.cmd = cmd;
    this.target = target;
    /** Every header in order: [name, value] pairs, names as sent. */
    this.headers = headers;
    this.body = body;
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

/** Encode one protocol message (exported for tests). */
export function encode(cmd, target, headers, body) {
  let s = `${cmd} ${target}\r\n`;
  for (const [n, v] of headers) s += `${n}: ${v}\r\n`;
  s += "\r\n";
  const text = body == null ? "" : String(body);
  s += text
    .split("\n")
    .map((line) => (line.startsWith(".") ? "." + line : line))
    .join("\n");
  return s + "\r\n.\r\n";
}

const trim = (s) => s.replace(/^[ \t]+|[ \t]+$/g, "");

/** Decode the protocol messages in one WebSocket message (exported for tests). */
export function decode(text) {
  const out = [];
  let pos = 0;
  const nextLine = () => {
    const nl = text.indexOf("\n", pos);
    if (nl < 0) throw new Error("middleman: incomplete message from server");
    const raw = text.slice(pos, nl + 1);
    pos = nl + 1;
    const content = raw.endsWith("\r\n") ? raw.slice(0, -2) : raw.slice(0, -1);
    return [raw, content];
  };
  while (pos < text.length) {
    const [, first] = nextLine();
    if (first === "") continue; // empty lines between messages
    const sp = first.indexOf(" ");
    if (sp <= 0) throw new Error(`middleman: unparsable line from server: ${first}`);
    const cmd = first.slice(0, sp);
    const target = trim(first.slice(sp + 1));
    const headers = [];
    let ended = false;
    for (;;) {
      const [, line] = nextLine();
      if (line === "") break;
      if (line === ".") {
        ended = true;
        break;
      }
      const colon = line.indexOf(":");
      if (colon < 0) throw new Error(`middleman: header line without ':' from server`);
      headers.push([trim(line.slice(0, colon)), trim(line.slice(colon + 1))]);
    }
    let body = "";
    if (!ended) {
      const parts = [];
      for (;;) {
        const [raw, line] = nextLine();
        if (line === ".") break;
        parts.push(raw.startsWith("..") ? raw.slice(1) : raw);
      }
      body = parts.join("");
      // Without the line break just before the terminator.
      if (body.endsWith("\r\n")) body = body.slice(0, -2);
      else if (body.endsWith("\n")) body = body.slice(0, -1);
    }
    out.push(new Message(cmd, target, headers, body));
  }
  return out;
}

/**
 * Connect, authenticate with `key` and resolve with the client once the server has
 * assigned a connection id. Rejects if the first connection fails or the key is refused.
 * Options: reconnect (default true), minDelayMs (250), maxDelayMs (10000),
 * maxQueue (1000 messages kept while disconnected).
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
    this._subs = new Map(); // topic -> Set of { cb }
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
   * Subscribe to `topic`; `cb(msg)` gets each message published to it. Returns a
   * function that removes this subscription (UNS when it was the topic's last).
   */
  subscribe(topic, cb) {
    checkTarget(topic);
    if (typeof cb !== "function") throw new TypeError("middleman: subscribe needs a callback");
    let set = this._subs.get(topic);
    if (!set) {
      set = new Set();
      this._subs.set(topic, set);
      this._send(encode("SUB", topic, [], ""), null, "sub");
    }
    const entry = { cb };
    set.add(entry);
    return () => {
      if (!set.delete(entry) || set.size > 0 || this._subs.get(topic) !== set) return;
      this._subs.delete(topic);
      this._stopRetry(topic);
      if (!this._closed) this._send(encode("UNS", topic, [], ""), null, "sub");
    };
  }

  /** Publish `body` (a string) to `topic` with optional headers. */
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

  /** Close for good: pending requests are rejected, no reconnect. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    for (const topic of [...this._resubscribing.keys()]) this._stopRetry(topic);
    this._failPending(() => true, "closed");
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
      ws = new WebSocket(this.url);
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
    ws.onerror = () => {}; // onclose follows with the details
  }

  _onData(ws, data) {
    const text = typeof data === "string" ? data : fromUtf8.decode(data);
    if (this._state === "key") {
      if (text !== "MM OK") {
        ws.close(4002, "expected MM OK"); // browsers only send 1000 or 3000-4999
        return;
      }
      this._state = "cid";
      return;
    }
    if (this._state === "cid") {
      this._authenticated(text);
      return;
    }
    let msgs;
    try {
      msgs = decode(text);
    } catch (e) {
      this._report(new MiddlemanError(e.message));
      return;
    }
    for (const m of msgs) this._dispatch(m);
  }

  _authenticated(cid) {
    const reconnected = this._everOpen;
    this.cid = cid;
    this._state = "open";
    this._attempt = 0;
    this._everOpen = true;
    if (reconnected) {
      for (const topic of this._subs.keys()) {
        this._resubscribing.set(topic, { attempt: 0, timer: null });
        this._ws.send(encode("SUB", topic, [], ""));
      }
    }
    const queued = this._queue;
    this._queue = [];
    for (const [text, reqid, kind] of queued) {
      // After a reconnect the subscriptions were just sent from this._subs.
      if (!(reconnected && kind === "sub")) this._transmit(text, reqid);
    }
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
    const set = m.cmd === "PUB" ? this._subs.get(m.target) : undefined;
    if (set && set.size > 0) {
      for (const { cb } of [...set]) {
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
    const badKey = code === 1008 && reason === "bad key";
    if (!this._everOpen) {
      this._closed = true;
      this._failPending(() => true, "connection lost");
      this._rejectReady(
        new MiddlemanError(badKey ? "bad key" : `connection failed (${code}${reason ? " " + reason : ""})`),
      );
      return;
    }
    if (this._closed) return;
    const reconnecting = this._reconnect && !badKey;
    if (this.onclose) this.onclose({ code, reason, reconnecting });
    if (!reconnecting) {
      this._closed = true;
      this._failPending(() => true, "connection lost");
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
