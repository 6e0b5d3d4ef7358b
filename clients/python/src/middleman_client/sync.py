"""A small blocking wrapper for scripts: the asyncio client on a background thread.

    from middleman_client.sync import connect

    with connect("ws://127.0.0.1:8765/", key) as c:
        c.subscribe("news")
        c.publish("news", "hello")
        print(c.recv(timeout=5).text)
        print(c.request("time", timeout=5).text)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Iterator, Optional, TypeVar

from . import client as _client
from .client import Client, ConnectionLost, HeadersLike
from .protocol import Body, Message

__all__ = ["SyncClient", "connect"]

T = TypeVar("T")


class SyncClient:
    """The same calls as :class:`middleman_client.Client`, blocking."""

    def __init__(self, url: str, key: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="middleman-client", daemon=True
        )
        self._thread.start()
        try:
            self._client: Client = self._run(_client.connect(url, key, **options))
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
    def client(self) -> Client:
        """The asyncio client underneath (its loop runs on another thread)."""
        return self._client

    def subscribe(self, topic: str) -> None:
        self._run(self._client.subscribe(topic))

    def unsubscribe(self, topic: str) -> None:
        self._run(self._client.unsubscribe(topic))

    def publish(self, topic: str, body: Body = b"", headers: HeadersLike = None) -> None:
        self._run(self._client.publish(topic, body, headers))

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

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, key: str, **options: Any) -> SyncClient:
    """Connect and authenticate; the options are those of :func:`middleman_client.connect`."""
    return SyncClient(url, key, **options)
