"""The asyncio client: one authenticated WebSocket connection to a middleman server."""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import random
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
    Union,
)

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .protocol import Body, Headers, Message, ProtocolError, check_target, decode, encode
from .system import Event, Presence, event_topics, parse_event, parse_presence

__all__ = [
    "Client",
    "Subscription",
    "connect",
    "ServerError",
    "NotPermitted",
    "BadRequest",
    "TooManyGrants",
    "NoResponders",
    "RequestTimedOut",
    "ResponderDisconnected",
    "TooManyRequests",
    "AuthError",
    "BadKey",
    "ConnectionLost",
    "Kicked",
    "BufferFull",
    "EventSubscription",
    "KICK_CODE",
    "HeadersLike",
]

log = logging.getLogger("middleman_client")

#: Headers to send: pairs (order and spelling kept) or a mapping.
HeadersLike = Union[Sequence[Tuple[str, str]], Mapping[str, str], None]

#: How long a confirmed command (SUB, EPUB, ...) waits for the server to take it.
SYNC_TIMEOUT = 10.0

#: Default bound for what ``publish`` buffers while the connection is being re-established.
PENDING_BYTES_LIMIT = 2 * 1024 * 1024

#: Default number of failed connection attempts in a row before the client gives up.
MAX_RECONNECT_ATTEMPTS = 60

#: The close code of a connection a service kicked (``INT KICK``, protocol 1.1).
KICK_CODE = 4000


