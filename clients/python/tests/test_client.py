"""middleman_client against the real server binary (see conftest.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

import middleman_client
from middleman_client import (
    AuthError,
    ConnectionLost,
    Message,
    ProtocolError,
    RequestTimedOut,
    ServerError,
    Service,
)
from middleman_client.sync import connect as connect_sync

from conftest import CLIENT_KEY, SERVICE_KEY, WAIT, next_msg, run


async def pair(url: str):
    svc = await middleman_client.connect(url, SERVICE_KEY)
    cli = await middleman_client.connect(url, CLIENT_KEY)
    return svc, cli


# ---------------------------------------------------------------- connecting


@run
async def test_connect_gives_a_cid_and_close_ends_iteration(server):
    svc, cli = await pair(server.url)
    assert svc.cid and cli.cid and svc.cid != cli.cid
    assert all(c.isdigit() or c.islower() for c in svc.cid), svc.cid
    await cli.close()
    got = [m async for m in cli]  # ends at once: closed by the client
    assert got == []
    with pytest.raises(ConnectionLost):
        await cli.publish("x", "y")
    await svc.close()


@run
async def test_a_refused_key_raises_auth_error(server):
    with pytest.raises(AuthError) as e:
        await middleman_client.connect(server.url, "not-a-key")
    assert "bad key" in str(e.value)


@run
async def test_an_unreachable_server_raises_oserror(make_server):
    s = make_server()
    url = s.url
    assert s.stop() == 0
    with pytest.raises(OSError):
        await middleman_client.connect(url, CLIENT_KEY, reconnect=False, open_timeout=WAIT)


# ---------------------------------------------------------------- publish / subscribe


@run
async def test_publish_subscribe_keeps_header_order_and_spelling(server):
    svc, cli = await pair(server.url)
    await svc.enable_sub("room")
    await cli.subscribe("room")
    headers = [("X-Zeta", "1"), ("x-alpha", "two words"), ("ReqID", "Mixed-Case"), ("X-Zeta", "again")]
    await svc.publish("room", "hello", headers=headers)
    m = await next_msg(cli)
    assert (m.cmd, m.target, m.body) == ("PUB", "room", b"hello")
    assert m.headers == headers + [("cid", svc.cid), ("uid", "")]
    assert m.header("X-ALPHA") == "two words" and m.cid == svc.cid and m.uid == ""
    # A mapping works too, in its order.
    await svc.publish("room", b"", headers={"B": "2", "a": "1"})
    m = await next_msg(cli)
    assert m.headers == [("B", "2"), ("a", "1"), ("cid", svc.cid), ("uid", "")]
    assert m.body == b""
    await svc.close()
    await cli.close()


@run
async def test_messages_arrive_in_order_and_unsubscribe_stops_them(server):
    svc, cli = await pair(server.url)
    for t in ("a", "b"):
        await svc.enable_sub(t)
        await cli.subscribe(t)
    for i in range(200):
        await svc.publish("a", str(i))
    got = [(await next_msg(cli)).text for _ in range(200)]
    assert got == [str(i) for i in range(200)]
    await cli.unsubscribe("a")
    await svc.publish("a", "not delivered")
    await svc.publish("b", "delivered")
    m = await next_msg(cli)
    assert (m.target, m.text) == ("b", "delivered")
    await cli.unsubscribe("never-subscribed")  # a no-op, never refused
    await svc.close()
    await cli.close()


@run
async def test_enable_pub_lets_a_client_publish(server):
    svc, cli = await pair(server.url)
    await svc.subscribe("in")
    await cli.publish("in", "refused")
    err = await next_msg(cli)
    assert err.is_error
    assert (err.header("cmd"), err.header("target"), err.header("reason")) == ("PUB", "in", "not permitted")
    assert err.text == "not permitted: PUB in"
    await svc.enable_pub("in")
    await cli.publish("in", "taken", headers=[("Name", "ann")])
    m = await next_msg(svc)
    assert (m.text, m.header("Name"), m.cid) == ("taken", "ann", cli.cid)
    await svc.close()
    await cli.close()


@run
async def test_set_uid_tags_later_messages(server):
    svc, cli = await pair(server.url)
    await svc.enable_pub("in")
    await svc.subscribe("in")
    await svc.set_uid(cli.cid, "user-42")
    await cli.publish("in", "hi")
    m = await next_msg(svc)
    assert (m.cid, m.uid) == (cli.cid, "user-42")
    with pytest.raises(ServerError) as e:
        await cli.set_uid(cli.cid, "me")
    assert (e.value.reason, e.value.cmd, e.value.target) == ("not permitted", "INT", "UID")
    await svc.close()
    await cli.close()


@run
async def test_private_channel(server):
    svc, cli = await pair(server.url)
    await svc.publish(f"MSG:{cli.cid}", "just you")
    m = await next_msg(cli)
    assert (m.target, m.text) == (f"MSG:{cli.cid}", "just you")
    with pytest.raises(ServerError) as e:
        await cli.subscribe(f"MSG:{svc.cid}")
    assert e.value.reason == "not permitted"
    await svc.close()
    await cli.close()


# ---------------------------------------------------------------- requests


@run
async def test_request_and_reply_by_hand(server):
    svc, cli = await pair(server.url)
    await svc.enable_req("time")
    task = asyncio.ensure_future(cli.request("time", "when?", headers=[("Zone", "UTC")], timeout=WAIT))
    req = await next_msg(svc)
    assert (req.cmd, req.target, req.body) == ("REQ", "time", b"when?")
    names = [n for n, _ in req.headers]
    assert names == ["ReqID", "Zone", "rid", "cid", "uid"], req.headers
    assert req.cid == cli.cid
    await svc.reply(req, "12:00", headers=[("Took-Ms", "3")])
    res = await task
    assert (res.cmd, res.target, res.body) == ("RES", "time", b"12:00")
    assert [n for n, _ in res.headers] == ["Took-Ms", "ReqID", "cid", "uid"], res.headers
    assert res.header("reqid") == req.header("ReqID")
    assert res.header("rid") is None and res.cid == svc.cid
    with pytest.raises(ValueError):
        await svc.reply(res, "not a REQ")
    with pytest.raises(ValueError):
        await cli.request("time", headers=[("reqid", "mine")])
    await svc.close()
    await cli.close()


@run
async def test_service_decorators_answer_requests_and_handle_pubs(server):
    svc_client, cli = await pair(server.url)
    service = Service(svc_client)
    seen = asyncio.Queue()

    @service.responder("echo")
    async def echo(req: Message):
        return [("Echo-Of", req.cid or "")], req.body

    @service.responder("plain")
    def plain(req: Message):  # a plain function works too
        return "just a body"

    @service.responder("broken")
    async def broken(req: Message):
        raise RuntimeError("it broke")

    @service.subscriber("events")
    async def events(msg: Message):
        await seen.put(msg.text)

    runner = asyncio.ensure_future(service.run())
    await svc_client.enable_pub("events")
    # Wait until run() has registered the responders: the first request answered.
    res = await cli.request("echo", b"ping", timeout=WAIT)
    assert res.body == b"ping" and res.header("Echo-Of") == cli.cid
    res = await cli.request("plain", timeout=WAIT)
    assert res.text == "just a body"
    res = await cli.request("broken", timeout=WAIT)
    assert (res.header("Error"), res.body) == ("it broke", b"")
    await cli.publish("events", "e1")
    assert await asyncio.wait_for(seen.get(), WAIT) == "e1"
    # Concurrent requests are answered concurrently and each gets its own answer.
    bodies = [f"n{i}" for i in range(50)]
    answers = await asyncio.gather(*(cli.request("echo", b, timeout=WAIT) for b in bodies))
    assert [a.text for a in answers] == bodies
    await svc_client.close()
    await asyncio.wait_for(runner, WAIT)  # run() returns when its client is closed
    await cli.close()


@run
async def test_errors_no_responder_and_not_permitted(server):
    svc, cli = await pair(server.url)
    with pytest.raises(ServerError) as e:
        await svc.request("nobody", timeout=WAIT)
    assert (e.value.reason, e.value.cmd, e.value.target) == ("no responder", "REQ", "nobody")
    assert str(e.value) == "no responder (REQ nobody)"
    assert e.value.message is not None and e.value.message.is_error
    # A client's REQ for a target no service registered (EREQ): nobody may answer it.
    with pytest.raises(ServerError) as e:
        await cli.request("secret", timeout=WAIT)
    assert e.value.reason == "no responder"
    with pytest.raises(ServerError) as e:
        await cli.subscribe("secret")
    assert (e.value.reason, e.value.cmd, e.value.target) == ("not permitted", "SUB", "secret")
    with pytest.raises(ServerError) as e:
        await cli.enable_req("mine")
    assert e.value.reason == "not permitted"
    # The connection stays usable.
    await svc.enable_sub("secret")
    await cli.subscribe("secret")
    await svc.close()
    await cli.close()


@run
async def test_responder_disconnected(server):
    svc, cli = await pair(server.url)
    await svc.enable_req("flaky")
    task = asyncio.ensure_future(cli.request("flaky", timeout=WAIT))
    await next_msg(svc)  # the REQ arrived; leave without answering
    await svc.close()
    with pytest.raises(ServerError) as e:
        await task
    assert e.value.reason == "responder disconnected"
    await cli.close()


@run
async def test_client_side_timeout_raises_timeout_error(server):
    svc, cli = await pair(server.url)
    await svc.enable_req("slow")
    with pytest.raises(TimeoutError) as e:
        await cli.request("slow", timeout=0.3)
    assert not isinstance(e.value, ServerError)
    # The late answer is dropped, not delivered as a message.
    req = await next_msg(svc)
    await svc.reply(req, "late")
    await svc.publish(f"MSG:{cli.cid}", "next")
    assert (await next_msg(cli)).text == "next"
    await svc.close()
    await cli.close()


@run
async def test_server_side_timeout_raises_request_timed_out(make_server):
    s = make_server("--request-timeout", "300ms")
    svc, cli = await pair(s.url)
    await svc.enable_req("slow")
    with pytest.raises(RequestTimedOut) as e:
        await cli.request("slow", timeout=WAIT)
    assert isinstance(e.value, TimeoutError) and isinstance(e.value, ServerError)
    assert e.value.reason == "request timed out"
    await svc.close()
    await cli.close()


@run
async def test_close_fails_pending_requests(server):
    svc, cli = await pair(server.url)
    await svc.enable_req("slow")
    task = asyncio.ensure_future(cli.request("slow", timeout=WAIT))
    await next_msg(svc)
    await cli.close()
    with pytest.raises(ConnectionLost):
        await task
    await svc.close()


# ---------------------------------------------------------------- bodies


def awkward_body(size: int) -> bytes:
    """Random bytes (not UTF-8) with LF, CRLF, lone CR and lines starting with dots, in
    lines shorter than the server's 8 KiB line limit."""
    rnd = random.Random(13)
    pieces = [b"\n.", b"\n..", b".\r\n", b"\r\n", b"\n", b"\r\n.\n", b"\r\x00\xff\n"]
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(rnd.randrange(0, 2000)).replace(b"\n", b"")
        out += rnd.choice(pieces)
    return bytes(out[:size])


