"""middleman_client: a Python client for middleman servers (protocol version 1 and 1.1).

::

    import middleman_client

    client = await middleman_client.connect(
        ["ws://127.0.0.1:8765/", "ws://127.0.0.1:8766/"], key)   # fails over, reconnects
    news = await client.subscribe("news")
    await client.publish("news", "hello", headers=[("X-Lang", "en")])
    res = await client.request("time", timeout=5)       # a Message, or ServerError / TimeoutError
    async for msg in news:                              # the topic's messages, in order
        print(msg.target, msg.headers, msg.body)
    async for msg in client:                            # everything no subscription claims
        print(msg.cmd, msg.target, msg.headers, msg.body)

Services also grant rights to single connections, subscribe and kick them, ask who is
subscribed and follow connection events (protocol 1.1)::

    await svc.grant_sub(cid, "room:42")                 # revoke_sub, grant_pub, grant_req...
    await svc.subscribe_for(cid, "room:42")             # unsubscribe_for
    p = await svc.presence("room:42")                   # Presence(count, users, members...)
    async for ev in await svc.events("disconnect"):     # Event(kind, cid, uid, role, ...)
        print(ev.cid, ev.reason)
    await svc.kick(cid, "bye")                          # the client sees Kicked (close 4000)

See ``Service`` for writing services, and ``middleman_client.sync`` for a blocking API.
"""

from .client import (
    KICK_CODE,
    AuthError,
    BadKey,
    BadRequest,
    BufferFull,
    Client,
    ConnectionLost,
    EventSubscription,
    HeadersLike,
    Kicked,
    NoResponders,
    NotPermitted,
    RequestTimedOut,
    ResponderDisconnected,
    ServerError,
    Subscription,
    TooManyGrants,
    TooManyRequests,
    connect,
)
from .protocol import Headers, Message, ProtocolError, decode, encode
from .service import Service
from .system import EVENT_TOPICS, Event, Member, Presence, parse_event, parse_presence

__version__ = "0.3.0"

__all__ = [
    "EVENT_TOPICS",
    "KICK_CODE",
    "AuthError",
    "BadKey",
    "BadRequest",
    "BufferFull",
    "Client",
    "ConnectionLost",
    "Event",
    "EventSubscription",
    "Headers",
    "HeadersLike",
    "Kicked",
    "Member",
    "Message",
    "NoResponders",
    "NotPermitted",
    "Presence",
    "ProtocolError",
    "RequestTimedOut",
    "ResponderDisconnected",
    "ServerError",
    "Service",
    "Subscription",
    "TooManyGrants",
    "TooManyRequests",
    "connect",
    "decode",
    "encode",
    "parse_event",
    "parse_presence",
    "__version__",
]
