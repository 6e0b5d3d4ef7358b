// Types for middleman.js, the browser (and Node) client of middleman (protocol version 1
// and the 1.1 additions).

/** Headers to send: an object, a Map, or [name, value] pairs (every one is sent). */
export type Headers = Record<string, string> | Map<string, string> | Array<[string, string]>;

/** A body to send: text (sent as UTF-8) or bytes. Bytes that are not valid UTF-8 go in a
 *  binary WebSocket frame. */
export type Body = string | Uint8Array | ArrayBufferView | ArrayBuffer;

/** What a respond() handler returns: the body, or the body with headers; nothing is an
 *  empty body. */
export type Reply = string | Uint8Array | ArrayBufferView | ArrayBuffer | { body?: Body; headers?: Headers } | null | undefined | void;

/** A WebSocket constructor (the browser's, Node's global one, or the `ws` package's);
 *  structural, so it type-checks without the DOM library. */
export type WebSocketConstructor = new (url: string) => object;

/** The function subscribe() returns: call it to unsubscribe (the promise resolves once the
 *  server processed the UNS, never rejects); await it for the server's answer to the SUB
 *  (rejects with a MiddlemanError such as "not permitted"). */
export interface Subscription extends PromiseLike<{ topic: string; unsubscribe: Subscription }> {
  (): Promise<void>;
  catch<T = never>(onrejected?: ((reason: MiddlemanError) => T | PromiseLike<T>) | null): Promise<{ topic: string; unsubscribe: Subscription } | T>;
  finally(onfinally?: (() => void) | null): Promise<{ topic: string; unsubscribe: Subscription }>;
}

/** The function respond() returns: call it to stop answering (DREQ); await it for the
 *  server's answer to the EREQ (rejects with a MiddlemanError such as "not permitted"). */
export interface Responder extends PromiseLike<{ target: string; stop: Responder }> {
  (): Promise<void>;
  catch<T = never>(onrejected?: ((reason: MiddlemanError) => T | PromiseLike<T>) | null): Promise<{ target: string; stop: Responder } | T>;
  finally(onfinally?: (() => void) | null): Promise<{ target: string; stop: Responder }>;
}

/** What the protocol 1.1 commands (grants, D*, INT SUB/UNS/KICK) return: resolves once the
 *  server took the command; rejects with its MiddlemanError ("not permitted", "bad cid",
 *  "bad topic", "too many grants", ...). A refusal goes to onerror only when nobody awaits
 *  it (then/catch). */
export interface Confirmation extends PromiseLike<void> {
  catch<T = never>(onrejected?: ((reason: MiddlemanError) => T | PromiseLike<T>) | null): Promise<void | T>;
  finally(onfinally?: (() => void) | null): Promise<void>;
}

/** One connection subscribed to a topic; `uid` is "" when none was set. */
export interface Member {
  cid: string;
  uid: string;
}

/** The answer of presence(). */
export interface Presence {
  /** Connections subscribed to the topic (services included). */
  count: number;
  /** Distinct non-empty uids among them. */
  users: number;
  /** At most `limit` of them, sorted by cid. */
  members: Member[];
  /** There were more than `limit`. */
  truncated: boolean;
  /** A cluster node did not answer in time: the numbers cover the nodes that did. */
  partial: boolean;
}

export interface PresenceOptions {
  /** List at most this many members (0: the counts alone). Default 1000; the server caps
   *  it at 10000. */
  limit?: number;
  /** Reject with "request timed out" after this long. Default 30000. */
  timeoutMs?: number;
}

export type EventKind = "connect" | "disconnect" | "sub" | "uns";

/** A connection event (protocol 1.1); cid, uid and role are those of the connection the
 *  event is about. */
export interface MiddlemanEvent {
  kind: EventKind;
  cid: string;
  /** "" when none was set. */
  uid: string;
  /** "service", "client" or "monitor". */
  role: string;
  /** The topic, for "sub" and "uns"; else null. */
  topic: string | null;
  /** Why it ended ("normal", "idle", "kicked", ...), for "disconnect"; else null. */
  reason: string | null;
  /** The message it was read from. */
  message: Message;
}

