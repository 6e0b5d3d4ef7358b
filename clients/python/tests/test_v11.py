"""Protocol 1.1 calls of middleman_client (grants, server-side subscriptions, kicks,
presence, connection events) against the real server binary (see conftest.py)."""

from __future__ import annotations

import asyncio
from typing import Any, List

import pytest

import middleman_client
from middleman_client import (
    BadRequest,
    ConnectionLost,
    Event,
    Kicked,
    Member,
    NoResponders,
    NotPermitted,
    Presence,
    Service,
    TooManyGrants,
)
from middleman_client.sync import connect as connect_sync

from conftest import CLIENT_KEY, SERVICE_KEY, WAIT, next_msg, run


async def nothing_more(client: Any, marker_from: Any) -> List[Any]:
    """What ``client`` receives up to a marker sent on its private channel: a way to
    show that a message did not arrive (the marker comes after it would have)."""
    await marker_from.publish(f"MSG:{client.cid}", "marker")
    got = []
    while True:
        m = await next_msg(client)
        if m.target == f"MSG:{client.cid}" and m.text == "marker":
            return got
        got.append(m)


async def next_event(events: Any, cid: str) -> Event:
    """The next event about connection ``cid`` (the services' own are skipped)."""
    while True:
        ev: Event = await asyncio.wait_for(events.recv(), WAIT)
        if ev.cid == cid:
            return ev


# ---------------------------------------------------------------- grants


