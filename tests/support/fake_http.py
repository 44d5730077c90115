"""A scripted HTTP server on loopback (plain or behind TLS): a relay's API, a daemon's
``/health``, or a web server that is not a relay.

- :class:`FakeHttpServer` and :func:`serve_fake`: answers scripted :class:`Reply` values keyed
  by ``(method, path)`` and records every request (:class:`Recorded`).
- :func:`make_self_signed` and :class:`SelfSigned`: a self-signed certificate for 127.0.0.1
  (its own CA), made with openssl.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import attrs
import h11
import trio

from .system import skip_missing

#: Largest request the fake server reads; the requests it gets are a few hundred bytes.
MAX_REQUEST_BYTES = 64 * 1024
#: Seconds openssl may take to make a certificate.
OPENSSL_TIMEOUT = 30


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


def make_self_signed(directory: Path) -> SelfSigned:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) in ``directory``, made with
    openssl; skips the test where openssl is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_missing("openssl, to make a test certificate", "apt-get install openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    request = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    request += ["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    request += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        request,
        check=True,
        capture_output=True,
        timeout=OPENSSL_TIMEOUT,
    )
    return SelfSigned(cert=cert, key=key)


def tls_server_context(certificate: SelfSigned) -> ssl.SSLContext:
    """A server-side TLS context presenting ``certificate``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    return context