class ServerError(Exception):
    """The server refused a message or failed a request (docs/protocol.md section 7).

    ``reason`` is the server's reason (``no responder``, ``not permitted``,
    ``responder disconnected``, ...); ``cmd`` and ``target`` name the refused message;
    ``message`` is the server's ``PUB ERROR`` itself.
    """

    def __init__(
        self, reason: str, cmd: str = "", target: str = "", message: Optional[Message] = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cmd = cmd
        self.target = target
        self.message = message

    def __str__(self) -> str:
        where = f" ({self.cmd} {self.target})" if self.cmd else ""
        return f"{self.reason}{where}"


class NotPermitted(ServerError):
    """``not permitted``: this connection's role may not do that (e.g. subscribe to a
    topic no service enabled, or request a target nobody enabled)."""


class BadRequest(ServerError):
    """The server could not take the command as given: ``bad cid`` (a ``forcid`` that is
    not a connection id), ``bad topic``, ``bad limit``, ``missing header``, ``missing
    ReqID``."""


class TooManyGrants(ServerError):
    """``too many grants``: the connection granted to already holds as many grants as
    the server allows; this grant was not made."""


class NoResponders(ServerError):
    """``no responder``: nobody answers the request target."""


class RequestTimedOut(ServerError, TimeoutError):
    """The server's ``request timed out``: both a ServerError and a TimeoutError."""


class ResponderDisconnected(ServerError):
    """``responder disconnected``: the responder left before answering."""


class TooManyRequests(ServerError):
    """``too many requests in flight``: this connection has too many unanswered requests."""


class AuthError(ConnectionError):
    """The server refused the key (close 1008 ``bad key`` or ``role not allowed here``)."""


class BadKey(ServerError, AuthError):
    """The server refused the key: close 1008 ``bad key``. Also an AuthError."""

    code = 1008


class ConnectionLost(ConnectionError):
    """The connection ended (and is not being re-established)."""

    def __init__(self, reason: str, code: Optional[int] = None) -> None:
        super().__init__(reason if code is None else f"{reason} (close {code})")
        self.reason = reason
        self.code = code


class Kicked(ConnectionLost):
    """A service kicked this connection (``INT KICK``): close code 4000, ``reason`` the
    service's reason (``kicked`` by default). The client does not reconnect after it."""


class BufferFull(ConnectionError):
    """``publish`` while disconnected: the buffer of messages waiting for the connection
    to come back is full (``pending_bytes_limit``), and no room was made in time."""

    def __init__(self, pending: int, size: int, limit: int) -> None:
        super().__init__(
            f"publish buffer full while reconnecting: {pending} bytes waiting, "
            f"{size} more would pass the limit of {limit}"
        )
        self.pending = pending
        self.size = size
        self.limit = limit


_ERRORS: Dict[str, Type[ServerError]] = {
    "not permitted": NotPermitted,
    "not permitted over HTTP": NotPermitted,
    "bad cid": BadRequest,
    "bad topic": BadRequest,
    "bad limit": BadRequest,
    "missing header": BadRequest,
    "missing ReqID": BadRequest,
    "too many grants": TooManyGrants,
    "no responder": NoResponders,
    "request timed out": RequestTimedOut,
    "responder disconnected": ResponderDisconnected,
    "too many requests in flight": TooManyRequests,
    "bad key": BadKey,
}


def _error_from(m: Message) -> ServerError:
    reason = m.header("reason") or m.text
    cls = _ERRORS.get(reason, ServerError)
    return cls(reason, m.header("cmd") or "", m.header("target") or "", m)


#: What a callback returns: nothing, or an awaitable the client runs as a task.
OnDisconnect = Callable[["ConnectionLost"], object]
OnReconnect = Callable[[], object]
OnError = Callable[[Exception], object]


def _pairs(headers: HeadersLike) -> Headers:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


class _Watch:
    """A confirmed command waiting to learn whether the server refused it."""

    __slots__ = ("cmd", "target", "error")

    def __init__(self, cmd: str, target: str) -> None:
        self.cmd = cmd
        self.target = target
        self.error: Optional[ServerError] = None


class Subscription:
    """One topic's messages, returned by :meth:`Client.subscribe`::

        sub = await client.subscribe("news")
        async for msg in sub:          # PUB messages of "news" only, in order
            ...
        await sub.unsubscribe()        # ends the iteration

    Once you start reading it (``async for`` or :meth:`recv`), the subscription claims its
    topic: from then on the topic's messages go to it and no longer to the client-wide
    iterator, and those of them still unread there move to it. A subscription you never
    read leaves its topic's messages to ``async for msg in client``, as before.
    """

    def __init__(self, client: "Client", topic: str) -> None:
        self.client = client
        self.topic = topic
        self._queue: "asyncio.Queue[Optional[Message]]" = asyncio.Queue()
        self._claimed = False
        self._ended = False
        self._end: Optional[ConnectionLost] = None

    def _claim(self) -> None:
        if not self._claimed and not self._ended:
            self._claimed = True
            self.client._claim(self)

    def _finish(self, end: Optional[ConnectionLost]) -> None:
        if not self._ended:
            self._ended = True
            self._end = end
            self._queue.put_nowait(None)

    @property
    def active(self) -> bool:
        """Whether the subscription is in force (not unsubscribed, client not closed)."""
        return not self._ended

    def __aiter__(self) -> "Subscription":
        self._claim()
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except ConnectionLost:
            if self._end is None:
                raise StopAsyncIteration from None  # unsubscribed or closed by the client
            raise

    async def recv(self) -> Message:
        """The topic's next message. Raises ConnectionLost once the subscription has
        ended (unsubscribed, client closed, or the connection lost for good)."""
        self._claim()
        m = await self._queue.get()
        if m is None:
            self._queue.put_nowait(None)  # every later call ends too
            raise self._end or ConnectionLost("unsubscribed")
        return m

    async def unsubscribe(self) -> None:
        """Unsubscribe from the topic: sends UNS and ends the iteration of every
        Subscription of this topic once the messages already received are read."""
        await self.client.unsubscribe(self.topic)

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<middleman_client.Subscription {self.topic!r} {state}>"


class EventSubscription:
    """Connection events (protocol 1.1, services only), returned by
    :meth:`Client.events`::

        events = await client.events("connect", "disconnect")
        async for ev in events:        # Event(kind, cid, uid, role, topic, reason)
            print(ev.kind, ev.cid, ev.uid, ev.role, ev.reason)
        await events.unsubscribe()     # UNS of its topics; ends the iteration

    Events of all its topics arrive in one stream, in the order the server sent them.
    Like a :class:`Subscription` it claims its topics once read; unsubscribing any of
    them (here or with :meth:`Client.unsubscribe`) ends it. After a reconnect the topics
    are subscribed again (events that happened meanwhile are not replayed).
    """

    def __init__(self, client: "Client", subs: List[Subscription]) -> None:
        self.client = client
        self.topics: Tuple[str, ...] = tuple(s.topic for s in subs)
        self._subs = subs
        # One queue for every topic, so events keep the order they arrived in.
        self._queue: "asyncio.Queue[Optional[Message]]" = asyncio.Queue()
        for sub in subs:
            sub._queue = self._queue

    @property
    def active(self) -> bool:
        """Whether every topic is still subscribed."""
        return all(s.active for s in self._subs)

    def __aiter__(self) -> "EventSubscription":
        for sub in self._subs:
            sub._claim()
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.recv()
        except ConnectionLost:
            if all(s._end is None for s in self._subs):
                raise StopAsyncIteration from None
            raise

    async def recv(self) -> Event:
        """The next event. Raises ConnectionLost once the subscription has ended."""
        for sub in self._subs:
            sub._claim()
        while True:
            m = await self._queue.get()
            if m is None:
                self._queue.put_nowait(None)  # every later call ends too
                end = next((s._end for s in self._subs if s._end is not None), None)
                raise end or ConnectionLost("unsubscribed")
            ev = parse_event(m)
            if ev is not None:
                return ev

    async def unsubscribe(self) -> None:
        """Unsubscribe from every topic of this subscription."""
        for topic in self.topics:
            await self.client.unsubscribe(topic)

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<middleman_client.EventSubscription {' '.join(self.topics)} {state}>"


async def connect(
    urls: Union[str, Sequence[str]],
    key: str,
    *,
    reconnect: bool = True,
    max_reconnect_attempts: Optional[int] = MAX_RECONNECT_ATTEMPTS,
    min_delay: float = 0.25,
    max_delay: float = 10.0,
    open_timeout: float = 10.0,
    pending_bytes_limit: int = PENDING_BYTES_LIMIT,
    on_disconnect: Optional[OnDisconnect] = None,
    on_reconnect: Optional[OnReconnect] = None,
    on_error: Optional[OnError] = None,
    **ws_options: Any,
) -> "Client":
    """Connect to a server, authenticate with ``key`` and return the client once the
    server has assigned its connection id (``client.cid``).

    ``urls`` is one URL (``ws://`` or ``wss://``) or a list of them: servers to fail
    over between. The first connection tries them in order; with ``reconnect=True`` (the
    default) it goes round the list again with backoff until one answers, at most
    ``max_reconnect_attempts`` attempts and ``open_timeout`` seconds in all. Without
    ``reconnect`` each URL is tried once.

    Raises BadKey (an AuthError) if the key is refused, or the last attempt's error
    (OSError / TimeoutError) if no server can be reached.

    With ``reconnect=True`` a connection lost later is re-established, trying the next
    URL of the list first, with exponential backoff and jitter between rounds
    (``min_delay`` doubling up to ``max_delay`` seconds); after
    ``max_reconnect_attempts`` failed attempts in a row (``None``: never) the client
    gives up. Once reconnected it sends its enablements (EPUB/ESUB/EREQ) and
    subscriptions again, then what ``publish`` buffered meanwhile (at most
    ``pending_bytes_limit`` bytes).

    ``on_disconnect(exc)``, ``on_reconnect()`` and ``on_error(exc)`` are called (plain
    functions or coroutine functions) when the connection is lost, when it is
    re-established, and with errors that have no call to be raised from (a refused
    re-subscription, an undecodable message, giving up reconnecting, buffered messages
    dropped). Other keyword arguments go to ``websockets.asyncio.client.connect``.
    """
    client = Client(
        urls,
        key,
        reconnect=reconnect,
        max_reconnect_attempts=max_reconnect_attempts,
        min_delay=min_delay,
        max_delay=max_delay,
        open_timeout=open_timeout,
        pending_bytes_limit=pending_bytes_limit,
        on_disconnect=on_disconnect,
        on_reconnect=on_reconnect,
        on_error=on_error,
        ws_options=ws_options,
    )
    await client._start()
    return client


class Client:
    """One connection to a middleman server; create it with :func:`connect`.

    Calls are coroutines on the event loop the client was created on. Messages that are
    neither answers to this client's requests, errors for its confirmed commands, nor
    claimed by a :class:`Subscription` being read are delivered, in order, by
    ``async for msg in client`` (or ``await client.recv()``).
    """

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        key: str,
        *,
        reconnect: bool = True,
        max_reconnect_attempts: Optional[int] = MAX_RECONNECT_ATTEMPTS,
        min_delay: float = 0.25,
        max_delay: float = 10.0,
        open_timeout: float = 10.0,
        pending_bytes_limit: int = PENDING_BYTES_LIMIT,
        on_disconnect: Optional[OnDisconnect] = None,
        on_reconnect: Optional[OnReconnect] = None,
        on_error: Optional[OnError] = None,
        ws_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.urls: List[str] = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("connect() needs at least one server URL")
        #: The URL of the server connected to (or last connected to).
        self.url = self.urls[0]
        self._url_index = 0
        #: The connection id the server assigned (a new one after each reconnect).
        self.cid: str = ""
        #: How many times the connection has been re-established.
        self.reconnects = 0
        self._key = key
        self._reconnect = reconnect
        self._max_attempts = max_reconnect_attempts
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._open_timeout = open_timeout
        self._pending_limit = pending_bytes_limit
        self.on_disconnect = on_disconnect
        self.on_reconnect = on_reconnect
        self.on_error = on_error
        self._ws_options: Dict[str, Any] = {
            "max_size": None,  # the server enforces its own message limit
            "compression": None,
            **(ws_options or {}),
        }
        self._ws: Optional[ClientConnection] = None
        self._connected = asyncio.Event()
        # Set while connected with every enablement and subscription in force.
        self._ready = asyncio.Event()
        # Set whenever the publish buffer shrinks or the connection state changes.
        self._room = asyncio.Event()
        self._restoring: Set[str] = set()
        self._inbox: "asyncio.Queue[Optional[Message]]" = asyncio.Queue()
        self._pending: Dict[str, "asyncio.Future[Message]"] = {}
        self._watches: List[_Watch] = []
        # Insertion-ordered sets: what to restore after a reconnect.
        self._subs: Dict[str, None] = {}
        self._enabled: Dict[Tuple[str, str], None] = {}
        # Subscription objects per topic, and those that claim their topic's messages.
        self._sub_objs: Dict[str, List[Subscription]] = {}
        self._claimers: Dict[str, List[Subscription]] = {}
        # Messages published while disconnected, in order, and their size.
        self._outbox: Deque[bytes] = collections.deque()
        self._outbox_bytes = 0
        self._tasks: Set["asyncio.Task[Any]"] = set()
        self._reader: Optional["asyncio.Task[None]"] = None
        self._closed = False
        self._end: Optional[ConnectionLost] = None
        self._seq = 0
        self._prefix = os.urandom(4).hex()

    # ------------------------------------------------------------------ life cycle

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._open_timeout
        n = len(self.urls)
        attempt = 0
        while True:
            i = attempt % n
            left = max(deadline - loop.time(), 0.001)
            try:
                ws, cid = await self._open(self.urls[i], left)
            except AuthError:
                raise
            except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionLost, ProtocolError) as e:
                log.info("middleman_client: connecting to %s failed: %r", self.urls[i], e)
                attempt += 1
                if not self._reconnect and attempt >= n:
                    raise
                if self._max_attempts is not None and attempt >= max(n, self._max_attempts):
                    raise
                delay = self._backoff(attempt // n - 1) if attempt % n == 0 else 0.0
                if loop.time() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
                continue
            self._url_index = i
            self.url = self.urls[i]
            self._up(ws, cid)
            return

    async def _open(self, url: str, timeout: float) -> Tuple[ClientConnection, str]:
        ws = await ws_connect(url, open_timeout=timeout, **self._ws_options)
        try:
            await ws.send(self._key)
            ok = await asyncio.wait_for(ws.recv(), timeout)
            if ok != "MM OK":
                raise ProtocolError(f"expected 'MM OK' from the server, got {ok!r}")
            cid = await asyncio.wait_for(ws.recv(), timeout)
        except ConnectionClosed as e:
            await ws.close()
            code = e.rcvd.code if e.rcvd else None
            reason = e.rcvd.reason if e.rcvd else "connection closed"
            if code == 1008:
                if reason == "bad key":
                    raise BadKey(reason) from None
                raise AuthError(reason or "key refused") from None
            raise ConnectionLost(reason or "connection closed", code) from None
        except BaseException:
            await ws.close()
            raise
        return ws, str(cid).strip()

    def _up(self, ws: ClientConnection, cid: str) -> None:
        self._ws = ws
        self.cid = cid
        self._connected.set()
        self._room.set()
        if not self._restoring:
            self._ready.set()
        self._reader = asyncio.ensure_future(self._read(ws))

    async def close(self, timeout: Optional[float] = 5.0) -> None:
        """Close for good: first waits (at most ``timeout`` seconds) for the connection to
        come back if ``publish`` buffered messages while it was lost, so they are sent;
        then pending requests fail with ConnectionLost and iteration ends."""
        if self._closed:
            return
        if self._outbox:
            try:
                await asyncio.wait_for(self._connected.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            if self._outbox and not self._closed:
                self._report(
                    ConnectionLost(
                        f"closed with {len(self._outbox)} buffered messages "
                        f"({self._outbox_bytes} bytes) not sent"
                    )
                )
            if self._closed:
                return
        self._closed = True
        self._connected.set()  # wake anyone waiting for a reconnect
        self._ready.set()
        self._room.set()
        for t in list(self._tasks):
            t.cancel()
        self._fail_pending(ConnectionLost("closed by the client"))
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._finish()

    def _finish(self) -> None:
        """The end for good: iteration of the client and of every subscription ends."""
        self._outbox.clear()
        self._outbox_bytes = 0
        self._inbox.put_nowait(None)
        for subs in self._sub_objs.values():
            for sub in subs:
                sub._finish(self._end)
        self._sub_objs.clear()
        self._claimers.clear()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether the connection is authenticated right now."""
        return self._connected.is_set() and not self._closed

    @property
    def pending_bytes(self) -> int:
        """Bytes that ``publish`` buffered while disconnected, not sent yet."""
        return self._outbox_bytes

    def _fire(self, cb: Optional[Callable[..., object]], *args: Any) -> None:
        if cb is None:
            return
        try:
            r = cb(*args)
        except Exception:
            log.exception("middleman_client: callback %r failed", cb)
            return
        if inspect.isawaitable(r):

            async def wait(aw: Any) -> None:
                try:
                    await aw
                except Exception:
                    log.exception("middleman_client: callback %r failed", cb)

            self._spawn(wait(r))

    def _report(self, e: Exception) -> None:
        """An error with no call to raise it from: on_error, else the log."""
        if self.on_error is None:
            log.warning("middleman_client: %s", e)
        else:
            self._fire(self.on_error, e)

    async def _read(self, ws: ClientConnection) -> None:
        code: Optional[int] = None
        reason = "connection lost"
        try:
            while True:
                data = await ws.recv(decode=False)
                try:
                    msgs = decode(data)
                except ProtocolError as e:
                    self._report(e)
                    continue
                for m in msgs:
                    self._dispatch(m)
        except ConnectionClosed as e:
            if e.rcvd is not None:
                code, reason = e.rcvd.code, e.rcvd.reason or "connection closed"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a transport error: treat as a lost connection
            log.warning("middleman_client: reader stopped: %r", e)
            reason = f"connection lost: {e!r}"
        if self._closed:
            return
        self._lost(Kicked(reason, code) if code == KICK_CODE else ConnectionLost(reason, code))

    def _lost(self, why: ConnectionLost) -> None:
        self._connected.clear()
        self._ready.clear()
        self._room.set()
        self._ws = None
        # The server forgot this connection's requests and subscriptions.
        self._fail_pending(why)
        self._fire(self.on_disconnect, why)
        # A refused key, and a kick (a service wants this connection gone), end it.
        if self._reconnect and why.code not in (1008, KICK_CODE):
            log.info("middleman_client: %s; reconnecting", why)
            self._spawn(self._reconnect_loop())
            return
        self._end_for_good(why)

    def _end_for_good(self, why: ConnectionLost) -> None:
        if self._outbox:
            self._report(
                ConnectionLost(
                    f"{len(self._outbox)} buffered messages ({self._outbox_bytes} bytes) "
                    f"dropped: {why}",
                    why.code,
                )
            )
        self._closed = True
        self._end = why
        self._connected.set()
        self._ready.set()
        self._room.set()
        self._finish()

    def _backoff(self, attempt: int) -> float:
        full: float = min(self._max_delay, self._min_delay * float(2 ** min(max(attempt, 0), 30)))
        return full / 2 + random.random() * full / 2

    async def _reconnect_loop(self) -> None:
        n = len(self.urls)
        attempt = 0
        last: Optional[BaseException] = None
        while not self._closed:
            if self._max_attempts is not None and attempt >= self._max_attempts:
                why = ConnectionLost(f"gave up reconnecting after {attempt} attempts: {last!r}")
                self._report(why)
                self._end_for_good(why)
                return
            # Between rounds of the list, back off; within a round, the next URL at once.
            if attempt % n == 0:
                await asyncio.sleep(self._backoff(attempt // n))
            # The server just lost comes last in each round.
            i = (self._url_index + 1 + attempt) % n
            attempt += 1
            try:
                ws, cid = await self._open(self.urls[i], self._open_timeout)
            except AuthError as e:
                why = ConnectionLost(f"reconnect refused: {e}", 1008)
                self._report(why)
                self._end_for_good(why)
                return
            except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionLost, ProtocolError) as e:
                last = e
                log.info("middleman_client: reconnect attempt %d (%s) failed: %r", attempt, self.urls[i], e)
                continue
            if self._closed:
                await ws.close()
                return
            # Enablements first (so a service's own clients may subscribe again), then
            # subscriptions, then what was published meanwhile, before anything queued
            # behind the reconnect is sent.
            try:
                for cmd, target in self._enabled:
                    await ws.send(encode(cmd, target))
                for topic in self._subs:
                    await ws.send(encode("SUB", topic))
                while self._outbox:
                    data = self._outbox[0]
                    await ws.send(data)
                    self._outbox.popleft()
                    self._outbox_bytes -= len(data)
                    self._room.set()
            except ConnectionClosed as e:
                last = e
                continue
            self._url_index = i
            self.url = self.urls[i]
            self.reconnects += 1
            log.info("middleman_client: reconnected to %s as %s", self.url, cid)
            # Watch the re-subscriptions before the reader starts, so a refusal is seen.
            watches = [_Watch("SUB", t) for t in self._subs]
            self._watches.extend(watches)
            self._restoring = set(self._subs) | {""}  # "": the first sync
            self._up(ws, cid)
            self._spawn(self._check_resubscribed(watches))
            self._fire(self.on_reconnect)
            return

    async def _check_resubscribed(self, watches: List[_Watch]) -> None:
        try:
            try:
                await self._sync()
            finally:
                for w in watches:
                    self._watches.remove(w)
        except ConnectionError:
            return  # the next reconnect starts over
        for w in watches:
            if w.error is not None and w.target in self._subs:
                self._spawn(self._retry_subscribe(w.target, w.error))
            else:
                self._restored(w.target)
        self._restored("")

    def _restored(self, topic: str) -> None:
        self._restoring.discard(topic)
        if not self._restoring and self._connected.is_set():
            self._ready.set()

    async def _retry_subscribe(self, topic: str, error: ServerError) -> None:
        # A re-subscription refused after a reconnect (its service is not back yet) is
        # tried again with backoff until it is taken or the topic is unsubscribed.
        attempt = 0
        self._report(error)
        while topic in self._subs and not self._closed:
            log.info("middleman_client: re-subscribing %s refused (%s); retrying", topic, error.reason)
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            try:
                await self._confirmed("SUB", topic)
                break
            except ServerError as e:
                error = e
            except ConnectionError:
                return
        self._restored(topic)

    async def wait_ready(self) -> None:
        """Return once the client is connected with its enablements and subscriptions in
        force: at once normally; after a lost connection (``reconnect=True``), once it is
        re-established and the server has taken them again. Raises ConnectionLost if the
        connection has ended for good."""
        await self._ready.wait()
        if self._closed:
            raise self._end or ConnectionLost("closed by the client")

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _fail_pending(self, why: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(why)
        self._pending.clear()

    # ------------------------------------------------------------------ receiving

    def _dispatch(self, m: Message) -> None:
        if m.is_error:
            reqid = m.header("ReqID")
            if reqid is not None:
                fut = self._pending.pop(reqid, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_exception(_error_from(m))
                    return
            else:
                cmd, target = m.header("cmd"), m.header("target")
                for w in self._watches:
                    if w.error is None and w.cmd == cmd and w.target == target:
                        w.error = _error_from(m)
                        return
        elif m.cmd == "RES":
            fut = self._pending.pop(m.header("ReqID") or "", None)
            if fut is not None and not fut.done():
                fut.set_result(m)
            return  # a late answer to a request that timed out is dropped
        elif m.cmd == "PUB":
            claimers = self._claimers.get(m.target)
            if claimers:
                for sub in claimers:
                    sub._queue.put_nowait(m)
                return
        self._inbox.put_nowait(m)

    def _claim(self, sub: Subscription) -> None:
        """``sub`` starts reading: its topic's messages go to it, those waiting unread in
        the client-wide queue included (in order)."""
        if sub.topic not in self._subs:
            sub._finish(self._end)  # unsubscribed (or never taken) already
            return
        self._claimers.setdefault(sub.topic, []).append(sub)
        kept: List[Optional[Message]] = []
        while not self._inbox.empty():
            m = self._inbox.get_nowait()
            if m is not None and m.cmd == "PUB" and not m.is_error and m.target == sub.topic:
                sub._queue.put_nowait(m)
            else:
                kept.append(m)
        for m2 in kept:
            self._inbox.put_nowait(m2)

    def __aiter__(self) -> "Client":
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except ConnectionLost:
            if self._end is None:
                raise StopAsyncIteration from None  # closed by the client
            raise

    async def recv(self) -> Message:
        """The next message (PUB, REQ, or an error not tied to a call), in order.

        Raises ConnectionLost once the connection has ended for good.
        """
        m = await self._inbox.get()
        if m is None:
            self._inbox.put_nowait(None)  # every later call ends too
            raise self._end or ConnectionLost("closed by the client")
        return m

    # ------------------------------------------------------------------ sending

    async def _socket(self) -> ClientConnection:
        while True:
            if self._closed:
                raise self._end or ConnectionLost("closed by the client")
            ws = self._ws
            if ws is not None and self._connected.is_set():
                return ws
            await self._connected.wait()

    async def _send(self, data: bytes) -> None:
        ws = await self._socket()
        try:
            await ws.send(data)
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
            raise ConnectionLost("connection lost while sending", code) from None

    async def _sync(self) -> None:
        """Return once the server has processed everything sent before (a ping's pong
        follows the answers to earlier messages), and those answers are dispatched."""
        ws = await self._socket()
        try:
            pong = await ws.ping(os.urandom(4).hex())
            await asyncio.wait_for(pong, SYNC_TIMEOUT)
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
            raise ConnectionLost("connection lost", code) from None
        # The reader was woken before this coroutine for every message that preceded the
        # pong; let it run.
        for _ in range(3):
            await asyncio.sleep(0)

    async def _confirmed(
        self, cmd: str, target: str, headers: Optional[Headers] = None
    ) -> None:
        data = encode(cmd, target, headers)
        watch = _Watch(cmd, target)
        self._watches.append(watch)
        try:
            await self._send(data)
            await self._sync()
        finally:
            self._watches.remove(watch)
        if watch.error is not None:
            raise watch.error

    async def subscribe(self, topic: str) -> Subscription:
        """Subscribe to ``topic``; returns once the server has taken it, with a
        :class:`Subscription` to read the topic's messages from (or ignore, and read them
        from the client-wide iterator). Raises NotPermitted if refused."""
        check_target(topic)
        await self._confirmed("SUB", topic)
        self._subs[topic] = None
        sub = Subscription(self, topic)
        self._sub_objs.setdefault(topic, []).append(sub)
        return sub

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe from ``topic`` (a no-op if not subscribed); every Subscription of
        the topic ends once the messages it already received are read."""
        check_target(topic)
        self._subs.pop(topic, None)
        self._restored(topic)
        try:
            await self._confirmed("UNS", topic)
        finally:
            # What the server sent before it took the UNS still goes to the subscriptions.
            self._claimers.pop(topic, None)
            for sub in self._sub_objs.pop(topic, []):
                sub._finish(None)

    async def publish(
        self,
        topic: str,
        body: Body = b"",
        headers: HeadersLike = None,
        *,
        timeout: Optional[float] = None,
    ) -> None:
        """Publish ``body`` to ``topic``. Not confirmed: a refusal arrives later as an
        error message (``msg.is_error``) through iteration.

        While the connection is being re-established the message is buffered, and sent
        once it is back (after the subscriptions). When the buffer would pass
        ``pending_bytes_limit`` bytes, raises BufferFull at once, or with ``timeout``
        waits up to that many seconds for room (or for the connection) first. Raises
        ConnectionLost once the connection has ended for good.
        """
        data = encode("PUB", topic, _pairs(headers), body)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise self._end or ConnectionLost("closed by the client")
            ws = self._ws
            if ws is not None and self._connected.is_set() and not self._outbox:
                try:
                    await ws.send(data)
                    return
                except ConnectionClosed:
                    pass  # lost while sending: buffer it for the reconnect
            if self._outbox_bytes + len(data) <= self._pending_limit:
                self._outbox.append(data)
                self._outbox_bytes += len(data)
                return
            left = 0.0 if deadline is None else deadline - loop.time()
            if left <= 0 or len(data) > self._pending_limit:
                raise BufferFull(self._outbox_bytes, len(data), self._pending_limit)
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def request(
        self,
        target: str,
        body: Body = b"",
        headers: HeadersLike = None,
        timeout: Optional[float] = 30.0,
    ) -> Message:
        """Send ``REQ target`` and return the answer (the RES message).

        Raises ServerError with the server's reason (``no responder``, ``not
        permitted``, ``responder disconnected``; RequestTimedOut for ``request timed
        out``), TimeoutError when no answer came within ``timeout`` seconds, or
        ConnectionLost when the connection ended first.
        """
        pairs = _pairs(headers)
        if any(n.lower() == "reqid" for n, _ in pairs):
            raise ValueError("the ReqID header is set by the client")
        self._seq += 1
        reqid = f"{self._prefix}-{self._seq}"
        data = encode("REQ", target, [("ReqID", reqid), *pairs], body)
        fut: "asyncio.Future[Message]" = asyncio.get_running_loop().create_future()

        async def go() -> Message:
            ws = await self._socket()
            self._pending[reqid] = fut
            try:
                await ws.send(data)
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
                raise ConnectionLost("connection lost while sending", code) from None
            return await fut

        try:
            return await asyncio.wait_for(go(), timeout)
        except ServerError:
            raise
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer to REQ {target} within {timeout}s") from None
        finally:
            self._pending.pop(reqid, None)

    async def reply(self, req: Message, body: Body = b"", headers: HeadersLike = None) -> None:
        """Answer a received REQ: ``RES <target>`` echoing its ``rid``."""
        rid = req.header("rid")
        if req.cmd != "REQ" or rid is None:
            raise ValueError("reply() needs a REQ received from the server (with a rid header)")
        pairs = [p for p in _pairs(headers) if p[0].lower() != "rid"]
        await self._send(encode("RES", req.target, [("rid", rid), *pairs], body))

    async def _enable(self, cmd: str, target: str) -> None:
        check_target(target)
        await self._confirmed(cmd, target)
        self._enabled[(cmd, target)] = None

    async def enable_pub(self, topic: str) -> None:
        """Let clients publish to ``topic`` (services only)."""
        await self._enable("EPUB", topic)

    async def enable_sub(self, topic: str) -> None:
        """Let clients subscribe to ``topic`` (services only)."""
        await self._enable("ESUB", topic)

    async def enable_req(self, target: str) -> None:
        """Register as a responder for ``target`` and let clients request it (services
        only). Requests then arrive through iteration; answer them with :meth:`reply`."""
        await self._enable("EREQ", target)

    async def set_uid(self, cid: str, uid: str) -> None:
        """Tag the later messages of connection ``cid`` with ``uid: <uid>`` (services)."""
        await self._confirmed("INT", "UID", [("forcid", cid), ("setuid", uid)])

    # ------------------------------------------------------------ protocol 1.1 (services)

    async def _disable(self, cmd: str, target: str) -> None:
        check_target(target)
        self._enabled.pop(("E" + cmd[1:], target), None)  # not restored after a reconnect
        await self._confirmed(cmd, target)

    async def disable_pub(self, topic: str) -> None:
        """Withdraw this service's ``enable_pub(topic)``: DPUB (protocol 1.1)."""
        await self._disable("DPUB", topic)

    async def disable_sub(self, topic: str) -> None:
        """Withdraw this service's ``enable_sub(topic)``: DSUB (protocol 1.1). Existing
        subscriptions stay."""
        await self._disable("DSUB", topic)

    async def disable_req(self, target: str) -> None:
        """Withdraw this service's ``enable_req(target)``: DREQ (protocol 1.1). It is no
        longer a responder for ``target``; requests in flight may still be answered."""
        await self._disable("DREQ", target)

    async def _for(self, cmd: str, cid: str, target: str) -> None:
        check_target(target)
        await self._confirmed(cmd, target, [("forcid", cid)])

    async def grant_pub(self, cid: str, topic: str) -> None:
        """Let connection ``cid`` (only) publish to ``topic``: EPUB with ``forcid``. The
        grant lasts until revoked, or until either connection leaves (it is not made
        again after this client reconnects). Raises BadRequest (``bad cid``),
        TooManyGrants, NotPermitted."""
        await self._for("EPUB", cid, topic)

    async def grant_sub(self, cid: str, topic: str) -> None:
        """Let connection ``cid`` (only) subscribe to ``topic``: ESUB with ``forcid``."""
        await self._for("ESUB", cid, topic)

    async def grant_req(self, cid: str, target: str) -> None:
        """Let connection ``cid`` (only) request ``target``: EREQ with ``forcid`` (this
        does not make this service a responder)."""
        await self._for("EREQ", cid, target)

    async def revoke_pub(self, cid: str, topic: str) -> None:
        """Withdraw ``grant_pub(cid, topic)``: DPUB with ``forcid``."""
        await self._for("DPUB", cid, topic)

    async def revoke_sub(self, cid: str, topic: str) -> None:
        """Withdraw ``grant_sub(cid, topic)``: DSUB with ``forcid``. If that was the
        connection's last right to ``topic``, it is unsubscribed from it."""
        await self._for("DSUB", cid, topic)

    async def revoke_req(self, cid: str, target: str) -> None:
        """Withdraw ``grant_req(cid, target)``: DREQ with ``forcid``."""
        await self._for("DREQ", cid, target)

    async def subscribe_for(self, cid: str, topic: str) -> None:
        """Subscribe connection ``cid`` to ``topic`` (``INT SUB``); it is not told. An
        unknown or departed cid is a silent no-op; ``bad cid`` / ``bad topic`` raise
        BadRequest, a ``SYS:``/``MSG:`` topic NotPermitted."""
        await self._confirmed("INT", "SUB", [("forcid", cid), ("topic", topic)])

    async def unsubscribe_for(self, cid: str, topic: str) -> None:
        """Unsubscribe connection ``cid`` from ``topic`` (``INT UNS``)."""
        await self._confirmed("INT", "UNS", [("forcid", cid), ("topic", topic)])

    async def kick(self, cid: str, reason: Optional[str] = None) -> None:
        """Close connection ``cid`` (``INT KICK``): close code 4000 with ``reason`` (the
        server cuts it to 120 bytes; ``kicked`` when None). A departed cid: no-op."""
        headers = [("forcid", cid)]
        if reason is not None:
            headers.append(("reason", reason))
        await self._confirmed("INT", "KICK", headers)

    async def presence(
        self, topic: str, limit: int = 1000, *, timeout: Optional[float] = 30.0
    ) -> Presence:
        """Who is subscribed to ``topic`` (``REQ SYS:PRESENCE``, services only): the
        counts and at most ``limit`` members (0: counts only; the server caps it at
        10000). Raises NotPermitted, BadRequest, TimeoutError like :meth:`request`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, not {limit!r}")
        res = await self.request(
            "SYS:PRESENCE", b"", [("topic", topic), ("limit", str(limit))], timeout
        )
        return parse_presence(topic, res)

    async def events(self, *kinds: str) -> EventSubscription:
        """Subscribe to connection events (services only): ``kinds`` among
        ``connect``, ``disconnect``, ``sub``, ``uns`` (or the topics ``SYS:CONNECT``...),
        all four when none is given. Returns once the server has taken the
        subscriptions; iterate the result for :class:`Event` values."""
        topics = event_topics(kinds)
        subs: List[Subscription] = []
        try:
            for t in topics:
                subs.append(await self.subscribe(t))
        except BaseException:
            for sub in subs:  # all or nothing
                try:
                    await self.unsubscribe(sub.topic)
                except Exception:
                    pass
            raise
        return EventSubscription(self, subs)

    async def send(
        self, cmd: str, target: str, body: Body = b"", headers: HeadersLike = None
    ) -> None:
        """Send any message as it is (not confirmed)."""
        await self._send(encode(cmd, target, _pairs(headers), body))

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self.connected else "reconnecting")
        return f"<middleman_client.Client {self.url} cid={self.cid!r} {state}>"