@run
async def test_grant_sub_is_for_one_connection_and_revoke_unsubscribes(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    a = await middleman_client.connect(server.url, CLIENT_KEY)
    b = await middleman_client.connect(server.url, CLIENT_KEY)
    await svc.grant_sub(a.cid, "room:1")
    await a.subscribe("room:1")
    with pytest.raises(NotPermitted) as e:
        await b.subscribe("room:1")
    assert (e.value.cmd, e.value.target) == ("SUB", "room:1")
    await svc.publish("room:1", "hi")
    assert (await next_msg(a)).text == "hi"
    # Withdrawing a's last right to the topic unsubscribes it.
    await svc.revoke_sub(a.cid, "room:1")
    await svc.publish("room:1", "after")
    assert await nothing_more(a, svc) == []
    with pytest.raises(NotPermitted):
        await a.subscribe("room:1")
    for c in (svc, a, b):
        await c.close()


@run
async def test_grant_pub_and_grant_req(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    cli = await middleman_client.connect(server.url, CLIENT_KEY)
    await svc.subscribe("up")
    await svc.grant_pub(cli.cid, "up")
    await cli.publish("up", "from the client")
    m = await next_msg(svc)
    assert (m.target, m.text, m.cid) == ("up", "from the client", cli.cid)
    await svc.revoke_pub(cli.cid, "up")
    await cli.publish("up", "refused")
    err = await next_msg(cli)
    assert err.is_error and err.header("reason") == "not permitted"
    # A grant to request does not make the granting service a responder. (Without any
    # responder the server answers "no responder" whether or not the client may ask.)
    await svc.grant_req(cli.cid, "ask")
    with pytest.raises(NoResponders):
        await cli.request("ask", timeout=WAIT)
    await svc.revoke_req(cli.cid, "ask")
    # A well-formed cid nobody has: a silent no-op.
    await svc.grant_sub("zz0000000000", "room:1")
    await svc.close()
    await cli.close()


@run
async def test_disable_withdraws_the_services_own_enablements(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    other = await middleman_client.connect(server.url, SERVICE_KEY)
    a = await middleman_client.connect(server.url, CLIENT_KEY)
    b = await middleman_client.connect(server.url, CLIENT_KEY)
    await svc.enable_sub("open")
    await a.subscribe("open")
    await svc.disable_sub("open")
    with pytest.raises(NotPermitted):
        await b.subscribe("open")
    await svc.publish("open", "still subscribed")  # existing subscriptions stay
    assert (await next_msg(a)).text == "still subscribed"
    await svc.enable_pub("in")
    await svc.disable_pub("in")
    await b.publish("in", "x")
    assert (await next_msg(b)).header("reason") == "not permitted"
    await svc.enable_req("svc.time")
    await svc.disable_req("svc.time")
    with pytest.raises(NoResponders):
        await other.request("svc.time", timeout=WAIT)
    for c in (svc, other, a, b):
        await c.close()


# ---------------------------------------------------------------- INT SUB / UNS / KICK


@run
async def test_subscribe_for_and_unsubscribe_for(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    cli = await middleman_client.connect(server.url, CLIENT_KEY)
    await svc.subscribe_for(cli.cid, "news")  # no grant needed: the service decides
    await svc.publish("news", "one")
    m = await next_msg(cli)
    assert (m.target, m.text) == ("news", "one")
    await svc.unsubscribe_for(cli.cid, "news")
    await svc.publish("news", "two")
    assert await nothing_more(cli, svc) == []
    await svc.close()
    await cli.close()


@run
async def test_errors_map_to_typed_exceptions(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    cli = await middleman_client.connect(server.url, CLIENT_KEY)
    with pytest.raises(BadRequest) as e:
        await svc.subscribe_for("Not A Cid!", "news")
    assert (e.value.reason, e.value.cmd, e.value.target) == ("bad cid", "INT", "SUB")
    with pytest.raises(BadRequest) as e:
        await svc.subscribe_for(cli.cid, "")
    assert e.value.reason == "bad topic"
    with pytest.raises(NotPermitted):
        await svc.subscribe_for(cli.cid, "SYS:CONNECT")
    with pytest.raises(NotPermitted):
        await svc.unsubscribe_for(cli.cid, f"MSG:{cli.cid}")
    with pytest.raises(BadRequest) as e:
        await svc.grant_sub("UPPER", "t")
    assert (e.value.reason, e.value.cmd, e.value.target) == ("bad cid", "ESUB", "t")
    # A client may use none of it.
    for call in (
        cli.grant_sub(svc.cid, "t"),
        cli.revoke_pub(svc.cid, "t"),
        cli.disable_req("t"),
        cli.subscribe_for(svc.cid, "t"),
        cli.kick(svc.cid),
        cli.presence("t"),
        cli.events(),
    ):
        with pytest.raises(NotPermitted):
            await call
    with pytest.raises(ValueError):
        await svc.presence("t", limit=-1)
    with pytest.raises(ValueError):
        await svc.events("reconnect")
    assert cli.connected and svc.connected
    await svc.close()
    await cli.close()


@run
async def test_a_kicked_client_gets_code_4000_and_does_not_reconnect(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    lost: List[ConnectionLost] = []
    cli = await middleman_client.connect(
        server.url, CLIENT_KEY, reconnect=True, on_disconnect=lost.append
    )
    await svc.kick(cli.cid, "go away")
    with pytest.raises(Kicked) as e:
        await next_msg(cli)
    assert isinstance(e.value, ConnectionLost)
    assert (e.value.code, e.value.reason) == (4000, "go away")
    assert [(x.code, x.reason) for x in lost] == [(4000, "go away")]
    await asyncio.sleep(0.3)
    assert not cli.connected and cli.reconnects == 0
    with pytest.raises(Kicked):
        await cli.publish("x", "y")
    # Without a reason: "kicked".
    other = await middleman_client.connect(server.url, CLIENT_KEY, reconnect=False)
    await svc.kick(other.cid)
    with pytest.raises(Kicked) as e:
        await next_msg(other)
    assert (e.value.code, e.value.reason) == (4000, "kicked")
    await svc.kick("zz0000000000")  # gone already: no-op
    await svc.close()


# ---------------------------------------------------------------- presence


@run
async def test_presence_counts_and_lists_members(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    a = await middleman_client.connect(server.url, CLIENT_KEY)
    b = await middleman_client.connect(server.url, CLIENT_KEY)
    c = await middleman_client.connect(server.url, CLIENT_KEY)
    await svc.set_uid(a.cid, "alice")
    await svc.set_uid(b.cid, "alice")
    for x in (a, b, c):
        await svc.subscribe_for(x.cid, "room:p")
    p = await svc.presence("room:p")
    assert isinstance(p, Presence)
    assert (p.topic, p.count, p.users, p.truncated, p.partial) == ("room:p", 3, 1, False, False)
    want = sorted([Member(a.cid, "alice"), Member(b.cid, "alice"), Member(c.cid, "")], key=lambda m: m.cid.encode())
    assert p.members == want
    p1 = await svc.presence("room:p", limit=1)
    assert (p1.count, p1.users, p1.members, p1.truncated) == (3, 1, want[:1], True)
    p0 = await svc.presence("room:p", limit=0)
    assert (p0.count, p0.users, p0.members) == (3, 1, [])
    empty = await svc.presence("nobody-here")
    assert (empty.count, empty.users, empty.members, empty.truncated) == (0, 0, [], False)
    for x in (svc, a, b, c):
        await x.close()


# ---------------------------------------------------------------- events


@run
async def test_events_report_connect_sub_uns_and_disconnect(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    events = await svc.events()
    assert events.topics == ("SYS:CONNECT", "SYS:DISCONNECT", "SYS:SUB", "SYS:UNS")
    cli = await middleman_client.connect(server.url, CLIENT_KEY, reconnect=False)
    ev = await next_event(events, cli.cid)
    assert (ev.kind, ev.cid, ev.uid, ev.role, ev.topic, ev.reason) == (
        "connect", cli.cid, "", "client", None, None)
    await svc.set_uid(cli.cid, "bob")
    await svc.subscribe_for(cli.cid, "room:e")
    ev = await next_event(events, cli.cid)
    assert (ev.kind, ev.cid, ev.uid, ev.role, ev.topic) == ("sub", cli.cid, "bob", "client", "room:e")
    assert ev.message is not None and ev.message.target == "SYS:SUB"
    await svc.unsubscribe_for(cli.cid, "room:e")
    ev = await next_event(events, cli.cid)
    assert (ev.kind, ev.topic) == ("uns", "room:e")
    await cli.close()
    ev = await next_event(events, cli.cid)
    assert (ev.kind, ev.cid, ev.uid, ev.reason) == ("disconnect", cli.cid, "bob", "normal")
    # A kick shows as reason "kicked".
    k = await middleman_client.connect(server.url, CLIENT_KEY, reconnect=False)
    assert (await next_event(events, k.cid)).kind == "connect"
    await svc.kick(k.cid)
    ev = await next_event(events, k.cid)
    assert (ev.kind, ev.cid, ev.reason) == ("disconnect", k.cid, "kicked")
    await events.unsubscribe()
    assert [e async for e in events if e.role != "service"] == []  # ended
    await svc.close()


@run
async def test_events_of_some_kinds_and_service_handlers(server):
    svc = await middleman_client.connect(server.url, SERVICE_KEY)
    gone = await svc.events("disconnect")
    assert gone.topics == ("SYS:DISCONNECT",)
    watcher = await middleman_client.connect(server.url, SERVICE_KEY)
    service = Service(watcher)
    seen: "asyncio.Queue[Event]" = asyncio.Queue()

    @service.on_event("SYS:CONNECT", "disconnect")
    async def on(ev: Event) -> None:
        if ev.role == "client":
            await seen.put(ev)

    task = asyncio.ensure_future(service.run())
    await asyncio.sleep(0.2)  # run() subscribed
    cli = await middleman_client.connect(server.url, CLIENT_KEY, reconnect=False)
    ev = await asyncio.wait_for(seen.get(), WAIT)
    assert (ev.kind, ev.cid) == ("connect", cli.cid)
    await cli.close()
    ev = await asyncio.wait_for(seen.get(), WAIT)
    assert (ev.kind, ev.cid, ev.reason) == ("disconnect", cli.cid, "normal")
    ev = await next_event(gone, cli.cid)  # no connect event here: only disconnects
    assert (ev.kind, ev.cid) == ("disconnect", cli.cid)
    await watcher.close()
    await task
    await svc.close()


def test_sync_client_has_the_same_calls(server):
    with connect_sync(server.url, SERVICE_KEY) as svc:
        events = svc.events("connect", "sub")
        with connect_sync(server.url, CLIENT_KEY, reconnect=False) as cli:
            def next_ev() -> Event:
                while True:
                    ev = events.recv(timeout=WAIT)
                    if ev.cid == cli.cid:
                        return ev

            assert next_ev().kind == "connect"
            svc.grant_sub(cli.cid, "s:room")
            cli.subscribe("s:room")
            ev = next_ev()
            assert (ev.kind, ev.topic, ev.role) == ("sub", "s:room", "client")
            p = svc.presence("s:room", limit=10)
            assert (p.count, p.members) == (1, [Member(cli.cid, "")])
            svc.revoke_sub(cli.cid, "s:room")
            assert svc.presence("s:room").count == 0
            svc.subscribe_for(cli.cid, "s:other")
            svc.unsubscribe_for(cli.cid, "s:other")
            svc.kick(cli.cid, "sync kick")
            with pytest.raises(Kicked) as e:
                cli.recv(timeout=WAIT)
            assert (e.value.code, e.value.reason) == (4000, "sync kick")
        events.unsubscribe()
        # What arrived before the UNS is still read, then the iteration ends.
        assert [e.topic for e in events if e.cid == cli.cid] == ["s:other"]


@run
async def test_too_many_grants_and_bad_limit(make_server):
    s = make_server("--max-subscriptions", "2")
    svc = await middleman_client.connect(s.url, SERVICE_KEY)
    cli = await middleman_client.connect(s.url, CLIENT_KEY)
    await svc.grant_sub(cli.cid, "g1")
    await svc.grant_pub(cli.cid, "g2")
    with pytest.raises(TooManyGrants) as e:
        await svc.grant_req(cli.cid, "g3")
    assert (e.value.reason, e.value.cmd, e.value.target) == ("too many grants", "EREQ", "g3")
    await svc.revoke_pub(cli.cid, "g2")
    await svc.grant_req(cli.cid, "g3")  # room again
    # presence() takes only an int; a raw request with another limit is refused.
    with pytest.raises(BadRequest) as e:
        await svc.request("SYS:PRESENCE", headers=[("topic", "g1"), ("limit", "many")], timeout=WAIT)
    assert e.value.reason == "bad limit"
    with pytest.raises(BadRequest) as e:
        await svc.request("SYS:PRESENCE", timeout=WAIT)
    assert e.value.reason == "missing header"
    await svc.close()
    await cli.close()


@run
async def test_events_and_disable_survive_a_failover(make_server):
    s1, s2 = make_server(), make_server()
    svc = await middleman_client.connect(
        [s1.url, s2.url], SERVICE_KEY, min_delay=0.05, max_delay=0.2
    )
    await svc.enable_sub("kept")
    await svc.enable_sub("dropped")
    await svc.disable_sub("dropped")  # not sent again after the failover
    events = await svc.events("connect")
    s1.kill()
    await asyncio.sleep(0.1)
    await asyncio.wait_for(svc.wait_ready(), WAIT)
    assert svc.url == s2.url
    cli = await middleman_client.connect(s2.url, CLIENT_KEY, reconnect=False)
    ev = await next_event(events, cli.cid)  # subscribed again on the second server
    assert (ev.kind, ev.role) == ("connect", "client")
    await cli.subscribe("kept")
    with pytest.raises(NotPermitted):
        await cli.subscribe("dropped")
    await cli.close()
    await svc.close()
