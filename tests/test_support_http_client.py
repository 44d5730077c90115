"""The shared HTTP/1.1 test client (tests/support/http_client.py), against real servers.

Two servers on 127.0.0.1, port 0: hypercorn with a small ASGI app (what the project's servers
run on), and a scripted trio server that sends exact bytes, in pieces as small as one byte, and
keeps its socket open after answering (so a client that waited for EOF would hang).
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tests.support.http_client import (
    MAX_HEAD,
    HttpError,
    SseEvent,
    connect,
    parse_response_head,
    request,
    request_head,
)
from tests.support.listener import LOOPBACK, LoopbackServer
from tests.support.system import skip_missing

Address = tuple[str, int]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Seconds any one test may take: every wait here is on loopback.
TIMEOUT = 10.0
#: The events the ASGI app's ``/events`` sends, each as its own chunk.
EVENTS = (
    b"retry: 1000\n\n",
    b'event: message\ndata: {"seq": 0}\n\n',
    b": a comment\r\ndata: two\r\ndata: lines\r\n\r\n",
)


# -- the hypercorn server --------------------------------------------------------------


async def _read_request_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


async def _respond(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /json``: the request's method, path, Host and Cookie as JSON (Content-Length);
    ``POST /echo``: the request body back; ``GET /events``: :data:`EVENTS` chunked."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = {name.decode(): value.decode() for name, value in scope["headers"]}
    if scope["path"] == "/json":
        document = {
            "method": scope["method"],
            "path": scope["path"],
            "host": headers.get("host"),
            "cookie": headers.get("cookie"),
        }
        body = json.dumps(document).encode()
        length = str(len(body)).encode()
        await _respond(
            send, 200, body, [(b"content-type", b"application/json"), (b"content-length", length)]
        )
    elif scope["path"] == "/echo":
        body = await _read_request_body(receive)
        await _respond(send, 200, body, [(b"content-length", str(len(body)).encode())])
    elif scope["path"] == "/events":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for event in EVENTS:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        await _respond(send, 404, b"", [(b"content-length", b"0")])


@asynccontextmanager
async def hypercorn_server() -> AsyncIterator[Address]:
    config = Config()
    config.bind = [f"{LOOPBACK}:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, asgi_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        )
        try:
            yield (LOOPBACK, int(binds[0].rsplit(":", 1)[1]))
        finally:
            stop.set()


# -- the scripted server ---------------------------------------------------------------


class ScriptedServer(LoopbackServer):
    """Reads each request head (and its Content-Length body), then sends the next scripted
    answer piece by piece; the socket stays open afterwards unless ``close_after`` is set."""

    def __init__(
        self,
        answers: Sequence[Sequence[bytes]],
        *,
        close_after: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__()
        self.answers = list(answers)
        self.close_after = close_after
        self.tls = tls
        self.requests: list[bytes] = []

    async def _handle(self, stream: trio.SocketStream) -> None:
        transport: trio.abc.Stream = stream
        if self.tls is not None:
            transport = trio.SSLStream(stream, self.tls, server_side=True)
        try:
            await self._answer(transport)
        except trio.BrokenResourceError:
            pass  # a client that refused the certificate, or went away early
        finally:
            await trio.aclose_forcefully(transport)

    async def _answer(self, transport: trio.abc.Stream) -> None:
        buffer = bytearray()
        for answer in self.answers:
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                data = await transport.receive_some(65536)
                if not data:
                    return
                buffer += data
            head = bytes(buffer[: end + 4])
            del buffer[: end + 4]
            self.requests.append(head)
            for piece in answer:
                await transport.send_all(piece)
                await trio.lowlevel.checkpoint()
        if not self.close_after:
            await trio.sleep_forever()


@asynccontextmanager
async def scripted(
    *answers: Sequence[bytes], close_after: bool = False, tls: ssl.SSLContext | None = None
) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(answers, close_after=close_after, tls=tls)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- against hypercorn ------------------------------------------------------------------


async def test_keep_alive_requests_with_cookie_and_host() -> None:
    with trio.fail_after(TIMEOUT):
        async with hypercorn_server() as address:
            connection = await connect(address, cookie="session=abc")
            async with connection:
                first = await connection.request("GET", "/json")
                second = await connection.request("GET", "/json")
            assert first.status == second.status == 200
            assert first.header("Content-Type") == "application/json"
            assert first.json() == {
                "method": "GET",
                "path": "/json",
                "host": f"{address[0]}:{address[1]}",
                "cookie": "session=abc",
            }
            assert second.body == first.body


async def test_one_shot_request_with_connection_close() -> None:
    with trio.fail_after(TIMEOUT):
        async with hypercorn_server() as address:
            response = await request(address, "POST", "/echo", body=b"x" * 100_000)
            assert response.status == 200
            assert response.body == b"x" * 100_000
            missing = await request(address, "GET", "/nowhere")
            assert (missing.status, missing.body) == (404, b"")


async def test_streamed_upload_and_bounded_pieces_of_the_answer() -> None:
    size = 3 * 1024 * 1024 + 17
    with trio.fail_after(TIMEOUT):
        async with hypercorn_server() as address:
            connection = await connect(address)
            async with connection:
                await connection.send_request("POST", "/echo", content_length=size)
                piece = bytes(range(256)) * 4096
                sent = 0
                while sent < size:
                    step = min(len(piece), size - sent)
                    await connection.send_body(piece[:step])
                    sent += step
                head = await connection.read_head()
                assert head.status == 200
                assert head.header("content-length") == str(size)
                received = 0
                while chunk := await connection.receive_body(100_000):
                    assert len(chunk) <= 100_000
                    assert chunk[0] == received % 256
                    received += len(chunk)
                assert received == size
                assert await connection.receive_body() == b""
                again = await connection.request("GET", "/json")
                assert again.status == 200


async def test_event_stream_lines_and_events() -> None:
    with trio.fail_after(TIMEOUT):
        async with hypercorn_server() as address:
            connection = await connect(address)
            async with connection:
                await connection.send_request("GET", "/events")
                head = await connection.read_head()
                assert head.header("transfer-encoding") == "chunked"
                assert await connection.read_line() == b"retry: 1000"
                assert await connection.read_line() == b""
                assert await connection.read_sse_event() == SseEvent(
                    event="message", data='{"seq": 0}'
                )
                last = await connection.read_sse_event()
                assert last == SseEvent(data="two\nlines", comments=("a comment",))
                assert await connection.read_sse_event() is None
                assert await connection.read_line() is None
                assert (await connection.request("GET", "/json")).status == 200


def _blocking_exchange(address: Address) -> tuple[int, bytes]:
    """One GET on a blocking socket, with the module's head helpers and nothing else."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        host = f"{address[0]}:{address[1]}"
        sock.sendall(request_head("GET", "/json", host=host, cookie="a=b", close=True))
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            assert data, "closed before the response head"
            buffer += data
        raw, _, body = buffer.partition(b"\r\n\r\n")
        head = parse_response_head(raw)
        length = int(head.header("content-length") or 0)
        while len(body) < length:
            body += sock.recv(65536)
        return head.status, body


