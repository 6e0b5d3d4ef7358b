"""Chat rooms on middleman 1.1: the service behind ``examples/chat/index.html``.

A browser (client key) cannot subscribe or publish anything by itself. It asks this
service, by request:

* ``REQ chat.join`` with headers ``room``, ``nick`` and, for a private room, ``invite``:
  the service tags the connection with the nickname (``INT UID``), grants it the room's
  topic ``room.<name>`` for that connection alone (``ESUB``/``EPUB`` with ``forcid``),
  subscribes it there itself (``INT SUB``), publishes a ``joined`` notice to the room and
  answers with the member list, taken from the server (``REQ SYS:PRESENCE``);
* ``REQ chat.leave`` with ``room``: ``INT UNS``, the grants withdrawn (``DSUB``/``DPUB``
  with ``forcid``), a ``left`` notice;
* ``REQ chat.members`` with ``room`` (members only): the member list, from presence.

Members talk by publishing to ``room.<name>`` (the server sets ``uid``, the nickname, so
no one can speak under another's name). Notices are published by this service, so the
page trusts a message with an ``event`` header only when its ``cid`` is the service's
(the ``cid`` of the answer to ``chat.join``).

The service subscribes to ``SYS:DISCONNECT`` and ``SYS:UNS``: a member whose connection
ends (or who unsubscribes by itself) has left, and the room gets a ``left`` notice.

A room whose name starts with ``private-`` gets an invite code when it is created (its
first member gets it in the answer to ``chat.join``); joining it afterwards needs that
code. Without it there is no grant, so the server itself refuses the connection's ``SUB``
and ``PUB`` of the room's topic. A room is forgotten once its last member left, and so is
its code.

The service also serves the page (``index.html``, ``chat.js`` and the browser client
``/middleman.js`` from ``clients/js``) over plain HTTP at ``CHAT_HTTP``.

Run (see README.md)::

    cargo run --release                 # prints a service key and a client key
    MM_KEY=<service key> PYTHONPATH=clients/python/src python3 examples/chat/service.py
    # then open http://127.0.0.1:8766/?key=<client key> in two browser tabs

Environment: ``MM_URL`` (the server, default ``ws://127.0.0.1:8765/``), ``MM_KEY`` (a
service key), ``CHAT_HTTP`` (where to serve the page, default ``127.0.0.1:8766``; port 0
picks a free one; ``off``: not served).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import middleman_client
from middleman_client import Client, EventSubscription, Message

HERE = Path(__file__).resolve().parent
HTML = "text/html; charset=utf-8"
JS = "text/javascript; charset=utf-8"
PAGE_FILES: Dict[str, Tuple[Path, str]] = {
    "/": (HERE / "index.html", HTML),
    "/index.html": (HERE / "index.html", HTML),
    "/chat.js": (HERE / "chat.js", JS),
    "/middleman.js": (HERE.parent.parent / "clients/js/middleman.js", JS),
}
#: The server address in index.html, replaced by MM_URL when the service serves the page.
PAGE_DEFAULT_URL = 'content="ws://127.0.0.1:8765/"'

ROOM = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")
NICK_BAD = re.compile(r"[\x00-\x1f\x7f]")
MAX_NICK = 32
PRIVATE = "private-"
TOPIC_PREFIX = "room."

Headers = List[Tuple[str, str]]
Answer = Tuple[Headers, str]


class Refused(Exception):
    """A request the service turns down; the text goes back in an ``error`` header."""


def topic_of(room: str) -> str:
    return TOPIC_PREFIX + room


@dataclass
class Room:
    name: str
    #: The invite code of a private room, None for a public one.
    invite: Optional[str]
    #: Member connections: cid -> nickname.
    members: Dict[str, str] = field(default_factory=dict)


class Chat:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.rooms: Dict[str, Room] = {}
        # Joins, leaves and departures change the rooms one at a time.
        self.lock = asyncio.Lock()
        self.tasks: Set["asyncio.Task[None]"] = set()

    # ---------------------------------------------------------------- requests

    @staticmethod
    def room_name(req: Message) -> str:
        room = (req.header("room") or "").strip()
        if not ROOM.match(room):
            raise Refused("bad room name (1-32 of a-z, 0-9 and -)")
        return room

    @staticmethod
    def nick_of(req: Message) -> str:
        nick = (req.header("nick") or "").strip()
        if not nick or len(nick) > MAX_NICK or NICK_BAD.search(nick):
            raise Refused(f"bad nickname (1-{MAX_NICK} characters)")
        return nick

    async def members_of(self, room: Room) -> Tuple[List[Dict[str, str]], bool]:
        """The connections subscribed to the room's topic, as the server sees them
        (presence): ``[{"cid": ..., "nick": ...}]``, sorted by cid; and whether the list
        was cut at the presence limit (1000)."""
        p = await self.client.presence(topic_of(room.name))
        return [{"cid": m.cid, "nick": m.uid or ""} for m in p.members], p.truncated

    async def join(self, req: Message) -> Answer:
        cid = req.cid or ""
        room_name = self.room_name(req)
        nick = self.nick_of(req)
        topic = topic_of(room_name)
        async with self.lock:
            room = self.rooms.get(room_name)
            if room is None:
                code = secrets.token_urlsafe(9) if room_name.startswith(PRIVATE) else None
                room = self.rooms[room_name] = Room(room_name, code)
            elif (
                room.invite is not None
                and cid not in room.members
                and not hmac.compare_digest(
                    (req.header("invite") or "").encode(), room.invite.encode()
                )
            ):
                raise Refused("not invited")
            try:
                await self.client.set_uid(cid, nick)
                await self.client.grant_sub(cid, topic)
                await self.client.grant_pub(cid, topic)
                await self.client.subscribe_for(cid, topic)
                new = cid not in room.members
                room.members[cid] = nick
                if new:
                    await self.notice(room, "join", cid, nick)
                members, truncated = await self.members_of(room)
            finally:
                if not room.members and self.rooms.get(room_name) is room:
                    del self.rooms[room_name]
            if not truncated and not any(m["cid"] == cid for m in members):
                # Gone before its subscription was made: its departure may have been
                # handled before it was a member.
                await self.remove(room, cid, "gone", connected=False)
                raise Refused("gone")
        info: Dict[str, object] = {
            "room": room_name,
            "topic": topic,
            "nick": nick,
            "members": members,
        }
        if room.invite is not None:
            info["invite"] = room.invite
        return [], json.dumps(info)

    async def leave(self, req: Message) -> Answer:
        cid = req.cid or ""
        room_name = self.room_name(req)
        async with self.lock:
            room = self.rooms.get(room_name)
            if room is None or cid not in room.members:
                raise Refused("not in the room")
            await self.remove(room, cid, "left", connected=True)
        return [], json.dumps({"room": room_name})

    async def members(self, req: Message) -> Answer:
        room_name = self.room_name(req)
        async with self.lock:
            room = self.rooms.get(room_name)
            if room is None or (req.cid or "") not in room.members:
                raise Refused("not in the room")
            members, _ = await self.members_of(room)
        return [], json.dumps({"room": room_name, "members": members})

    # ---------------------------------------------------------------- rooms

    async def notice(self, room: Room, event: str, cid: str, nick: str, reason: str = "") -> None:
        headers = [("event", event), ("member", cid), ("nick", nick)]
        if reason:
            headers.append(("reason", reason))
        await self.client.publish(topic_of(room.name), "", headers)

    async def remove(self, room: Room, cid: str, reason: str, connected: bool) -> None:
        """``cid`` leaves ``room`` (under the lock): it is unsubscribed and loses its
        grants when still connected; the others get a ``leave`` notice."""
        nick = room.members.pop(cid, None)
        topic = topic_of(room.name)
        if connected:
            await self.client.unsubscribe_for(cid, topic)
            await self.client.revoke_sub(cid, topic)
            await self.client.revoke_pub(cid, topic)
        if nick is not None:
            await self.notice(room, "leave", cid, nick, reason)
        if not room.members and self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    async def gone(self, cid: str, reason: str) -> None:
        """A connection ended: it leaves every room it was in."""
        async with self.lock:
            for room in [r for r in self.rooms.values() if cid in r.members]:
                await self.remove(room, cid, reason, connected=False)

    async def unsubscribed(self, cid: str, topic: str) -> None:
        """A member unsubscribed from its room by itself: it has left."""
        if not topic.startswith(TOPIC_PREFIX):
            return
        async with self.lock:
            room = self.rooms.get(topic[len(TOPIC_PREFIX):])
            if room is not None and cid in room.members:
                await self.remove(room, cid, "unsubscribed", connected=True)

    # ---------------------------------------------------------------- serving

    async def answer(self, req: Message) -> None:
        handlers = {
            "chat.join": self.join,
            "chat.leave": self.leave,
            "chat.members": self.members,
        }
        try:
            headers, body = await handlers[req.target](req)
        except Refused as e:
            headers, body = [("error", str(e))], ""
        except middleman_client.ServerError as e:
            print(f"chat: {req.target} for {req.cid}: {e}", file=sys.stderr, flush=True)
            headers, body = [("error", e.reason)], ""
        except ConnectionError:
            return  # the connection to the server is gone: nobody to answer
        try:
            await self.client.reply(req, body, headers)
        except ConnectionError as e:
            print(f"chat: could not answer {req.target}: {e}", file=sys.stderr, flush=True)

    def spawn(self, req: Message) -> None:
        t = asyncio.ensure_future(self.answer(req))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def watch(self, events: EventSubscription) -> None:
        """Departures: SYS:DISCONNECT (and SYS:UNS of a room topic)."""
        async for ev in events:
            if ev.kind == "disconnect":
                await self.gone(ev.cid, ev.reason or "gone")
            elif ev.kind == "uns" and ev.topic is not None:
                await self.unsubscribed(ev.cid, ev.topic)

    async def serve(self) -> None:
        async for msg in self.client:
            if msg.cmd == "REQ" and msg.target.startswith("chat."):
                self.spawn(msg)
            elif msg.is_error:
                print(f"chat: server error: {msg.text}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------- the page over HTTP


async def page_server(mm_url: str, addr: str) -> asyncio.Server:
    """Serve index.html (naming ``mm_url`` as the server), chat.js and middleman.js."""
    index = (HERE / "index.html").read_text("utf-8")
    index = index.replace(PAGE_DEFAULT_URL, f'content="{html.escape(mm_url)}"', 1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target = head.decode("latin-1").split(" ", 2)[:2]
            path = target.split("?", 1)[0]
            found = PAGE_FILES.get(path)
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif found is None:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            else:
                file, ctype = found
                body = index.encode() if file.name == "index.html" else file.read_bytes()
                status = "200 OK"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            OSError,
        ):
            pass
        finally:
            writer.close()

    host, port = split_addr(addr)
    return await asyncio.start_server(handle, host, port)


def split_addr(addr: str) -> Tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def main() -> None:
    url = os.environ.get("MM_URL", "ws://127.0.0.1:8765/")
    key = os.environ.get("MM_KEY")
    if not key:
        sys.exit("chat: set MM_KEY to a service key")

    client = await middleman_client.connect(url, key)
    chat = Chat(client)
    for name in ("chat.join", "chat.leave", "chat.members"):
        await client.enable_req(name)
    # Subscribed before the service says it is ready: no departure goes unseen.
    watcher = asyncio.ensure_future(chat.watch(await client.events("disconnect", "uns")))

    http: Optional[asyncio.Server] = None
    http_addr = os.environ.get("CHAT_HTTP", "127.0.0.1:8766")
    if http_addr != "off":
        http = await page_server(url, http_addr)
        host, port = http.sockets[0].getsockname()[:2]
        print(
            f"chat: page at http://{host}:{port}/ (add ?key=<client key>)",
            file=sys.stderr,
            flush=True,
        )
    print(f"chat: ready on {url} as {client.cid}", file=sys.stderr, flush=True)
    try:
        await asyncio.gather(chat.serve(), watcher)
    finally:
        if http is not None:
            http.close()
        await client.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
