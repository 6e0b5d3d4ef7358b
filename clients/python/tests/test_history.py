"""History topics (protocol 9.5): the client resumes by itself after a reconnect, against
a real server started with a configuration file holding a ``[[history]]`` table."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, List

import middleman_client
from middleman_client import BadRequest, Position, Recovery

from conftest import CLIENT_KEY, SERVICE_KEY, WAIT, Server, next_msg, run

FAST: Any = dict(min_delay=0.05, max_delay=0.2)

HISTORY = """
[[history]]
prefix = "h."
size = 10000
ttl = "10m"
"""


def history_server(make_server: Any, tmp_path: Path) -> Server:
    cfg = tmp_path / "middleman.toml"
    cfg.write_text(HISTORY)
    s: Server = make_server("--config", str(cfg))
    return s


def kill_socket(client: middleman_client.Client) -> None:
    """Cut the client's TCP connection under it (not the client): no close frame."""
    ws = client._ws
    assert ws is not None
    ws.transport.abort()


@run
async def test_a_killed_socket_mid_stream_loses_and_doubles_nothing(make_server, tmp_path):
    s = history_server(make_server, tmp_path)
    svc = await middleman_client.connect(s.url, SERVICE_KEY)
    await svc.enable_sub("h.seq")
    failed: List[Recovery] = []
    cli = await middleman_client.connect(
        s.url, CLIENT_KEY, on_recovery_failed=failed.append, **FAST
    )
    sub = await cli.subscribe("h.seq")

    n = 600

    async def publish() -> None:
        for i in range(n):
            await svc.publish("h.seq", str(i))
            await asyncio.sleep(0.004)  # a stream that lasts a few seconds

    publisher = asyncio.ensure_future(publish())
    got: List[int] = []
    killed_while_publishing: List[bool] = []
    while len(got) < n:
        m = await asyncio.wait_for(sub.recv(), WAIT)
        assert m.target == "h.seq"
        got.append(int(m.text))
        # Twice mid-stream: once early, once after the first reconnect is done.
        if (len(got) == 100 and not killed_while_publishing) or (
            len(got) >= 300 and len(killed_while_publishing) == 1 and cli.reconnects == 1
        ):
            killed_while_publishing.append(not publisher.done())
            kill_socket(cli)
    await publisher
    assert got == list(range(n))  # every message once, in order
    assert killed_while_publishing == [True, True]
    assert cli.reconnects == 2
    assert failed == []
    rec = sub.recovery
    assert rec is not None and rec.topic == "h.seq" and rec.recovered
    pos = sub.position
    assert pos is not None and cli.positions == {"h.seq": pos}
    # Nothing else reached the application (SYS:RECOVERY is consumed by the client).
    await cli.publish("h.done", "x")  # not permitted: the error arrives through recv
    m = await next_msg(cli)
    assert m.is_error
    await cli.close()
    await svc.close()


@run
async def test_the_client_wide_iterator_resumes_too(make_server, tmp_path):
    s = history_server(make_server, tmp_path)
    svc = await middleman_client.connect(s.url, SERVICE_KEY)
    await svc.enable_sub("h.all")
    reconnected = asyncio.Event()
    cli = await middleman_client.connect(
        s.url, CLIENT_KEY, on_reconnect=reconnected.set, **FAST
    )
    await cli.subscribe("h.all")  # the Subscription is not read: client-wide iterator
    for i in range(5):
        await svc.publish("h.all", str(i))
    assert [int((await next_msg(cli)).text) for _ in range(5)] == list(range(5))
    kill_socket(cli)
    for i in range(5, 10):
        await svc.publish("h.all", str(i))  # missed by the client, kept by the server
    await asyncio.wait_for(reconnected.wait(), WAIT)
    await svc.publish("h.all", "10")
    rest = [await next_msg(cli) for _ in range(6)]
    assert [int(m.text) for m in rest] == list(range(5, 11))
    assert all(m.target == "h.all" for m in rest)
    await cli.close()
    await svc.close()