async def test_head_helpers_on_a_blocking_socket() -> None:
    with trio.fail_after(TIMEOUT):
        async with hypercorn_server() as address:
            status, body = await trio.to_thread.run_sync(_blocking_exchange, address)
    assert status == 200
    assert json.loads(body)["cookie"] == "a=b"


# -- against the scripted server --------------------------------------------------------


async def test_answer_read_by_length_while_the_server_keeps_the_socket_open() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    with trio.fail_after(TIMEOUT):
        async with scripted([answer]) as server:
            response = await request(server.address, "GET", "/x")
    assert (response.status, response.reason, response.body) == (200, "OK", b"hello")
    assert server.requests[0].startswith(b"GET /x HTTP/1.1\r\n")
    assert b"\r\nConnection: close\r\n" in server.requests[0]


async def test_chunked_byte_by_byte_with_extensions_and_trailers_then_next_response() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nTrailer: yes\r\n\r\n"
    )
    after = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
    with trio.fail_after(TIMEOUT):
        async with scripted([*bytewise(chunked), after], [after]) as server:
            connection = await connect(server.address)
            async with connection:
                first = await connection.request("GET", "/a")
                # The second answer came in the same read as the end of the first: it stays
                # for the next request.
                second = await connection.request("GET", "/b")
    assert first.body == b"hello" + b"z" * 26
    assert (second.status, second.body) == (201, b"ok")


async def test_interim_answers_skipped_and_bodiless_answers() -> None:
    answers = [
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"],
        [b"HTTP/1.1 204 No Content\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"],
    ]
    with trio.fail_after(TIMEOUT):
        async with scripted(*answers) as server:
            connection = await connect(server.address)
            async with connection:
                assert (await connection.request("POST", "/a", body=b"")).body == b"hi"
                assert (await connection.request("DELETE", "/b")).status == 204
                head_only = await connection.request("HEAD", "/c")
    assert (head_only.status, head_only.body) == (200, b"")
    assert b"Content-Length: 0" in server.requests[0]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\nbody until EOF", "neither Content-Length nor chunked"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "end of the connection"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "5 bytes of body unread"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", "a whole response head"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD, "larger than"),
    ],
)
async def test_broken_answers_raise(answer: bytes, message: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted([answer], close_after=True) as server:
            with pytest.raises(HttpError, match=message):
                await request(server.address, "GET", "/")


async def test_body_limit() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
    with trio.fail_after(TIMEOUT):
        async with scripted([answer]) as server:
            with pytest.raises(HttpError, match="larger than 4 bytes"):
                await request(server.address, "GET", "/", limit=4)


# -- TLS -------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_missing("openssl, to make a test certificate", "apt-get install openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec"),
            *("-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_tls_verified_against_the_given_ca(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret"
    with trio.fail_after(TIMEOUT):
        async with scripted([answer], [answer], tls=server_context) as server:
            response = await request(server.address, "GET", "/", ssl_context=trusting)
            assert response.body == b"secret"
            with pytest.raises(trio.BrokenResourceError):
                await request(server.address, "GET", "/", ssl_context=ssl.create_default_context())