/** The function events() returns: call it to unsubscribe; await it for the server's
 *  answer to the SUBs (rejects with the first refusal). */
export interface Events extends PromiseLike<{ topics: string[]; unsubscribe: Events }> {
  (): Promise<void>;
  catch<T = never>(onrejected?: ((reason: MiddlemanError) => T | PromiseLike<T>) | null): Promise<{ topics: string[]; unsubscribe: Events } | T>;
  finally(onfinally?: (() => void) | null): Promise<{ topics: string[]; unsubscribe: Events }>;
}

/** The close code of a connection a service kicked. */
export const KICK_CODE: 4000;

/** The event topics by kind. */
export const EVENT_TOPICS: Readonly<{ connect: "SYS:CONNECT"; disconnect: "SYS:DISCONNECT"; sub: "SYS:SUB"; uns: "SYS:UNS" }>;

export interface ConnectOptions {
  /** Reconnect after a lost connection (not after close(), a refused key or a kick).
   *  Default true. */
  reconnect?: boolean;
  /** First reconnect delay; doubles per attempt, with jitter (half to all of it). Default 250. */
  minDelayMs?: number;
  /** Longest reconnect delay. Default 10000. */
  maxDelayMs?: number;
  /** Messages kept while disconnected before publish/request throw. Default 1000. */
  maxQueue?: number;
  /** The WebSocket constructor. Default globalThis.WebSocket (browsers, Node 22, Node 20
   *  with --experimental-websocket); e.g. `WebSocket` from the `ws` package. */
  WebSocket?: WebSocketConstructor;
}

export interface RequestOptions {
  headers?: Headers;
  /** Reject with "request timed out" after this long. Default 30000. */
  timeoutMs?: number;
}

/** One received message. */
export class Message {
  readonly cmd: string;
  readonly target: string;
  /** Every header in order, names as sent. */
  readonly headers: Array<[string, string]>;
  /** The body as text (invalid UTF-8 replaced by U+FFFD). */
  readonly body: string;
  /** The body as bytes, exactly as relayed. */
  readonly bytes: Uint8Array;
  /** The first header with this name (case-insensitive). */
  header(name: string): string | undefined;
  /** The sender's connection id (set by the server). */
  readonly cid: string | undefined;
  /** The sender's user id (set by the server). */
  readonly uid: string | undefined;
}

/** A server error (PUB ERROR) or a client-side failure. */
export class MiddlemanError extends Error {
  /** "no responder", "not permitted", "request timed out", "responder disconnected",
   *  "connection lost", "closed", "bad key", ... */
  readonly reason: string;
  readonly cmd: string;
  readonly target: string;
  readonly reqid: string | null;
  /** A refused re-subscription after a reconnect, which will be retried. */
  readonly retrying: boolean;
}

export class Middleman {
  readonly url: string;
  /** The current connection id (a new one after each reconnect). */
  readonly cid: string | null;
  readonly connected: boolean;
  /** Server errors not tied to a request (e.g. a refused SUB or PUB). */
  onerror: ((err: MiddlemanError) => void) | null;
  /** Messages no subscription takes (e.g. on the private channel MSG:<cid>). */
  onmessage: ((msg: Message) => void) | null;
  /** After each authentication. */
  onopen: ((info: { cid: string; reconnected: boolean }) => void) | null;
  /** When a connection ends; code 4000 (KICK_CODE): a service kicked it, with its reason
   *  (no reconnect follows). */
  onclose: ((info: { code: number; reason: string; reconnecting: boolean }) => void) | null;
  /** Subscribe; returns a function that removes this subscription, which is also a
   *  promise of the server's answer. Without `cb`, the topic's messages go to onmessage.
   *  A refusal goes to onerror only when nobody awaits (then/catch) the subscription. */
  subscribe(topic: string, cb?: (msg: Message) => void): Subscription;
  /** Answer requests for `target` (services): EREQ, then a RES echoing `rid` per REQ with
   *  what the handler returns. A handler that throws still answers: an empty body with the
   *  header `error: <message>`, and the error goes to onerror (or console.error). */
  respond(target: string, handler: (req: Message) => Reply | Promise<Reply>): Responder;
  publish(topic: string, body?: Body, headers?: Headers): void;
  /** Resolves with the RES; rejects with a MiddlemanError carrying the server's reason. */
  request(target: string, body?: Body, options?: RequestOptions): Promise<Message>;
  /** Any command (services: EPUB, ESUB, EREQ, INT, RES, ...). */
  send(cmd: string, target: string, body?: Body, headers?: Headers): void;

