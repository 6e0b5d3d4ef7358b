"""A small blocking wrapper for scripts: the asyncio client on a background thread.

    from middleman_client.sync import connect

    with connect(["ws://127.0.0.1:8765/", "ws://127.0.0.1:8766/"], key) as c:
        news = c.subscribe("news")
        c.publish("news", "hello")
        print(news.recv(timeout=5).text)        # or: for msg in news: ...
        print(c.request("time", timeout=5).text)

Callbacks (``on_disconnect``, ``on_reconnect``, ``on_error``) run on the client's own
thread: keep them short.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Iterator, Optional, Sequence, TypeVar, Union

from . import client as _client
from .client import Client, ConnectionLost, EventSubscription, HeadersLike, Subscription
from .protocol import Body, Message
from .system import Event, Presence

__all__ = ["SyncClient", "SyncSubscription", "SyncEvents", "connect"]

T = TypeVar("T")


class SyncSubscription:
    """A :class:`middleman_client.Subscription`, blocking: ``for msg in sub``,
    ``sub.recv(timeout=...)``, ``sub.unsubscribe()``."""

    def __init__(self, owner: "SyncClient", sub: Subscription) -> None:
        self._owner = owner
        self._sub = sub
        self.topic = sub.topic

    @property
    def active(self) -> bool:
        return self._sub.active

    def recv(self, timeout: Optional[float] = None) -> Message:
        """The topic's next message; TimeoutError after ``timeout`` seconds,
        ConnectionLost once the subscription has ended."""

        async def get() -> Message:
            return await asyncio.wait_for(self._sub.recv(), timeout)

        try:
            return self._owner._run(get())
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message on {self.topic} within {timeout}s") from None

    def __iter__(self) -> Iterator[Message]:
        """The topic's messages until unsubscribed or closed (ConnectionLost if the
        connection ends for good)."""
        while True:
            try:
                yield self.recv()
            except ConnectionLost:
                if self._sub._end is None:
                    return
                raise

    def unsubscribe(self) -> None:
        self._owner._run(self._sub.unsubscribe())

    def __repr__(self) -> str:
        return repr(self._sub).replace("Subscription", "SyncSubscription", 1)


class SyncEvents:
    """A :class:`middleman_client.EventSubscription`, blocking: ``for ev in events``,
    ``events.recv(timeout=...)``, ``events.unsubscribe()``."""

    def __init__(self, owner: "SyncClient", events: EventSubscription) -> None:
        self._owner = owner
        self._events = events
        self.topics = events.topics

    @property
    def active(self) -> bool:
        return self._events.active

    def recv(self, timeout: Optional[float] = None) -> Event:
        """The next event; TimeoutError after ``timeout`` seconds, ConnectionLost once
        the subscription has ended."""

        async def get() -> Event:
            return await asyncio.wait_for(self._events.recv(), timeout)

        try:
            return self._owner._run(get())
        except asyncio.TimeoutError:
            raise TimeoutError(f"no event within {timeout}s") from None

    def __iter__(self) -> Iterator[Event]:
        while True:
            try:
                yield self.recv()
            except ConnectionLost:
                if all(s._end is None for s in self._events._subs):
                    return
                raise

    def unsubscribe(self) -> None:
        self._owner._run(self._events.unsubscribe())

    def __repr__(self) -> str:
        return repr(self._events).replace("EventSubscription", "SyncEvents", 1)


class SyncClient:
    """The same calls as :class:`middleman_client.Client`, blocking."""

    def __init__(self, urls: Union[str, Sequence[str]], key: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="middleman-client", daemon=True
        )
        self._thread.start()
        try:
            self._client: Client = self._run(_client.connect(urls, key, **options))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ConnectionLost("closed by the client")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @property
    def cid(self) -> str:
        return self._client.cid

    @property
    def url(self) -> str:
        """The URL of the server connected to (or last connected to)."""
        return self._client.url

    @property
    def connected(self) -> bool:
        return self._client.connected

    @property
    def reconnects(self) -> int:
        return self._client.reconnects

    @property
    def pending_bytes(self) -> int:
        return self._client.pending_bytes

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until connected with enablements and subscriptions in force (see
        :meth:`middleman_client.Client.wait_ready`); TimeoutError after ``timeout``."""

        async def wait() -> None:
            await asyncio.wait_for(self._client.wait_ready(), timeout)

        try:
            self._run(wait())
        except asyncio.TimeoutError:
            raise TimeoutError(f"not ready within {timeout}s") from None

    @property
    def client(self) -> Client:
        """The asyncio client underneath (its loop runs on another thread)."""
        return self._client

    def subscribe(self, topic: str) -> SyncSubscription:
        return SyncSubscription(self, self._run(self._client.subscribe(topic)))

    def unsubscribe(self, topic: str) -> None:
        self._run(self._client.unsubscribe(topic))

    def publish(
        self,
        topic: str,
        body: Body = b"",
        headers: HeadersLike = None,
        *,
        timeout: Optional[float] = None,
    ) -> None:
        self._run(self._client.publish(topic, body, headers, timeout=timeout))

    def request(
        self,
        target: str,
        body: Body = b"",
        headers: HeadersLike = None,
        timeout: Optional[float] = 30.0,
    ) -> Message:
        return self._run(self._client.request(target, body, headers, timeout))

    def reply(self, req: Message, body: Body = b"", headers: HeadersLike = None) -> None:
        self._run(self._client.reply(req, body, headers))

    def enable_pub(self, topic: str) -> None:
        self._run(self._client.enable_pub(topic))

    def enable_sub(self, topic: str) -> None:
        self._run(self._client.enable_sub(topic))

    def enable_req(self, target: str) -> None:
        self._run(self._client.enable_req(target))

    def set_uid(self, cid: str, uid: str) -> None:
        self._run(self._client.set_uid(cid, uid))

    def disable_pub(self, topic: str) -> None:
        self._run(self._client.disable_pub(topic))

    def disable_sub(self, topic: str) -> None:
        self._run(self._client.disable_sub(topic))

    def disable_req(self, target: str) -> None:
        self._run(self._client.disable_req(target))

    def grant_pub(self, cid: str, topic: str) -> None:
        self._run(self._client.grant_pub(cid, topic))

    def grant_sub(self, cid: str, topic: str) -> None:
        self._run(self._client.grant_sub(cid, topic))

    def grant_req(self, cid: str, target: str) -> None:
        self._run(self._client.grant_req(cid, target))

    def revoke_pub(self, cid: str, topic: str) -> None:
        self._run(self._client.revoke_pub(cid, topic))

    def revoke_sub(self, cid: str, topic: str) -> None:
        self._run(self._client.revoke_sub(cid, topic))

    def revoke_req(self, cid: str, target: str) -> None:
        self._run(self._client.revoke_req(cid, target))

    def subscribe_for(self, cid: str, topic: str) -> None:
        self._run(self._client.subscribe_for(cid, topic))

    def unsubscribe_for(self, cid: str, topic: str) -> None:
        self._run(self._client.unsubscribe_for(cid, topic))

    def kick(self, cid: str, reason: Optional[str] = None) -> None:
        self._run(self._client.kick(cid, reason))

    def presence(
        self, topic: str, limit: int = 1000, *, timeout: Optional[float] = 30.0
    ) -> Presence:
        return self._run(self._client.presence(topic, limit, timeout=timeout))

    def events(self, *kinds: str) -> SyncEvents:
        return SyncEvents(self, self._run(self._client.events(*kinds)))

    def recv(self, timeout: Optional[float] = None) -> Message:
        """The next message; TimeoutError after ``timeout`` seconds, ConnectionLost once
        the connection has ended."""

        async def get() -> Message:
            return await asyncio.wait_for(self._client.recv(), timeout)

        try:
            return self._run(get())
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message within {timeout}s") from None

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.recv()
            except ConnectionLost:
                if self._client._end is None:
                    return
                raise

    def close(self, timeout: Optional[float] = 5.0) -> None:
        """Close for good, first sending what ``publish`` buffered (at most ``timeout``
        seconds of waiting for the connection)."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close(timeout))
        finally:
            self._stop_loop()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(urls: Union[str, Sequence[str]], key: str, **options: Any) -> SyncClient:
    """Connect and authenticate; the options are those of :func:`middleman_client.connect`."""
    return SyncClient(urls, key, **options)
