"""middleman_client: a Python client for middleman servers (protocol version 1).

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

See ``Service`` for writing services, and ``middleman_client.sync`` for a blocking API.
"""

from .client import (
    AuthError,
    BadKey,
    BufferFull,
    Client,
    ConnectionLost,
    HeadersLike,
    NoResponders,
    NotPermitted,
    RequestTimedOut,
    ResponderDisconnected,
    ServerError,
    Subscription,
    TooManyRequests,
    connect,
)
from .protocol import Headers, Message, ProtocolError, decode, encode
from .service import Service

__version__ = "0.2.0"

__all__ = [
    "AuthError",
    "BadKey",
    "BufferFull",
    "Client",
    "ConnectionLost",
    "Headers",
    "HeadersLike",
    "Message",
    "NoResponders",
    "NotPermitted",
    "ProtocolError",
    "RequestTimedOut",
    "ResponderDisconnected",
    "ServerError",
    "Service",
    "Subscription",
    "TooManyRequests",
    "connect",
    "decode",
    "encode",
    "__version__",
]