@run
async def test_dot_stuffing_and_line_breaks_survive_the_round_trip(server):
    svc, cli = await pair(server.url)
    await svc.enable_sub("t")
    await cli.subscribe("t")
    for body in [b".", b"..", b"a\n.\nb", b".start\r\n.\r\nend.", b"\n", b"\r\n", b"x\n", b"\n.", b"crlf\r\nlf\nmix"]:
        await svc.publish("t", body)
        assert (await next_msg(cli)).body == body
    await svc.publish("t", "text body: ünïcödé")
    m = await next_msg(cli)
    assert m.text == "text body: ünïcödé"
    await svc.close()
    await cli.close()


@run
async def test_a_one_mib_body(make_server):
    s = make_server("--max-message-bytes", "2MiB")
    svc, cli = await pair(s.url)
    body = awkward_body(1 << 20)
    assert len(body) == 1 << 20 and body.count(b"\n.") > 10
    await svc.enable_sub("big")
    await svc.enable_req("big")
    await cli.subscribe("big")
    await svc.publish("big", body)
    m = await next_msg(cli)
    assert m.body == body
    task = asyncio.ensure_future(cli.request("big", body, timeout=WAIT))
    req = await next_msg(svc)
    assert req.body == body
    await svc.reply(req, req.body[::-1])
    assert (await task).body == body[::-1]
    await svc.close()
    await cli.close()


