"""The asyncio client: one authenticated WebSocket connection to a middleman server."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import (
    Any,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .protocol import Body, Headers, Message, ProtocolError, check_target, decode, encode

__all__ = [
    "Client",
    "connect",
    "ServerError",
    "RequestTimedOut",
    "AuthError",
    "ConnectionLost",
    "HeadersLike",
]

log = logging.getLogger("middleman_client")

#: Headers to send: pairs (order and spelling kept) or a mapping.
HeadersLike = Union[Sequence[Tuple[str, str]], Mapping[str, str], None]

#: How long a confirmed command (SUB, EPUB, ...) waits for the server to take it.
SYNC_TIMEOUT = 10.0


class ServerError(Exception):
    """The server refused a message or failed a request (PROTOCOL.md section 7).

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


class RequestTimedOut(ServerError, TimeoutError):
    """The server's ``request timed out``: both a ServerError and a TimeoutError."""


class AuthError(ConnectionError):
    """The server refused the key (close 1008 ``bad key`` or ``role not allowed here``)."""


class ConnectionLost(ConnectionError):
    """The connection ended (and is not being re-established)."""

    def __init__(self, reason: str, code: Optional[int] = None) -> None:
        super().__init__(reason if code is None else f"{reason} (close {code})")
        self.reason = reason
        self.code = code


def _error_from(m: Message) -> ServerError:
    reason = m.header("reason") or m.text
    cls = RequestTimedOut if reason == "request timed out" else ServerError
    return cls(reason, m.header("cmd") or "", m.header("target") or "", m)


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


async def connect(
    url: str,
    key: str,
    *,
    reconnect: bool = False,
    min_delay: float = 0.25,
    max_delay: float = 10.0,
    open_timeout: float = 10.0,
    **ws_options: Any,
) -> "Client":
    """Connect to ``url`` (``ws://`` or ``wss://``), authenticate with ``key`` and return
    the client once the server has assigned its connection id (``client.cid``).

    Raises AuthError if the key is refused, OSError / TimeoutError if the server cannot
    be reached. With ``reconnect=True`` a connection lost later is re-established with
    exponential backoff and jitter (``min_delay`` doubling up to ``max_delay`` seconds);
    the client then sends its enablements (EPUB/ESUB/EREQ) and subscriptions again.
    Other keyword arguments go to ``websockets.asyncio.client.connect``.
    """
    client = Client(
        url,
        key,
        reconnect=reconnect,
        min_delay=min_delay,
        max_delay=max_delay,
        open_timeout=open_timeout,
        ws_options=ws_options,
    )
    await client._start()
    return client


