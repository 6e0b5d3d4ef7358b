"""A zero-downtime upgrade through the client's reconnect, at the scale of the lame-duck
acceptance: 1,000 connections on the old process, a new process started on the same port
with ``--reuse-port``, the old one put in lame duck (SIGUSR2) for 5 s, and a publisher
and a subscriber among them moving from the old to the new one (see conftest.py).

What "0 lost" means here, exactly. The two processes are not a cluster, so a message
reaches a subscriber only when both are on the same process; and a message a client
sends while the server's close frame is already on its way to it is read by nobody
(the server has sent its close). So the test publishes in three phases and claims that
every one of the 300 messages arrives, once and in order:

1. messages 1-100 on the old process, both connected (sent before the lame duck);
2. messages 101-200 published while the publisher is disconnected (after its client
   reported the close and before it reconnected): the client buffers them and sends them
   on the new connection, after its enablements and subscriptions;
3. messages 201-300 on the new process.

Nothing is published between the start of the lame duck and the publisher's close. The
lame duck closes the oldest connection first, so the subscriber (connected first) is
closed and re-subscribed on the new process at the first 250 ms tick, and the publisher
(connected last, after 998 idle clients) at the end of the 5 s; the test checks that
order rather than assuming it. It also checks what the other 998 saw: 1001, the closes
spread over the duration (no second with more than 30% of the 1,000), and every one
reconnected to the new process.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any, List, Tuple

import middleman_client
from middleman_client import ConnectionLost

from conftest import CLIENT_KEY, SERVICE_KEY, WAIT, run

FAST: Any = dict(min_delay=0.05, max_delay=0.5)
N = 100
#: Connections on the old process: the subscriber, the idle ones, the publisher.
CONNECTIONS = 1000
DURATION = 5.0
#: Connected at once at most (the server admits 64 unauthenticated ones per address).
BATCH = 32


@run
async def test_publisher_and_subscriber_move_to_a_reuse_port_process_with_nothing_lost(
    make_server: Any,
) -> None:
    old = make_server("--reuse-port", "--lame-duck-duration", f"{DURATION:g}s")
    events: List[str] = []
    sub_back = asyncio.Event()
    pub_lost = asyncio.Event()
    lost: List[ConnectionLost] = []
    #: (when, close code) of every connection the lame duck closed.
    closes: List[Tuple[float, Any]] = []

    def closed(e: ConnectionLost) -> None:
        closes.append((time.monotonic(), e.code))

    def sub_reconnected() -> None:
        events.append("sub reconnected")
        sub_back.set()

    def pub_disconnected(e: ConnectionLost) -> None:
        closed(e)
        events.append("pub disconnected")
        lost.append(e)
        pub_lost.set()

    sub = await middleman_client.connect(
        old.url, SERVICE_KEY, on_disconnect=closed, on_reconnect=sub_reconnected, **FAST
    )
    seq = await sub.subscribe("seq")
    idle: List[Any] = []
    while len(idle) < CONNECTIONS - 2:
        n = min(BATCH, CONNECTIONS - 2 - len(idle))
        idle += await asyncio.gather(
            *(
                middleman_client.connect(old.url, CLIENT_KEY, on_disconnect=closed, **FAST)
                for _ in range(n)
            )
        )
    publisher = await middleman_client.connect(
        old.url, SERVICE_KEY, on_disconnect=pub_disconnected, **FAST
    )
    old_prefix = sub.cid[:6]
    assert all(c.cid.startswith(old_prefix) for c in [*idle, publisher])
    got: List[int] = []

    async def receive(upto: int) -> None:
        while len(got) < upto:
            m = await asyncio.wait_for(seq.recv(), WAIT)
            got.append(int(m.text))

    # 1. Both on the old process.
    for i in range(1, N + 1):
        await publisher.publish("seq", str(i))
    await receive(N)

    # The new process on the same port, then the lame duck of the old one.
    new = make_server("--reuse-port", port=old.port)
    t0 = time.monotonic()
    old.proc.send_signal(signal.SIGUSR2)  # our own child, by its PID
    old.wait_line("lame duck: ")

    # The subscriber goes first and is re-subscribed on the new process...
    await asyncio.wait_for(sub_back.wait(), WAIT)
    await asyncio.wait_for(sub.wait_ready(), WAIT)
    events.append("sub ready")
    # ...then, at the end, the publisher is closed (1001) and reconnects.
    await asyncio.wait_for(pub_lost.wait(), DURATION + WAIT)
    assert events == ["sub reconnected", "sub ready", "pub disconnected"], events
    assert lost[0].code == 1001, lost[0]

    # 2. Published while disconnected: buffered by the client.
    for i in range(N + 1, 2 * N + 1):
        await publisher.publish("seq", str(i))
    assert not publisher.connected and publisher.pending_bytes > 0
    await asyncio.wait_for(publisher.wait_ready(), WAIT)
    assert publisher.pending_bytes == 0

    # 3. On the new process.
    for i in range(2 * N + 1, 3 * N + 1):
        await publisher.publish("seq", str(i))
    await receive(3 * N)
    assert got == list(range(1, 3 * N + 1))
    assert (sub.reconnects, publisher.reconnects) == (1, 1)

    # The old process has exited on its own (0) within its lame duck and a margin.
    code = await asyncio.get_running_loop().run_in_executor(None, old.proc.wait, WAIT)
    assert code == 0
    assert time.monotonic() - t0 < DURATION + WAIT
    assert any("lame duck over" in line for line in old.lines), old.lines
    # Nothing more arrives (no duplicates).
    try:
        extra = await asyncio.wait_for(seq.recv(), 0.3)
        raise AssertionError(f"unexpected message {extra.text!r}")
    except asyncio.TimeoutError:
        pass

    # Every one of the 1,000 was closed with 1001, spread over the duration, and is
    # back on the new process.
    assert len(closes) == CONNECTIONS, len(closes)
    assert {code for _, code in closes} == {1001}
    per_second = Counter(int(at - t0) for at, _ in closes)
    assert max(per_second.values()) * 10 <= CONNECTIONS * 3, sorted(per_second.items())
    await asyncio.wait_for(asyncio.gather(*(c.wait_ready() for c in idle)), WAIT)
    new_prefix = sub.cid[:6]
    assert new_prefix != old_prefix
    assert all(c.cid.startswith(new_prefix) for c in [*idle, publisher])
    print(f"closes per second: {sorted(per_second.items())}")

    assert new.proc.poll() is None
    await asyncio.gather(*(c.close() for c in [sub, publisher, *idle]))
