"""The middleman message format (docs/protocol.md section 2): encoding and decoding.

Pure functions without I/O, so they can be used (and tested) on their own::

    CMD SP TARGET CRLF
    Name: value CRLF        (zero or more header lines)
    CRLF
    body line CRLF          (a line starting with "." is sent as "..")
    . CRLF

Decoding accepts LF alone wherever CRLF is shown; encoding always writes CRLF for the
first line, the header lines, the blank line and the terminator. Line breaks inside a
body are kept exactly as given (LF stays LF, CRLF stays CRLF).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple, Union

__all__ = [
    "Message",
    "Headers",
    "Body",
    "ProtocolError",
    "encode",
    "decode",
    "check_target",
]

#: Header pairs as given: ``[("Name", "value"), ...]``, order and spelling kept.
Headers = List[Tuple[str, str]]
#: A body: bytes as they are, or text (sent as UTF-8).
Body = Union[bytes, bytearray, memoryview, str]

MAX_TARGET = 255
_CMD = re.compile(rb"[A-Za-z]{1,16}\Z")
# RFC 9110 tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_BAD = re.compile(r"[\x00-\x1f\x7f]")


class ProtocolError(ValueError):
    """A message that cannot be encoded, or bytes from the server that do not decode."""


def _text(b: bytes) -> str:
    # Lossless: bytes that are not UTF-8 survive a round trip through surrogateescape.
    return b.decode("utf-8", "surrogateescape")


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


@dataclass
class Message:
    """One protocol message.

    ``headers`` holds every header line in the order and spelling it arrived in (or is
    to be sent in); ``body`` is bytes, dot-unstuffed, line breaks as sent.
    """

    cmd: str
    target: str
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The value of the first header called ``name`` (case-insensitive)."""
        want = name.lower()
        for n, v in self.headers:
            if n.lower() == want:
                return v
        return default

    @property
    def text(self) -> str:
        """The body as UTF-8 text (invalid bytes replaced)."""
        return self.body.decode("utf-8", "replace")

    @property
    def cid(self) -> Optional[str]:
        """The sender's connection id, as set by the server."""
        return self.header("cid")

    @property
    def uid(self) -> Optional[str]:
        """The sender's user id, as set by the server (empty when none was set)."""
        return self.header("uid")

    @property
    def is_error(self) -> bool:
        """Whether this is the server's error message (``PUB ERROR``, section 7)."""
        return self.cmd == "PUB" and self.target == "ERROR"


def check_target(target: str) -> None:
    """Raise ProtocolError unless ``target`` can be sent as a TARGET."""
    if not isinstance(target, str):
        raise ProtocolError(f"target must be a str, not {type(target).__name__}")
    raw = _bytes(target)
    if (
        not raw
        or len(raw) > MAX_TARGET
        or _TARGET_BAD.search(target)
        or target.strip(" \t") != target
    ):
        raise ProtocolError(f"invalid target {target!r}")


def _check_headers(headers: Optional[Iterable[Tuple[str, str]]]) -> Headers:
    out: Headers = []
    for pair in headers or ():
        name, value = pair
        name, value = str(name), str(value)
        if not _TOKEN.match(name):
            raise ProtocolError(f"invalid header name {name!r}")
        if _VALUE_BAD.search(value):
            raise ProtocolError(f"header {name} holds a control character")
        out.append((name, value))
    return out


def _as_bytes(body: Optional[Body]) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def _stuff(body: bytes) -> bytes:
    """Dot-stuff: every line of the body that starts with "." gets another one."""
    if b"." not in body:
        return body
    lines = body.split(b"\n")
    return b"\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


def encode(
    cmd: str,
    target: str,
    headers: Optional[Iterable[Tuple[str, str]]] = None,
    body: Optional[Body] = None,
) -> bytes:
    """Encode one protocol message (CRLF line ends, body dot-stuffed)."""
    cmd_b = _bytes(cmd)
    if not _CMD.match(cmd_b):
        raise ProtocolError(f"invalid command {cmd!r}")
    check_target(target)
    parts = [cmd_b, b" ", _bytes(target), b"\r\n"]
    for name, value in _check_headers(headers):
        parts += [_bytes(name), b": ", _bytes(value), b"\r\n"]
    parts += [b"\r\n", _stuff(_as_bytes(body)), b"\r\n.\r\n"]
    return b"".join(parts)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def decode(data: Union[bytes, str]) -> List[Message]:
    """Decode every protocol message in ``data`` (one WebSocket message's payload).

    Raises ProtocolError on bytes that are not complete, well-formed messages.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    # Only LF ends a line (a CR before it belongs to the line break).
    lines = data.split(b"\n")
    raw = [ln + b"\n" for ln in lines[:-1]]
    if lines[-1]:
        raw.append(lines[-1])  # the last line has no line break: incomplete
    out: List[Message] = []
    i = 0
    n = len(raw)

    def take() -> Tuple[bytes, bytes]:
        nonlocal i
        if i >= n or not raw[i].endswith(b"\n"):
            raise ProtocolError("incomplete message")
        r = raw[i]
        i += 1
        return r, _strip_eol(r)

    while i < n:
        _, first = take()
        if not first:
            continue  # empty lines between messages
        cmd_b, sp, target_b = first.partition(b" ")
        if not sp or not _CMD.match(cmd_b):
            raise ProtocolError(f"unparsable first line {first!r}")
        target = _text(target_b.strip(b" \t"))
        headers: Headers = []
        ended = False
        while True:
            _, line = take()
            if not line:
                break
            if line == b".":
                ended = True
                break
            name, colon, value = line.partition(b":")
            if not colon:
                raise ProtocolError(f"header line without ':': {line!r}")
            headers.append((_text(name.strip(b" \t")), _text(value.strip(b" \t"))))
        body = b""
        if not ended:
            parts = []
            while True:
                r, line = take()
                if line == b".":
                    break
                parts.append(r[1:] if r.startswith(b"..") else r)
            body = _strip_eol(b"".join(parts))
        out.append(Message(_text(cmd_b), target, headers, body))
    return out