class Client:
    """One connection to a middleman server; create it with :func:`connect`.

    Calls are coroutines on the event loop the client was created on. Messages that are
    neither answers to this client's requests nor errors for its confirmed commands are
    delivered, in order, by ``async for msg in client`` (or ``await client.recv()``).
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        reconnect: bool = False,
        min_delay: float = 0.25,
        max_delay: float = 10.0,
        open_timeout: float = 10.0,
        ws_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.url = url
        #: The connection id the server assigned (a new one after each reconnect).
        self.cid: str = ""
        #: How many times the connection has been re-established.
        self.reconnects = 0
        self._key = key
        self._reconnect = reconnect
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._open_timeout = open_timeout
        self._ws_options: Dict[str, Any] = {
            "max_size": None,  # the server enforces its own message limit
            "compression": None,
            **(ws_options or {}),
        }
        self._ws: Optional[ClientConnection] = None
        self._connected = asyncio.Event()
        # Set while connected with every enablement and subscription in force.
        self._ready = asyncio.Event()
        self._restoring: Set[str] = set()
        self._inbox: "asyncio.Queue[Optional[Message]]" = asyncio.Queue()
        self._pending: Dict[str, "asyncio.Future[Message]"] = {}
        self._watches: List[_Watch] = []
        # Insertion-ordered sets: what to restore after a reconnect.
        self._subs: Dict[str, None] = {}
        self._enabled: Dict[Tuple[str, str], None] = {}
        self._tasks: Set["asyncio.Task[Any]"] = set()
        self._reader: Optional["asyncio.Task[None]"] = None
        self._closed = False
        self._end: Optional[ConnectionLost] = None
        self._seq = 0
        self._prefix = os.urandom(4).hex()

    # ------------------------------------------------------------------ life cycle

    async def _start(self) -> None:
        ws, cid = await self._open()
        self._up(ws, cid)

    async def _open(self) -> Tuple[ClientConnection, str]:
        ws = await ws_connect(self.url, open_timeout=self._open_timeout, **self._ws_options)
        try:
            await ws.send(self._key)
            ok = await asyncio.wait_for(ws.recv(), self._open_timeout)
            if ok != "MM OK":
                raise ProtocolError(f"expected 'MM OK' from the server, got {ok!r}")
            cid = await asyncio.wait_for(ws.recv(), self._open_timeout)
        except ConnectionClosed as e:
            await ws.close()
            code = e.rcvd.code if e.rcvd else None
            reason = e.rcvd.reason if e.rcvd else "connection closed"
            if code == 1008:
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
        if not self._restoring:
            self._ready.set()
        self._reader = asyncio.ensure_future(self._read(ws))

    async def close(self) -> None:
        """Close for good: pending requests fail with ConnectionLost, iteration ends."""
        if self._closed:
            return
        self._closed = True
        self._connected.set()  # wake anyone waiting for a reconnect
        self._ready.set()
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
        self._inbox.put_nowait(None)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether the connection is authenticated right now."""
        return self._connected.is_set() and not self._closed

    async def _read(self, ws: ClientConnection) -> None:
        code: Optional[int] = None
        reason = "connection lost"
        try:
            while True:
                data = await ws.recv(decode=False)
                try:
                    msgs = decode(data)
                except ProtocolError as e:
                    log.warning("middleman_client: undecodable message from the server: %s", e)
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
        self._lost(ConnectionLost(reason, code))

    def _lost(self, why: ConnectionLost) -> None:
        self._connected.clear()
        self._ready.clear()
        self._ws = None
        # The server forgot this connection's requests and subscriptions.
        self._fail_pending(why)
        if self._reconnect and why.code != 1008:
            log.info("middleman_client: %s; reconnecting", why)
            self._spawn(self._reconnect_loop())
            return
        self._closed = True
        self._end = why
        self._connected.set()
        self._ready.set()
        self._inbox.put_nowait(None)

    def _backoff(self, attempt: int) -> float:
        full: float = min(self._max_delay, self._min_delay * float(2 ** min(attempt, 30)))
        return full / 2 + random.random() * full / 2

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while not self._closed:
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            try:
                ws, cid = await self._open()
            except AuthError as e:
                self._closed = True
                self._end = ConnectionLost(f"reconnect refused: {e}", 1008)
                self._connected.set()
                self._ready.set()
                self._inbox.put_nowait(None)
                return
            except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionLost, ProtocolError) as e:
                log.info("middleman_client: reconnect attempt %d failed: %r", attempt, e)
                continue
            if self._closed:
                await ws.close()
                return
            self.reconnects += 1
            log.info("middleman_client: reconnected as %s", cid)
            # Enablements first (so a service's own clients may subscribe again), then
            # subscriptions, before anything queued behind the reconnect is sent.
            try:
                for cmd, target in self._enabled:
                    await ws.send(encode(cmd, target))
                for topic in self._subs:
                    await ws.send(encode("SUB", topic))
            except ConnectionClosed:
                continue
            # Watch the re-subscriptions before the reader starts, so a refusal is seen.
            watches = [_Watch("SUB", t) for t in self._subs]
            self._watches.extend(watches)
            self._restoring = set(self._subs) | {""}  # "": the first sync
            self._up(ws, cid)
            self._spawn(self._check_resubscribed(watches))
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
        self._inbox.put_nowait(m)

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

    async def subscribe(self, topic: str) -> None:
        """Subscribe to ``topic``; returns once the server has taken it. Raises
        ServerError (``not permitted``) if refused."""
        check_target(topic)
        await self._confirmed("SUB", topic)
        self._subs[topic] = None

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe from ``topic`` (a no-op if not subscribed)."""
        check_target(topic)
        self._subs.pop(topic, None)
        self._restored(topic)
        await self._confirmed("UNS", topic)

    async def publish(self, topic: str, body: Body = b"", headers: HeadersLike = None) -> None:
        """Publish ``body`` to ``topic``. Not confirmed: a refusal arrives later as an
        error message (``msg.is_error``) through iteration."""
        await self._send(encode("PUB", topic, _pairs(headers), body))

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

    async def send(
        self, cmd: str, target: str, body: Body = b"", headers: HeadersLike = None
    ) -> None:
        """Send any message as it is (not confirmed)."""
        await self._send(encode(cmd, target, _pairs(headers), body))

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self.connected else "reconnecting")
        return f"<middleman_client.Client {self.url} cid={self.cid!r} {state}>"