@run
async def test_a_server_restart_reports_recovery_failed(make_server, tmp_path):
    s = history_server(make_server, tmp_path)
    svc = await middleman_client.connect(s.url, SERVICE_KEY, **FAST)
    await svc.enable_sub("h.t")
    failed: "asyncio.Queue[Recovery]" = asyncio.Queue()

    async def on_recovery_failed(rec: Recovery) -> None:  # a coroutine function
        await failed.put(rec)

    cli = await middleman_client.connect(
        s.url, CLIENT_KEY, on_recovery_failed=on_recovery_failed, **FAST
    )
    sub = await cli.subscribe("h.t")
    await svc.publish("h.t", "before")
    m = await asyncio.wait_for(sub.recv(), WAIT)
    before = Position.of(m)
    assert before is not None and sub.position == before
    assert m.header("epoch") == before.epoch and m.header("offset") == str(before.offset)

    s2 = s.restart()  # a new epoch: what was kept is gone
    try:
        rec = await asyncio.wait_for(failed.get(), WAIT)
        assert rec.topic == "h.t" and not rec.recovered
        assert rec.position is not None and rec.position.epoch != before.epoch
        assert sub.recovery == rec and sub.position == rec.position
        await asyncio.wait_for(svc.wait_ready(), WAIT)
        await svc.publish("h.t", "after")
        m = await asyncio.wait_for(sub.recv(), WAIT)
        assert m.text == "after" and sub.position == Position.of(m)
        assert failed.empty()
        await cli.close()
        await svc.close()
    finally:
        s2.stop()


@run
async def test_subscribe_with_since(make_server, tmp_path):
    s = history_server(make_server, tmp_path)
    svc = await middleman_client.connect(s.url, SERVICE_KEY)
    await svc.enable_sub("h.x")
    await svc.enable_sub("plain")
    for i in range(3):
        await svc.publish("h.x", str(i))
    failed: List[Recovery] = []
    cli = await middleman_client.connect(s.url, CLIENT_KEY, on_recovery_failed=failed.append)

    last = await cli.subscribe("h.x", since="last")
    assert last.recovery is not None and last.recovery.recovered
    m = await asyncio.wait_for(last.recv(), WAIT)
    assert m.text == "2" and last.position == Position.of(m) == last.recovery.position
    try:
        await cli.subscribe("h.x", since="last")
        raise AssertionError("a second SUB with since was taken")
    except BadRequest as e:
        assert e.reason == "already subscribed"

    cli2 = await middleman_client.connect(s.url, CLIENT_KEY)
    pos = last.position
    assert pos is not None
    # From a position: what came after it (here the pair form, (epoch, offset)).
    sub = await cli2.subscribe("h.x", since=(pos.epoch, pos.offset - 2))
    assert [(await asyncio.wait_for(sub.recv(), WAIT)).text for _ in range(2)] == ["1", "2"]
    assert sub.recovery == Recovery("h.x", True, pos)
    try:
        await svc.subscribe("h.y", since="nonsense")
        raise AssertionError("bad since was taken")
    except BadRequest as e:
        assert e.reason == "bad since"

    # A topic without history: recovered false, no position; reported.
    plain = await cli.subscribe("plain", since="last")
    assert plain.recovery == Recovery("plain", False, None) and plain.position is None
    await asyncio.sleep(0)
    assert failed == [Recovery("plain", False, None)]
    assert cli.positions == {"h.x": pos}
    await cli.close()
    await cli2.close()
    await svc.close()


def test_sync_client_subscribes_with_since(make_server, tmp_path):
    from middleman_client.sync import connect as connect_sync

    s = history_server(make_server, tmp_path)
    with connect_sync(s.url, SERVICE_KEY) as svc:
        svc.enable_sub("h.s")
        svc.publish("h.s", "kept")
        with connect_sync(s.url, CLIENT_KEY) as cli:
            sub = cli.subscribe("h.s", since="last")
            m = sub.recv(timeout=WAIT)
            assert m.text == "kept"
            assert sub.recovery is not None and sub.recovery.recovered
            assert sub.position == Position.of(m) and cli.positions == {"h.s": sub.position}