  // Services, protocol 1.1.
  /** Let clients publish to `topic` (EPUB); sent again after a reconnect. */
  enablePublish(topic: string): Confirmation;
  /** Let clients subscribe to `topic` (ESUB); sent again after a reconnect. */
  enableSubscribe(topic: string): Confirmation;
  /** Withdraw this service's EPUB of `topic` (DPUB). */
  disablePublish(topic: string): Confirmation;
  /** Withdraw this service's ESUB of `topic` (DSUB); existing subscriptions stay. */
  disableSubscribe(topic: string): Confirmation;
  /** Withdraw this service's EREQ of `target` (DREQ); a respond() handler for it stops. */
  disableRequests(target: string): Confirmation;
  /** Let connection `cid` alone subscribe to `topic` (ESUB with forcid). */
  grantSub(cid: string, topic: string): Confirmation;
  /** Let connection `cid` alone publish to `topic` (EPUB with forcid). */
  grantPub(cid: string, topic: string): Confirmation;
  /** Let connection `cid` alone request `target` (EREQ with forcid; not a responder). */
  grantReq(cid: string, target: string): Confirmation;
  /** Withdraw grantSub (DSUB with forcid); its last right gone, `cid` is unsubscribed. */
  revokeSub(cid: string, topic: string): Confirmation;
  /** Withdraw grantPub (DPUB with forcid). */
  revokePub(cid: string, topic: string): Confirmation;
  /** Withdraw grantReq (DREQ with forcid). */
  revokeReq(cid: string, target: string): Confirmation;
  /** Subscribe connection `cid` to `topic` (INT SUB); it is not told. */
  subscribeFor(cid: string, topic: string): Confirmation;
  /** Unsubscribe connection `cid` from `topic` (INT UNS). */
  unsubscribeFor(cid: string, topic: string): Confirmation;
  /** Close connection `cid` with code 4000 and `reason` (default "kicked"). */
  kick(cid: string, reason?: string): Confirmation;
  /** Who is subscribed to `topic` (REQ SYS:PRESENCE). */
  presence(topic: string, options?: PresenceOptions): Promise<Presence>;
  /** Connection events of `kinds` (all four when omitted), to `cb`. */
  events(cb: (ev: MiddlemanEvent) => void): Events;
  events(kinds: EventKind | string | Array<EventKind | string> | null | undefined, cb: (ev: MiddlemanEvent) => void): Events;
  /** Close for good. */
  close(): void;
}

/** Connect and authenticate; resolves once the server assigned a cid. */
export function connect(url: string, key: string, options?: ConnectOptions): Promise<Middleman>;

/** Encode one protocol message: a string when it is valid UTF-8 (a text frame), else a
 *  Uint8Array (a binary frame). A string body always gives a string. */
export function encode(
  cmd: string,
  target: string,
  headers: Array<[string, string]>,
  body: string,
): string;
export function encode(
  cmd: string,
  target: string,
  headers: Array<[string, string]>,
  body?: Body,
): string | Uint8Array;

/** A connection event from its message, or null when it is none. */
export function parseEvent(m: Message): MiddlemanEvent | null;

/** The answer to REQ SYS:PRESENCE, read. */
export function parsePresence(m: Message): Presence;

/** Decode the protocol messages of one WebSocket message (text or binary frame). */
export function decode(data: string | Uint8Array | ArrayBuffer): Message[];
