"""A chat service: the original middleman's chat example, ported to middleman_client.

It serves two kinds of clients at once:

* the browser demo page the server ships (``/demo``): the room topic (default ``chat``)
  is enabled for clients to publish and subscribe to (EPUB, ESUB); this service keeps the
  last 100 messages and answers ``REQ chat.history`` with them, one ``name<TAB>text``
  line each;
* the original example's shapes: ``REQ Join`` / ``REQ Leave`` with a ``room`` header put
  the requesting connection in or out of a named room, and ``PUB Say`` with a ``room``
  header is sent to every member's private channel (``MSG:<cid>``) with a ``from`` header
  naming the sender; ``PUB Hello`` is printed.

Run::

    cargo run --release                       # prints a service key and a client key
    MM_KEY=<service key> python examples/chat.py
    # then open http://127.0.0.1:8765/demo?key=<client key> in two browser tabs

Environment: ``MM_URL`` (default ``ws://127.0.0.1:8765/``), ``MM_KEY`` (a service key),
``CHAT_ROOM`` (default ``chat``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import defaultdict, deque
from typing import DefaultDict, Deque, Set

import middleman_client
from middleman_client import Message, Service

KEEP = 100


async def main() -> None:
    url = os.environ.get("MM_URL", "ws://127.0.0.1:8765/")
    key = os.environ.get("MM_KEY")
    if not key:
        sys.exit("chat: set MM_KEY to a service key")
    room = os.environ.get("CHAT_ROOM", "chat")

    client = await middleman_client.connect(url, key, reconnect=True)
    service = Service(client)
    history: Deque[str] = deque(maxlen=KEEP)
    rooms: DefaultDict[str, Set[str]] = defaultdict(set)  # room -> member cids

    # --- the demo page's room
    await client.enable_pub(room)
    await client.enable_sub(room)

    @service.subscriber(room)
    def record(msg: Message) -> None:
        name = msg.header("Name") or "anonymous"
        text = msg.text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
        history.append(f"{name}\t{text}")

    @service.responder(f"{room}.history")
    def recent(req: Message):
        return [("Count", str(len(history)))], "\n".join(history)

    # --- the original example's Join / Leave / Say / Hello
    await client.enable_pub("Say")
    await client.enable_pub("Hello")

    @service.responder("Join")
    def join(req: Message) -> str:
        rooms[req.header("room") or ""].add(req.cid or "")
        return ""

    @service.responder("Leave")
    def leave(req: Message) -> str:
        rooms[req.header("room") or ""].discard(req.cid or "")
        return ""

    @service.subscriber("Say")
    async def say(msg: Message) -> None:
        members = rooms.get(msg.header("room") or "", set())
        headers = [(n, v) for n, v in msg.headers if n.lower() not in ("cid", "uid")]
        headers.append(("from", msg.cid or ""))
        for cid in list(members):
            await client.publish(f"MSG:{cid}", msg.body, headers)

    @service.subscriber("Hello")
    def hello(msg: Message) -> None:
        print("Hello", msg.headers, msg.text, flush=True)

    print(f"chat: room {room!r} open, history at REQ {room}.history; Join/Leave/Say/Hello too",
          file=sys.stderr, flush=True)
    await service.run()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
