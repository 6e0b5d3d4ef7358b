"""Failover between server URLs, callbacks, subscriptions, typed errors and the publish
buffer, against real server processes (see conftest.py)."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from typing import Any, List

import pytest

import middleman_client
from middleman_client import (
    AuthError,
    BadKey,
    BufferFull,
    ConnectionLost,
    NoResponders,
    NotPermitted,
    RequestTimedOut,
    ResponderDisconnected,
    ServerError,
    Subscription,
    TooManyRequests,
)
from middleman_client.sync import connect as connect_sync

from conftest import CLIENT_KEY, SERVICE_KEY, WAIT, Server, next_msg, run

FAST: Any = dict(min_delay=0.05, max_delay=0.5)


def dead_url(make_server: Any) -> str:
    """The URL of a server that was started and stopped: nothing listens there."""
    s = make_server()
    url: str = s.url
    assert s.stop() == 0
    return url


# ---------------------------------------------------------------- failover and callbacks


@run
async def test_failover_to_the_second_url_when_the_first_server_dies(make_server):
    s1, s2 = make_server(), make_server()
    disconnected = asyncio.Event()
    reconnected = asyncio.Event()
    lost: List[ConnectionLost] = []

    def on_disconnect(e: ConnectionLost) -> None:  # a plain function
        lost.append(e)
        disconnected.set()

    async def on_reconnect() -> None:  # a coroutine function
        reconnected.set()

    svc = await middleman_client.connect(
        [s1.url, s2.url],
        SERVICE_KEY,
        on_disconnect=on_disconnect,
        on_reconnect=on_reconnect,
        **FAST,
    )
    assert svc.url == s1.url
    await svc.enable_req("echo")
    await svc.enable_sub("room")
    room = await svc.subscribe("room")

    s1.kill()  # SIGKILL: no close frame, the socket just dies
    await asyncio.wait_for(disconnected.wait(), WAIT)
    await asyncio.wait_for(reconnected.wait(), WAIT)
    await asyncio.wait_for(svc.wait_ready(), WAIT)
    assert svc.url == s2.url and svc.reconnects == 1 and svc.connected
    assert len(lost) == 1 and isinstance(lost[0], ConnectionLost)

    # On the second server: the EREQ, the ESUB and the subscription are in force again.
    cli = await middleman_client.connect(s2.url, CLIENT_KEY)
    answer = asyncio.ensure_future(cli.request("echo", "hi", timeout=WAIT))
    req = await next_msg(svc)
    assert (req.cmd, req.target) == ("REQ", "echo")
    await svc.reply(req, req.body)
    assert (await answer).text == "hi"
    await cli.subscribe("room")  # permitted: the ESUB was sent again
    other = await middleman_client.connect(s2.url, SERVICE_KEY)
    await other.publish("room", "after failover")
    m = await asyncio.wait_for(room.recv(), WAIT)
    assert (m.target, m.text) == ("room", "after failover")
    assert (await next_msg(cli)).text == "after failover"
    for c in (cli, other, svc):
        await c.close()


@run
async def test_the_first_connect_goes_down_the_list(make_server):
    dead = dead_url(make_server)
    s = make_server()
    cli = await middleman_client.connect([dead, s.url], CLIENT_KEY, **FAST)
    assert cli.url == s.url and cli.connected
    await cli.close()
    # Without reconnect each URL is tried once, then the last error is raised.
    with pytest.raises(OSError):
        await middleman_client.connect([dead, dead], CLIENT_KEY, reconnect=False)


@run
async def test_the_first_connect_is_retried_until_a_server_comes_up(make_server):
    dead = dead_url(make_server)
    port = int(dead.rsplit(":", 1)[1].rstrip("/"))
    loop = asyncio.get_running_loop()
    attempt = asyncio.ensure_future(
        middleman_client.connect([dead], CLIENT_KEY, open_timeout=WAIT, **FAST)
    )
    # Wait for a failed attempt (the client logs each one), then start the server.
    failed = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "failed" in record.getMessage():
                loop.call_soon_threadsafe(failed.set)

    logger = logging.getLogger("middleman_client")
    handler, level = Seen(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        await asyncio.wait_for(failed.wait(), WAIT)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not attempt.done()
    s = await loop.run_in_executor(None, lambda: make_server(port=port))
    cli = await asyncio.wait_for(attempt, WAIT)
    assert cli.url == s.url and cli.connected
    await cli.close()


@run
async def test_the_first_connect_gives_up_within_its_bounds(make_server):
    dead = dead_url(make_server)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        await middleman_client.connect([dead], CLIENT_KEY, open_timeout=0.5, **FAST)
    assert time.monotonic() - t0 < WAIT
    t0 = time.monotonic()
    with pytest.raises(OSError):
        await middleman_client.connect(
            [dead], CLIENT_KEY, max_reconnect_attempts=3, open_timeout=WAIT, **FAST
        )
    assert time.monotonic() - t0 < WAIT


@run
async def test_giving_up_reconnecting_calls_on_error_and_ends_iteration(make_server):
    s = make_server()
    errors: List[Exception] = []
    got_error = asyncio.Event()

    def on_error(e: Exception) -> None:
        errors.append(e)
        got_error.set()

    cli = await middleman_client.connect(
        s.url, CLIENT_KEY, max_reconnect_attempts=2, on_error=on_error, **FAST
    )
    s.kill()
    await asyncio.wait_for(got_error.wait(), WAIT)
    assert isinstance(errors[0], ConnectionLost) and "gave up" in str(errors[0])
    with pytest.raises(ConnectionLost):
        await next_msg(cli)
    with pytest.raises(ConnectionLost):
        await cli.publish("t", "x")
    await cli.close()


@run
async def test_a_refused_resubscription_goes_to_on_error(make_server):
    s = make_server()
    errors: "asyncio.Queue[Exception]" = asyncio.Queue()
    svc = await middleman_client.connect(s.url, SERVICE_KEY, reconnect=False)
    await svc.enable_sub("room")
    cli = await middleman_client.connect(s.url, CLIENT_KEY, on_error=errors.put_nowait, **FAST)
    await cli.subscribe("room")
    assert s.stop() == 0  # the new server has no ESUB room: the SUB sent again is refused
    s2 = make_server(port=s.port)  # stopped by the fixture
    e = await asyncio.wait_for(errors.get(), WAIT)
    assert isinstance(e, NotPermitted) and (e.cmd, e.target) == ("SUB", "room")
    # Once a service enables the topic again, the retried SUB is taken.
    svc2 = await middleman_client.connect(s2.url, SERVICE_KEY)
    await svc2.enable_sub("room")
    await asyncio.wait_for(cli.wait_ready(), WAIT)
    await svc2.publish("room", "back")
    assert (await next_msg(cli)).text == "back"
    for c in (cli, svc, svc2):
        await c.close()


# ---------------------------------------------------------------- typed errors


@run
async def test_typed_errors(make_server):
    s = make_server("--request-timeout", "300ms", "--max-pending-requests", "1")
    svc = await middleman_client.connect(s.url, SERVICE_KEY)
    cli = await middleman_client.connect(s.url, CLIENT_KEY)

    with pytest.raises(NoResponders) as e1:
        await cli.request("nobody", timeout=WAIT)
    assert e1.value.reason == "no responder" and isinstance(e1.value, ServerError)

    with pytest.raises(NotPermitted) as e2:
        await cli.subscribe("closed-room")
    assert e2.value.reason == "not permitted"

    await svc.enable_req("slow")
    with pytest.raises(RequestTimedOut) as e3:
        await cli.request("slow", timeout=WAIT)
    assert e3.value.reason == "request timed out" and isinstance(e3.value, TimeoutError)
    await next_msg(svc)  # the timed-out REQ

    # One request in flight is the limit: a second one is refused.
    first = asyncio.ensure_future(cli.request("slow", timeout=WAIT))
    req = await next_msg(svc)
    with pytest.raises(TooManyRequests) as e4:
        await cli.request("slow", timeout=WAIT)
    assert e4.value.reason == "too many requests in flight"
    await svc.reply(req, "ok")
    assert (await first).text == "ok"

    other = await middleman_client.connect(s.url, SERVICE_KEY)
    await other.enable_req("flaky")
    task = asyncio.ensure_future(cli.request("flaky", timeout=WAIT))
    await next_msg(other)
    await other.close()  # leaves without answering
    with pytest.raises(ResponderDisconnected) as e5:
        await task
    assert e5.value.reason == "responder disconnected"

    with pytest.raises(BadKey) as e6:
        await middleman_client.connect(s.url, "not-a-key")
    assert isinstance(e6.value, AuthError) and isinstance(e6.value, ServerError)
    assert e6.value.reason == "bad key" and "bad key" in str(e6.value)
    await svc.close()
    await cli.close()


# ---------------------------------------------------------------- the publish buffer


@run
async def test_publish_while_disconnected_is_buffered_up_to_the_limit(make_server):
    s = make_server()
    disconnected = asyncio.Event()
    pub = await middleman_client.connect(
        s.url,
        SERVICE_KEY,
        pending_bytes_limit=1000,
        on_disconnect=lambda e: disconnected.set(),
        **FAST,
    )
    await pub.enable_sub("t")
    seen = await pub.subscribe("t")
    port = s.port
    s.kill()
    await asyncio.wait_for(disconnected.wait(), WAIT)

    body = "x" * 300
    for i in range(3):
        await pub.publish("t", f"{i}{body}")  # returns at once: buffered
    assert 900 < pub.pending_bytes <= 1000
    with pytest.raises(BufferFull):
        await pub.publish("t", "3" + body)  # past the limit: raises at once
    t0 = time.monotonic()
    with pytest.raises(BufferFull):
        await pub.publish("t", "3" + body, timeout=0.3)  # waits, then raises
    assert 0.25 <= time.monotonic() - t0 < WAIT
    with pytest.raises(BufferFull):
        await pub.publish("t", "y" * 2000, timeout=WAIT)  # can never fit: at once

    # With a timeout, publish waits for room: the server comes back, the buffer is sent
    # after the subscription is restored, then this message.
    waiting = asyncio.ensure_future(pub.publish("t", "3" + body, timeout=WAIT))
    await asyncio.sleep(0)
    assert not waiting.done()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: make_server(port=port))
    await asyncio.wait_for(waiting, WAIT)
    got = [(await asyncio.wait_for(seen.recv(), WAIT)).text[0] for _ in range(4)]
    assert got == ["0", "1", "2", "3"]
    assert pub.pending_bytes == 0
    await pub.close()


@run
async def test_close_flushes_the_buffer(make_server):
    s = make_server()
    disconnected = asyncio.Event()
    pub = await middleman_client.connect(
        s.url, SERVICE_KEY, on_disconnect=lambda e: disconnected.set(), **FAST
    )
    port = s.port
    s.kill()
    await asyncio.wait_for(disconnected.wait(), WAIT)
    await pub.publish("t", "buffered")
    loop = asyncio.get_running_loop()
    s2 = await loop.run_in_executor(None, lambda: make_server(port=port))
    sub = await middleman_client.connect(s2.url, SERVICE_KEY)
    await sub.subscribe("t")
    await pub.close(timeout=WAIT)  # waits for the reconnect, sends, then closes
    m = await next_msg(sub)
    assert (m.target, m.text) == ("t", "buffered")
    await sub.close()


# ---------------------------------------------------------------- subscriptions


@run
async def test_subscriptions_iterate_their_own_topic_and_end_on_unsubscribe(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    cli = await middleman_client.connect(server.url, CLIENT_KEY)
    for t in ("a", "b", "c"):
        await svc.enable_sub(t)
    a = await cli.subscribe("a")
    b = await cli.subscribe("b")
    await cli.subscribe("c")  # never read: its messages go to the client-wide iterator
    assert isinstance(a, Subscription) and a.topic == "a" and a.active

    # Published before "a" is read: waiting in the client-wide queue, moved on first read.
    await svc.publish("a", "a1")
    await svc.publish("c", "c1")
    await svc.publish("b", "b1")
    assert (await asyncio.wait_for(a.recv(), WAIT)).text == "a1"
    for t in ("a2", "a3"):
        await svc.publish("a", t)
    await svc.publish("c", "c2")
    got_a = []
    async for m in a:
        got_a.append(m.text)
        if len(got_a) == 2:
            break
    assert got_a == ["a2", "a3"]
    assert (await asyncio.wait_for(b.recv(), WAIT)).text == "b1"
    # The client-wide iterator got only what no subscription claims.
    assert [(await next_msg(cli)).text for _ in range(2)] == ["c1", "c2"]

    async def drain(sub: Subscription) -> List[str]:
        return [m.text async for m in sub]

    reader = asyncio.ensure_future(drain(b))
    await svc.publish("b", "b2")
    await svc.publish("c", "c3")
    assert (await next_msg(cli)).text == "c3"  # so b2, sent before, has arrived too
    await b.unsubscribe()
    assert await asyncio.wait_for(reader, WAIT) == ["b2"]  # the iteration ended
    assert not b.active
    with pytest.raises(ConnectionLost):
        await b.recv()
    await svc.publish("b", "b3")  # no longer subscribed: not delivered
    await svc.publish("a", "a4")
    assert (await asyncio.wait_for(a.recv(), WAIT)).text == "a4"
    await cli.close()
    with pytest.raises(StopAsyncIteration):
        await a.__anext__()  # closed by the client: iteration ends
    await svc.close()


# ---------------------------------------------------------------- the blocking API


def test_sync_failover_subscription_and_buffer(make_server):
    s1, s2 = make_server(), make_server()
    events: "queue.Queue[str]" = queue.Queue()
    with connect_sync(
        [s1.url, s2.url],
        SERVICE_KEY,
        pending_bytes_limit=100,
        on_disconnect=lambda e: events.put("disconnect"),
        on_reconnect=lambda: events.put("reconnect"),
        **FAST,
    ) as c:
        news = c.subscribe("news")
        c.publish("news", "one")
        assert news.recv(timeout=WAIT).text == "one"
        s1.kill()
        assert events.get(timeout=WAIT) == "disconnect"
        assert events.get(timeout=WAIT) == "reconnect"
        c.wait_ready(timeout=WAIT)
        assert c.url == s2.url and c.reconnects == 1
        c.publish("news", "two")
        got = []
        for m in news:
            got.append(m.text)
            break
        assert got == ["two"]
        with pytest.raises(TimeoutError):
            news.recv(timeout=0.2)
        news.unsubscribe()
        assert list(news) == []  # the iteration ended

        s2.kill()  # no server left
        assert events.get(timeout=WAIT) == "disconnect"
        c.publish("news", "x" * 50)  # buffered
        with pytest.raises(BufferFull):
            c.publish("news", "y" * 50)
        t0 = time.monotonic()
        with pytest.raises(BufferFull):
            c.publish("news", "y" * 50, timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < WAIT
        assert c.pending_bytes > 50
        t0 = time.monotonic()
        c.close(timeout=0.3)  # no server comes back: waits its timeout, drops the buffer
        assert 0.25 <= time.monotonic() - t0 < WAIT
        with pytest.raises(ConnectionLost):
            c.publish("news", "after close")
