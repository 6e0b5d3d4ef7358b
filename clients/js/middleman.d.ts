// Types for middleman.js, the browser client of middleman (protocol version 1).

/** Headers to send: an object, a Map, or [name, value] pairs (every one is sent). */
export type Headers = Record<string, string> | Map<string, string> | Array<[string, string]>;

export interface ConnectOptions {
  /** Reconnect after a lost connection (not after close() or a refused key). Default true. */
  reconnect?: boolean;
  /** First reconnect delay; doubles per attempt, with jitter (half to all of it). Default 250. */
  minDelayMs?: number;
  /** Longest reconnect delay. Default 10000. */
  maxDelayMs?: number;
  /** Messages kept while disconnected before publish/request throw. Default 1000. */
  maxQueue?: number;
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
  readonly body: string;
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
  /** Subscribe; returns a function that removes this subscription. */
  subscribe(topic: string, cb: (msg: Message) => void): () => void;
  publish(topic: string, body?: string, headers?: Headers): void;
  /** Resolves with the RES; rejects with a MiddlemanError carrying the server's reason. */
  request(target: string, body?: string, options?: RequestOptions): Promise<Message>;
  /** Any command (services: EPUB, ESUB, EREQ, INT, RES, ...). */
  send(cmd: string, target: string, body?: string, headers?: Headers): void;
  /** Close for good. */
  close(): void;
}

/** Connect and authenticate; resolves once the server assigned a cid. */
export function connect(url: string, key: string, options?: ConnectOptions): Promise<Middleman>;

/** Encode one protocol message. */
export function encode(
  cmd: string,
  target: string,
  headers: Array<[string, string]>,
  body?: string,
): string;

/** Decode the protocol messages of one WebSocket message. */
export function decode(text: string): Message[];
