"""Services: answer requests and handle published messages with decorated handlers."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Awaitable, Callable, Dict, Optional, Set, Tuple, TypeVar, Union

from .client import Client, HeadersLike
from .protocol import Body, Message
from .system import Event, event_topics, parse_event

__all__ = ["Service", "Reply"]

log = logging.getLogger("middleman_client")

#: What a responder returns: the body, or ``(headers, body)``.
Reply = Union[Body, Tuple[HeadersLike, Body], None]
Responder = Callable[[Message], Union[Reply, Awaitable[Reply]]]
Handler = Callable[[Message], Union[None, Awaitable[None]]]
EventHandler = Callable[[Event], Union[None, Awaitable[None]]]
F = TypeVar("F", bound=Callable[..., Any])


class Service:
    """Runs handlers for a client's messages::

        service = middleman_client.Service(client)

        @service.responder("time")
        async def time(req):
            return "12:00"                    # or ([("Zone", "UTC")], "12:00")

        @service.subscriber("chat")
        async def chat(msg):
            print(msg.header("Name"), msg.text)

        @service.on_event("disconnect")       # protocol 1.1; no kinds: all four
        async def gone(ev):
            print(ev.cid, ev.uid, ev.reason)

        await service.run()

    ``run()`` registers every responder (EREQ), subscribes every subscriber's topic and
    the event topics of every event handler,
    then handles messages until the connection ends. Each request is answered in its own
    task, so a slow handler does not hold up others; published messages are handed to
    their subscriber one at a time, in order. A responder that raises gets an answer with
    an empty body and an ``Error`` header holding the exception's text (and is logged).
    Other messages go to ``on_message`` when set.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.responders: Dict[str, Responder] = {}
        self.subscribers: Dict[str, Handler] = {}
        #: Event handlers by event topic (``SYS:CONNECT`` ...).
        self.event_handlers: Dict[str, EventHandler] = {}
        #: Called with every message no responder or subscriber takes.
        self.on_message: Optional[Handler] = None
        self._tasks: Set["asyncio.Task[None]"] = set()

    def responder(self, name: str) -> Callable[[F], F]:
        """Decorator: answer ``REQ name`` with the handler's return value."""

        def register(fn: F) -> F:
            self.responders[name] = fn
            return fn

        return register

    def subscriber(self, topic: str) -> Callable[[F], F]:
        """Decorator: call the handler with every message published to ``topic``."""

        def register(fn: F) -> F:
            self.subscribers[topic] = fn
            return fn

        return register

    def on_event(self, *kinds: str) -> Callable[[F], F]:
        """Decorator: call the handler with every :class:`Event` of ``kinds``
        (``connect``, ``disconnect``, ``sub``, ``uns``; all four when none is given)."""
        topics = event_topics(kinds)

        def register(fn: F) -> F:
            for t in topics:
                self.event_handlers[t] = fn
            return fn

        return register

    async def run(self) -> None:
        """Register, then serve until the client is closed (returns) or the connection is
        lost for good (raises ConnectionLost)."""
        for name in self.responders:
            await self.client.enable_req(name)
        for topic in self.subscribers:
            await self.client.subscribe(topic)
        for topic in self.event_handlers:
            if topic not in self.subscribers:
                await self.client.subscribe(topic)
        try:
            async for msg in self.client:
                ev = parse_event(msg) if msg.target in self.event_handlers else None
                if ev is not None:
                    await self._call_event(self.event_handlers[msg.target], ev)
                elif msg.cmd == "REQ" and msg.target in self.responders:
                    t = asyncio.ensure_future(self._answer(self.responders[msg.target], msg))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                elif msg.cmd == "PUB" and msg.target in self.subscribers:
                    await self._call(self.subscribers[msg.target], msg)
                elif self.on_message is not None:
                    await self._call(self.on_message, msg)
                elif msg.is_error:
                    log.warning("middleman_client: server error: %s", msg.header("reason"))
        finally:
            for t in list(self._tasks):
                t.cancel()

    async def _call(self, fn: Handler, msg: Message) -> None:
        try:
            r = fn(msg)
            if inspect.isawaitable(r):
                await r
        except Exception:
            log.exception("middleman_client: handler for %s %s failed", msg.cmd, msg.target)

    async def _call_event(self, fn: EventHandler, ev: Event) -> None:
        try:
            r = fn(ev)
            if inspect.isawaitable(r):
                await r
        except Exception:
            log.exception("middleman_client: handler for %s events failed", ev.kind)

    async def _answer(self, fn: Responder, req: Message) -> None:
        headers: HeadersLike = None
        try:
            r = fn(req)
            if inspect.isawaitable(r):
                r = await r
            if isinstance(r, tuple):
                headers, body = r
            else:
                body = b"" if r is None else r
        except Exception as e:
            log.exception("middleman_client: responder %s failed", req.target)
            headers, body = [("Error", str(e) or type(e).__name__)], b""
        try:
            await self.client.reply(req, body, headers)
        except ConnectionError as e:
            log.info("middleman_client: could not answer %s: %s", req.target, e)
