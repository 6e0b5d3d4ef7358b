// Types for middleman.js, the browser (and Node) client of middleman (protocol version 1).

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

export interface ConnectOptions {
  /** Reconnect after a lost connection (not after close() or a refused key). Default true. */
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
  /** When a connection ends. */
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

/** Decode the protocol messages of one WebSocket message (text or binary frame). */
export function decode(data: string | Uint8Array | ArrayBuffer): Message[];
