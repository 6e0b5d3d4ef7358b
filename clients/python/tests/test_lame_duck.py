"""A zero-downtime upgrade through the client's reconnect: a new server process started
on the same port with ``--reuse-port``, the old one put in lame duck (SIGUSR2), and a
publisher and a subscriber moving from the old to the new one (see conftest.py).

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
closed and re-subscribed on the new process before the publisher's turn comes (3 s
duration, two connections: the subscriber at the first 250 ms tick, the publisher after
1.5 s); the test checks that order rather than assuming it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any, List

import middleman_client
from middleman_client import ConnectionLost

from conftest import SERVICE_KEY, WAIT, run

FAST: Any = dict(min_delay=0.05, max_delay=0.5)
N = 100


@run
async def test_publisher_and_subscriber_move_to_a_reuse_port_process_with_nothing_lost(
    make_server: Any,
) -> None:
    old = make_server("--reuse-port", "--lame-duck-duration", "3s")
    events: List[str] = []
    sub_back = asyncio.Event()
    pub_lost = asyncio.Event()
    lost: List[ConnectionLost] = []

    def sub_reconnected() -> None:
        events.append("sub reconnected")
        sub_back.set()

    def pub_disconnected(e: ConnectionLost) -> None:
        events.append("pub disconnected")
        lost.append(e)
        pub_lost.set()

    sub = await middleman_client.connect(
        old.url, SERVICE_KEY, on_reconnect=sub_reconnected, **FAST
    )
    seq = await sub.subscribe("seq")
    publisher = await middleman_client.connect(
        old.url, SERVICE_KEY, on_disconnect=pub_disconnected, **FAST
    )
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
    # ...then the publisher is closed (1001) and reconnects.
    await asyncio.wait_for(pub_lost.wait(), WAIT)
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
    assert time.monotonic() - t0 < 3 + WAIT
    assert any("lame duck over" in line for line in old.lines), old.lines
    # Nothing more arrives (no duplicates).
    try:
        extra = await asyncio.wait_for(seq.recv(), 0.3)
        raise AssertionError(f"unexpected message {extra.text!r}")
    except asyncio.TimeoutError:
        pass
    assert new.proc.poll() is None
    await sub.close()
    await publisher.close()
