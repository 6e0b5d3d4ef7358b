"""What the server itself says (protocol version 1.1): presence answers and connection
events, decoded into typed values. Pure functions without I/O, like ``protocol``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

from .protocol import Message

__all__ = [
    "EVENT_TOPICS",
    "Event",
    "Member",
    "Presence",
    "event_topics",
    "parse_event",
    "parse_presence",
]

#: The event topics a service may subscribe to, by kind.
EVENT_TOPICS = {
    "connect": "SYS:CONNECT",
    "disconnect": "SYS:DISCONNECT",
    "sub": "SYS:SUB",
    "uns": "SYS:UNS",
}
_KINDS = {topic: kind for kind, topic in EVENT_TOPICS.items()}


def event_topics(kinds: Iterable[str]) -> Tuple[str, ...]:
    """The topics for ``kinds`` (``connect``, ``disconnect``, ``sub``, ``uns``, any case,
    or the topics themselves, ``SYS:CONNECT`` ...); all four when ``kinds`` is empty.
    Raises ValueError for anything else."""
    out: List[str] = []
    for k in kinds:
        key = str(k).lower()
        if key.startswith("sys:"):
            key = key[4:]
        topic = EVENT_TOPICS.get(key)
        if topic is None:
            raise ValueError(
                f"unknown event kind {k!r}: expected one of connect, disconnect, sub, uns"
            )
        if topic not in out:
            out.append(topic)
    return tuple(out) if out else tuple(EVENT_TOPICS.values())


@dataclass(frozen=True)
class Member:
    """One connection subscribed to a topic: its cid, and its uid (``""`` when none)."""

    cid: str
    uid: str = ""


@dataclass
class Presence:
    """The answer to :meth:`Client.presence`: ``count`` connections are subscribed to
    ``topic`` (services included), ``users`` distinct non-empty uids among them;
    ``members`` lists at most ``limit`` of them, sorted by cid. ``truncated``: there were
    more than the limit; ``partial``: a cluster node did not answer in time (the numbers
    cover the nodes that did)."""

    topic: str
    count: int
    users: int
    members: List[Member] = field(default_factory=list)
    truncated: bool = False
    partial: bool = False


@dataclass(frozen=True)
class Event:
    """One connection event (``SYS:CONNECT``, ``SYS:DISCONNECT``, ``SYS:SUB``,
    ``SYS:UNS``): ``kind`` is ``connect``, ``disconnect``, ``sub`` or ``uns``; ``cid``,
    ``uid`` (``""`` when none) and ``role`` (``service``, ``client``, ``monitor``) are
    those of the connection the event is about; ``topic`` is set for sub/uns, ``reason``
    (``normal``, ``idle``, ``kicked``, ``slow_consumer``, ...) for disconnect.
    ``message`` is the message it was decoded from."""

    kind: str
    cid: str
    uid: str
    role: str
    topic: Optional[str] = None
    reason: Optional[str] = None
    message: Optional[Message] = field(default=None, compare=False, repr=False)


def _flag(m: Message, name: str) -> bool:
    return (m.header(name) or "").strip().lower() == "true"


def _count(m: Message, name: str) -> int:
    v = m.header(name)
    try:
        return int(v) if v is not None else 0
    except ValueError:
        return 0


def parse_presence(topic: str, m: Message) -> Presence:
    """The ``RES SYS:PRESENCE`` message ``m`` as a Presence: headers ``count``, ``users``,
    ``truncated``, ``partial``; body lines ``<cid> <uid>`` or ``<cid>`` (CRLF or LF)."""
    members: List[Member] = []
    for line in m.body.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            continue
        text = line.decode("utf-8", "replace")
        cid, _, uid = text.partition(" ")
        members.append(Member(cid, uid))
    return Presence(
        topic=topic,
        count=_count(m, "count"),
        users=_count(m, "users"),
        members=members,
        truncated=_flag(m, "truncated"),
        partial=_flag(m, "partial"),
    )


def parse_event(m: Message) -> Optional[Event]:
    """``m`` as an Event if it is a ``PUB`` to one of the event topics, else None."""
    if m.cmd != "PUB":
        return None
    kind = _KINDS.get(m.target)
    if kind is None:
        return None
    return Event(
        kind=kind,
        cid=m.header("cid") or "",
        uid=m.header("uid") or "",
        role=m.header("role") or "",
        topic=m.header("topic") if kind in ("sub", "uns") else None,
        reason=m.header("reason") if kind == "disconnect" else None,
        message=m,
    )
