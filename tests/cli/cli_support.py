"""Helpers for the command-line tests: a scripted HTTP server on loopback, output checks.

The command line is blocking (``urllib``), so async tests run it in a worker thread while the
fake server (trio + h11, optionally behind TLS) answers in the test's event loop.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path

import attrs
import h11
import trio

from common import KEY_PREFIX, SECRET_TEXT_LENGTH
from repowire.cli import main

#: Largest request the fake server reads; the CLI's requests are a few hundred bytes.
MAX_REQUEST_BYTES = 64 * 1024
#: Seconds any single network test may take.
NETWORK_TEST_TIMEOUT = 20

# A full key anywhere in a text: the key prefix and 43+ characters of the url-safe alphabet
# (`looks_like_key` checks a whole string; this finds one inside a text).
FULL_KEY = re.compile(re.escape(KEY_PREFIX) + rf"[A-Za-z0-9_-]{{{SECRET_TEXT_LENGTH},}}")


def assert_no_full_key(*texts: str) -> None:
    """No text contains anything shaped like a whole API key."""
    for text in texts:
        assert FULL_KEY.search(text) is None, f"a key leaked into: {text!r}"


def one_line(text: str) -> str:
    """The single line of ``text`` (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


def write_config(home: Path, text: str) -> Path:
    """Create ``home`` and write ``text`` as its config file; returns the file's path."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text)
    return path


def read_config(home: Path) -> str:
    return (home / "config.yaml").read_text()


async def run_cli(argv: Sequence[str]) -> int:
    """``main(argv)`` in a worker thread, so the test's event loop keeps serving meanwhile."""
    return await trio.to_thread.run_sync(main, list(argv), abandon_on_cancel=True)


@attrs.frozen(kw_only=True)
class Recorded:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@attrs.frozen(kw_only=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    extra_headers: tuple[tuple[str, str], ...] = ()


class FakeHttpServer:
    """Answers scripted replies keyed by (method, path); records every request it gets."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.replies: dict[tuple[str, str], Reply] = {}
        self.requests: list[Recorded] = []
        self.port = 0
        self._tls = tls

    @property
    def base(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self._tls is not None else "ws"
        return f"{scheme}://127.0.0.1:{self.port}"

    def reply_json(self, method: str, path: str, status: int, document: object) -> None:
        self.replies[(method, path)] = Reply(status=status, body=json.dumps(document).encode())

    def reply_raw(self, method: str, path: str, reply: Reply) -> None:
        self.replies[(method, path)] = reply

    async def handle(self, stream: trio.abc.Stream) -> None:
        if self._tls is not None:
            stream = trio.SSLStream(stream, self._tls, server_side=True)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError:
                return  # the client refused our certificate: that is what some tests want
        try:
            await self._exchange(stream)
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        request: h11.Request | None = None
        body = b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(16384)
                connection.receive_data(bytes(data))
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                assert len(body) <= MAX_REQUEST_BYTES
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return
        assert request is not None
        path = request.target.decode().split("?", 1)[0]
        self.requests.append(
            Recorded(
                method=request.method.decode(),
                target=request.target.decode(),
                headers={name.decode(): value.decode() for name, value in request.headers},
                body=body,
            )
        )
        reply = self.replies.get(
            (request.method.decode(), path),
            Reply(status=404, body=b'{"error": "not_found", "detail": "no such route"}'),
        )
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Connection", "close"),
            *reply.extra_headers,
        ]
        await stream.send_all(
            connection.send(h11.Response(status_code=reply.status, headers=headers))
        )
        await stream.send_all(connection.send(h11.Data(data=reply.body)))
        await stream.send_all(connection.send(h11.EndOfMessage()))


@contextlib.asynccontextmanager
async def serve_fake(server: FakeHttpServer) -> AsyncIterator[FakeHttpServer]:
    """Run ``server`` on 127.0.0.1 (a free port) for the duration of the block."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


@attrs.frozen(kw_only=True)
class SelfSigned:
    cert: Path
    key: Path
