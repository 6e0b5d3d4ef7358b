"""The real middleman binary, started per test on 127.0.0.1 with an ephemeral port.

The binary is $MIDDLEMAN_BIN, else target/release/middleman of this checkout
(`cargo build --release`). A missing binary fails the tests; it never skips them.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("MIDDLEMAN_BIN") or ROOT / "target" / "release" / "middleman")

SERVICE_KEY = "py-svc-5d1f0c2a"
CLIENT_KEY = "py-cli-8e3b7a94"
#: Longest any test waits for one expected event.
WAIT = 10.0


class Server:
    """One middleman process; ``url`` is its WebSocket address."""

    def __init__(self, *extra: str, port: int = 0) -> None:
        if not BIN.is_file():
            raise RuntimeError(f"{BIN} not found: run `cargo build --release` (or set MIDDLEMAN_BIN)")
        self.extra = extra
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [
                str(BIN),
                "--listen",
                f"127.0.0.1:{port}",
                "--service-key",
                SERVICE_KEY,
                "--client-key",
                CLIENT_KEY,
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.wait_line("listening on ws://")
        m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))
        self.url = f"ws://127.0.0.1:{self.port}/"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, needle: str) -> str:
        deadline = time.monotonic() + WAIT
        with self._cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"no line with {needle!r} from middleman: {self.lines}")
                self._cond.wait(left)

    def stop(self) -> int:
        """SIGTERM (this process, by its PID) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL (this process, by its PID): the server dies without closing anything."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)

    def restart(self) -> "Server":
        """Stop, then start a new server on the same port with the same options."""
        assert self.stop() == 0
        return Server(*self.extra, port=self.port)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def make_server():
    started: List[Server] = []

    def make(*extra: str, port: int = 0) -> Server:
        s = Server(*extra, port=port)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def run(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop, bounded in time."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


async def next_msg(client: Any, timeout: Optional[float] = WAIT) -> Any:
    return await asyncio.wait_for(client.recv(), timeout)
