"""An echo service: the original middleman's echo example, ported to middleman_client.

* ``REQ echo`` is answered with the request's own body and headers (the server's ``cid``,
  ``uid``, ``rid`` and the requester's ``ReqID`` left out), so any client can check a
  round trip: ``mm.request("echo", "hi", { headers: { A: "1" } })`` in the browser client,
  or ``middleman req echo hi`` from the command line;
* as in the original, clients may publish to ``Hello`` (EPUB) and each such message is
  printed, its body shown as JSON when it is JSON.

Run::

    MM_KEY=<service key> python examples/echo.py

Environment: ``MM_URL`` (default ``ws://127.0.0.1:8765/``), ``MM_KEY`` (a service key).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import middleman_client
from middleman_client import Message, Service

SERVER_SET = {"cid", "uid", "rid", "reqid"}


async def main() -> None:
    url = os.environ.get("MM_URL", "ws://127.0.0.1:8765/")
    key = os.environ.get("MM_KEY")
    if not key:
        sys.exit("echo: set MM_KEY to a service key")
    client = await middleman_client.connect(url, key, reconnect=True)
    service = Service(client)
    await client.enable_pub("Hello")

    @service.responder("echo")
    def echo(req: Message):
        return [(n, v) for n, v in req.headers if n.lower() not in SERVER_SET], req.body

    @service.subscriber("Hello")
    def hello(msg: Message) -> None:
        try:
            body = json.loads(msg.body) if msg.body else None
        except ValueError:
            body = msg.text
        print("Hello", dict(msg.headers), body, flush=True)

    print("echo: answering REQ echo; printing PUB Hello", file=sys.stderr, flush=True)
    await service.run()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