def test_encode_and_decode_by_hand():
    wire = middleman_client.encode("PUB", "t", [("A", "1")], b".x\n..y\r\nz")
    assert wire == b"PUB t\r\nA: 1\r\n\r\n..x\n...y\r\nz\r\n.\r\n"
    [m] = middleman_client.decode(wire)
    assert (m.cmd, m.target, m.headers, m.body) == ("PUB", "t", [("A", "1")], b".x\n..y\r\nz")
    # LF alone is accepted; a "." where a header is expected ends the message.
    msgs = middleman_client.decode(b"\nPUB  a b \nH:v\n\nl1\n..l2\n.\nRES r\n.\n")
    assert [(m.cmd, m.target, m.headers, m.body) for m in msgs] == [
        ("PUB", "a b", [("H", "v")], b"l1\n.l2"),
        ("RES", "r", [], b""),
    ]
    assert middleman_client.encode("SUB", "t") == b"SUB t\r\n\r\n\r\n.\r\n"
    for bad in [("pub x", "t"), ("PUB", ""), ("PUB", " t"), ("PUB", "a\nb"), ("PUB", "x" * 256)]:
        with pytest.raises(ProtocolError):
            middleman_client.encode(*bad)
    with pytest.raises(ProtocolError):
        middleman_client.encode("PUB", "t", [("Bad Name", "v")])
    with pytest.raises(ProtocolError):
        middleman_client.encode("PUB", "t", [("N", "line\r\nbreak")])
    with pytest.raises(ProtocolError):
        middleman_client.decode(b"PUB t\r\n\r\nno terminator\r\n")


