"""middleman_client: a Python client for middleman servers (protocol version 1).

::

    import middleman_client

    client = await middleman_client.connect("ws://127.0.0.1:8765/", key)
    await client.subscribe("news")
    await client.publish("news", "hello", headers=[("X-Lang", "en")])
    res = await client.request("time", timeout=5)       # a Message, or ServerError / TimeoutError
    async for msg in client:                            # everything else, in order
        print(msg.cmd, msg.target, msg.headers, msg.body)

See ``Service`` for writing services, and ``middleman_client.sync`` for a blocking API.
"""

from .client import (
    AuthError,
    Client,
    ConnectionLost,
    HeadersLike,
    RequestTimedOut,
    ServerError,
    connect,
)
from .protocol import Headers, Message, ProtocolError, decode, encode
from .service import Service

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Client",
    "ConnectionLost",
    "Headers",
    "HeadersLike",
    "Message",
    "ProtocolError",
    "RequestTimedOut",
    "ServerError",
    "Service",
    "connect",
    "decode",
    "encode",
    "__version__",
]