# ---------------------------------------------------------------- reconnect


@run
async def test_reconnect_after_a_server_restart_resubscribes(make_server):
    s = make_server()
    fast = dict(reconnect=True, min_delay=0.05, max_delay=0.5)
    svc_client = await middleman_client.connect(s.url, SERVICE_KEY, **fast)
    cli = await middleman_client.connect(s.url, CLIENT_KEY, **fast)
    service = Service(svc_client)

    @service.responder("echo")
    async def echo(req: Message):
        return req.body

    runner = asyncio.ensure_future(service.run())
    await svc_client.enable_sub("room")
    await cli.subscribe("room")
    assert (await cli.request("echo", "before", timeout=WAIT)).text == "before"
    old = (svc_client.cid, cli.cid)

    # A request in flight when the server goes away fails; the server forgot it.
    await svc_client.enable_req("stall")
    stalled = asyncio.ensure_future(cli.request("stall", timeout=WAIT))
    await asyncio.sleep(0)  # let it be sent
    s2 = s.restart()  # SIGTERM (close 1001), then a new process on the same port
    with pytest.raises(ConnectionLost):
        await stalled

    await asyncio.wait_for(svc_client.wait_ready(), WAIT)
    await asyncio.wait_for(cli.wait_ready(), WAIT)
    assert svc_client.reconnects == 1 and cli.reconnects == 1
    assert svc_client.cid not in old and cli.cid not in old
    # The service's ESUB and EREQ, and the client's SUB, are in force again.
    await svc_client.publish("room", "after")
    m = await next_msg(cli)
    assert (m.target, m.text, m.cid) == ("room", "after", svc_client.cid)
    assert (await cli.request("echo", "again", timeout=WAIT)).text == "again"
    await cli.close()
    await svc_client.close()
    await asyncio.wait_for(runner, WAIT)
    s2.stop()


@run
async def test_without_reconnect_a_lost_connection_ends_iteration_with_an_error(make_server):
    s = make_server()
    cli = await middleman_client.connect(s.url, CLIENT_KEY, reconnect=False)
    assert s.stop() == 0
    with pytest.raises(ConnectionLost) as e:
        async for _ in cli:
            pass
    assert e.value.code == 1001
    with pytest.raises(ConnectionLost):
        await cli.wait_ready()
    await cli.close()


# ---------------------------------------------------------------- the blocking wrapper


def test_sync_wrapper(server):
    with connect_sync(server.url, SERVICE_KEY) as svc, connect_sync(server.url, CLIENT_KEY) as cli:
        assert svc.cid and cli.cid
        svc.enable_sub("news")
        svc.enable_pub("news")
        svc.subscribe("news")
        cli.subscribe("news")
        cli.publish("news", "from the script", headers=[("K", "v")])
        for c in (svc, cli):
            m = c.recv(timeout=WAIT)
            assert (m.text, m.header("K"), m.cid) == ("from the script", "v", cli.cid)
        with pytest.raises(TimeoutError):
            cli.recv(timeout=0.2)
        with pytest.raises(ServerError) as e:
            cli.request("nothing", timeout=WAIT)
        assert e.value.reason == "no responder"
        with pytest.raises(ServerError) as e:
            cli.subscribe("closed-room")
        assert e.value.reason == "not permitted"
        svc.enable_req("add")
        svc.set_uid(cli.cid, "u1")
        cli.unsubscribe("news")

        import threading

        def answer() -> None:
            req = svc.recv(timeout=WAIT)
            a, b = req.text.split("+")
            svc.reply(req, str(int(a) + int(b)), headers=[("By", req.uid or "")])

        t = threading.Thread(target=answer)
        t.start()
        res = cli.request("add", "2+3", timeout=WAIT)
        t.join(WAIT)
        assert (res.text, res.header("By")) == ("5", "u1")
    with pytest.raises(ConnectionLost):
        cli.publish("news", "after close")
