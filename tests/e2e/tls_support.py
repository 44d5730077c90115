"""Helpers for running the relay behind a real TLS terminator (nginx) in tests.

- :func:`make_certificates`: a private CA and a server certificate for ``localhost`` and
  ``127.0.0.1``, made with the ``openssl`` command line.
- :func:`render_template`: the deployment examples of ``docs/deploy/`` with their
  ``{{PLACEHOLDER}}`` values filled in (every placeholder must be given, every value used).
- :func:`start_nginx`: ``docs/deploy/nginx.conf`` itself, included into a minimal main config
  that keeps every path inside a temporary directory, run in the foreground
  (:func:`find_nginx` finds the executable, also outside a user's PATH).
- :func:`https_request`, :func:`open_https_stream` and :func:`open_wss`: HTTPS and WebSocket
  clients that trust only the test CA, optionally from another loopback source address (the
  clients of :mod:`tests.support.clients` over TLS).
- :class:`RecordingServer`: an HTTP/1.1 server on loopback that answers every request with a
  JSON description of what it received (method, target, headers, body size), or with an
  event stream whose second event waits for the test.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
from trio_websocket import WebSocketConnection

from tests.support.clients import (
    Address,
    HttpResponse,
    HttpStream,
    json_request,
    open_http_stream_on,
    read_response,
)
from tests.support.listener import LoopbackServer
from tests.support.processes import LOOPBACK, ChildProcess
from tests.support.websocket import open_client_websocket

#: The deployment examples shipped with the project.
DEPLOY_DIR = Path(__file__).resolve().parents[2] / "docs" / "deploy"
#: The nginx server block the deployment guide tells users to install.
NGINX_SITE = DEPLOY_DIR / "nginx.conf"
#: The host name the test certificate is issued for (and the client verifies).
TLS_HOST = "localhost"
#: Seconds ``openssl`` or ``nginx -t`` may take.
TOOL_TIMEOUT = 20.0
#: Bytes read from a socket at a time.
READ_SIZE = 64 * 1024
#: Largest request the recording server reads (head and body together are far smaller,
#: except in upload tests, which stay under this).
MAX_RECORDED_BODY = 64 * 1024 * 1024
#: Largest request head the recording server accepts.
MAX_RECORDED_HEAD = 64 * 1024
#: The path for which :class:`RecordingServer` answers with an event stream, and its events.
STREAM_PATH = "/stream"
FIRST_EVENT = b"data: first\n\n"
SECOND_EVENT = b"data: second\n\n"


# -- certificates -------------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = placeholder

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@attrs.frozen(kw_only=True)
class TlsFiles:
    """PEM files: the CA certificate clients trust, and the server's certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path


async def _run_tool(argv: Sequence[str], *, cwd: Path) -> None:
    """Run a command line tool; raise AssertionError with its stderr if it fails."""
    with trio.fail_after(TOOL_TIMEOUT):
        result = await trio.run_process(
            list(argv), cwd=cwd, check=False, capture_stdout=True, capture_stderr=True
        )
    if result.returncode != 0:
        raise AssertionError(
            f"{argv[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
        )


def _write_openssl_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    return config


async def make_certificates(directory: Path) -> TlsFiles:
    """A private CA (``ca.pem``) and a certificate it signed for ``localhost`` and
    ``127.0.0.1`` (``server.pem``, ``server.key``), valid for two days, in ``directory``."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is not installed"
    config = str(_write_openssl_config(directory))
    request = [openssl, "req", "-config", config, "-nodes", "-newkey", "ec"]
    request += ["-pkeyopt", "ec_paramgen_curve:P-256"]
    ca_files = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]
    await _run_tool(
        [*request, "-x509", "-extensions", "ca_ext", *ca_files, "-subj", "/CN=Repowire test CA"],
        cwd=directory,
    )
    server_files = ["-keyout", "server.key", "-out", "server.csr"]
    await _run_tool([*request, "-new", *server_files, "-subj", f"/CN={TLS_HOST}"], cwd=directory)
    sign = [openssl, "x509", "-req", "-in", "server.csr", "-out", "server.pem", "-days", "2"]
    sign += ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-CAserial", "ca.srl"]
    sign += ["-extfile", config, "-extensions", "server_ext"]
    await _run_tool(sign, cwd=directory)
    return TlsFiles(
        ca_cert=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
    )


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A TLS client context that trusts only ``ca_file`` (no system roots) and speaks
    HTTP/1.1."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["http/1.1"])
    return context


# -- the deployment examples --------------------------------------------------------------

#: Characters a value substituted into a config file may not hold (they would change its
#: syntax rather than fill in a value).
_UNSAFE_IN_VALUE = frozenset(" \t\r\n;{}\"'$#")


def render_template(text: str, values: Mapping[str, str]) -> str:
    """``text`` with every ``{{NAME}}`` replaced by ``values[NAME]``.

    Raises ValueError when a placeholder has no value, a value names no placeholder, or a
    value holds a character that would change the file's syntax.
    """
    rendered = text
    for name, value in values.items():
        marker = "{{" + name + "}}"
        if marker not in rendered:
            raise ValueError(f"the template has no placeholder {marker}")
        if not value or any(char in _UNSAFE_IN_VALUE for char in value):
            raise ValueError(f"unsafe value for {marker}: {value!r}")
        rendered = rendered.replace(marker, value)
    if "{{" in rendered or "}}" in rendered:
        start = rendered.find("{{")
        raise ValueError(f"a placeholder has no value: {rendered[start : start + 40]!r}")
    return rendered


@attrs.frozen(kw_only=True)
class NginxSite:
    """Values for the placeholders of ``docs/deploy/nginx.conf``."""

    https_port: int
    http_port: int
    relay_port: int
    tls: TlsFiles
    log_dir: Path

    def values(self) -> dict[str, str]:
        return {
            "SERVER_NAME": TLS_HOST,
            "LISTEN": f"{LOOPBACK}:{self.https_port}",
            "HTTP_LISTEN": f"{LOOPBACK}:{self.http_port}",
            "CERT": str(self.tls.cert),
            "KEY": str(self.tls.key),
            "RELAY_PORT": str(self.relay_port),
            "LOG_DIR": str(self.log_dir),
        }


def nginx_main_config(directory: Path, site: Path) -> str:
    """A main nginx config for an unprivileged test instance: one process (no master, so it
    runs as the current user and dies whole), every path inside ``directory``, and the
    rendered ``site`` included in the ``http`` block exactly as a distribution's
    ``conf.d/`` would include it."""
    temp = directory / "temp"
    lines = [
        "master_process off;",
        "worker_processes 1;",
        f"pid {directory / 'nginx.pid'};",
        "error_log stderr info;",
        "events { worker_connections 256; }",
        "http {",
        f"    client_body_temp_path {temp / 'body'};",
        f"    proxy_temp_path {temp / 'proxy'};",
        f"    fastcgi_temp_path {temp / 'fastcgi'};",
        f"    uwsgi_temp_path {temp / 'uwsgi'};",
        f"    scgi_temp_path {temp / 'scgi'};",
        f"    include {site};",
        "}",
    ]
    return "\n".join(lines) + "\n"


@attrs.define(kw_only=True)
class RunningNginx:
    process: ChildProcess
    site: NginxSite
    directory: Path

    @property
    def https_port(self) -> int:
        return self.site.https_port

    @property
    def origin(self) -> str:
        """The browser-visible origin, ``https://localhost:PORT``."""
        return f"https://{TLS_HOST}:{self.site.https_port}"

    @property
    def wss_url(self) -> str:
        return f"wss://{TLS_HOST}:{self.site.https_port}"

    def access_log(self) -> str:
        path = self.site.log_dir / "repowire-relay.access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def stop(self) -> None:
        await self.process.terminate()


def find_nginx() -> str | None:
    """The nginx executable: on PATH, or in the sbin directories a user's PATH may lack."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which("nginx", path=search)


def _prepare_nginx(directory: Path, site: NginxSite) -> Path:
    """Write the rendered site and the main config into ``directory``; the main config's
    path."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "temp" / name).mkdir(parents=True, exist_ok=True)
    site.log_dir.mkdir(parents=True, exist_ok=True)
    site_file = directory / "repowire-relay.conf"
    site_file.write_text(render_template(NGINX_SITE.read_text(), site.values()))
    main_file = directory / "nginx.conf"
    main_file.write_text(nginx_main_config(directory, site_file))
    return main_file


async def start_nginx(directory: Path, site: NginxSite) -> RunningNginx:
    """Render ``docs/deploy/nginx.conf`` for ``site``, check the whole config with
    ``nginx -t``, start nginx in the foreground and return once it accepts connections.

    The caller stops it (:meth:`RunningNginx.stop`) and bounds the time.
    """
    nginx = find_nginx()
    assert nginx is not None, "nginx is not installed"
    main_file = _prepare_nginx(directory, site)
    base = [nginx, "-e", "stderr", "-p", str(directory), "-c", str(main_file)]
    await _run_tool([*base, "-t", "-q"], cwd=directory)

    stdout = directory / "nginx.stdout"
    stderr = directory / "nginx.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [*base, "-g", "daemon off;"],
            cwd=directory,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    running = RunningNginx(
        process=ChildProcess(process, stdout, stderr), site=site, directory=directory
    )
    try:
        await _wait_listening(running.process, (LOOPBACK, site.https_port))
    except BaseException:
        with trio.CancelScope(shield=True):
            await running.stop()
        raise
    return running


async def _wait_listening(process: ChildProcess, address: Address) -> None:
    """Return once ``address`` accepts a connection (the caller bounds the wait)."""
    while True:
        if process.process.poll() is not None:
            raise AssertionError(
                f"exited ({process.process.returncode}) before listening on {address}; "
                f"stderr: {process.stderr()[-2000:]}"
            )
        try:
            stream = await trio.open_tcp_stream(*address)
        except OSError:
            await trio.sleep(0.02)
            continue
        await stream.aclose()
        return


# -- clients ------------------------------------------------------------------------------


async def connect_tls(
    port: int, ca_file: Path, *, local_address: str | None = None
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to 127.0.0.1:``port`` that verifies the server as ``localhost``
    against ``ca_file`` only; ``local_address`` picks the loopback source address."""
    tcp = await trio.open_tcp_stream(LOOPBACK, port, local_address=local_address)
    stream = trio.SSLStream(
        tcp, client_context(ca_file), server_hostname=TLS_HOST, https_compatible=True
    )
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


@asynccontextmanager
async def open_https_stream(
    port: int,
    ca_file: Path,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    local_address: str | None = None,
) -> AsyncIterator[HttpStream]:
    """Send one request over HTTPS and yield the response once its head arrived; its body is
    read with :meth:`HttpStream.read_chunk` (an SSE stream, say). The connection is closed on
    exit."""
    stream = await connect_tls(port, ca_file, local_address=local_address)
    async with (
        stream,
        open_http_stream_on(
            stream, f"{TLS_HOST}:{port}", method, path, body=body, headers=headers
        ) as response,
    ):
        yield response


async def https_request(
    port: int,
    ca_file: Path,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    json_body: object = None,
    local_address: str | None = None,
) -> HttpResponse:
    """One request over HTTPS, the whole response. ``json_body`` sets the body and its type."""
    body, sent = json_request(body, json_body, headers)
    async with open_https_stream(
        port, ca_file, method, path, headers=sent, body=body, local_address=local_address
    ) as response:
        return await read_response(response)


@asynccontextmanager
async def open_wss(
    port: int,
    ca_file: Path,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    message_queue_size: int = 4,
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket over TLS to ``localhost:port``, with extra request ``headers`` (Origin,
    Cookie). A refused upgrade raises ``trio_websocket.ConnectionRejected``."""
    stream = await connect_tls(port, ca_file)
    async with open_client_websocket(
        stream,
        path,
        host=f"{TLS_HOST}:{port}",
        headers=[(k.encode(), v.encode()) for k, v in headers],
        message_queue_size=message_queue_size,
    ) as ws:
        yield ws


# -- a server that says what it received --------------------------------------------------


@attrs.frozen(kw_only=True)
class RecordedRequest:
    method: str
    target: str
    http_version: str
    #: Header names lower-case, in the order received.
    headers: list[tuple[str, str]]
    body_bytes: int

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "http_version": self.http_version,
            "headers": [list(pair) for pair in self.headers],
            "body_bytes": self.body_bytes,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RecordedRequest:
        return cls(
            method=document["method"],
            target=document["target"],
            http_version=document["http_version"],
            headers=[(str(k), str(v)) for k, v in document["headers"]],
            body_bytes=int(document["body_bytes"]),
        )


class RecordingServer(LoopbackServer):
    """An HTTP/1.1 server on 127.0.0.1 that answers each request ``200`` with the JSON of
    :meth:`RecordedRequest.to_json` (one request per connection) and keeps the list in
    ``requests``. Start it with ``await nursery.start(server.serve)``.

    A request for :data:`STREAM_PATH` gets an event stream instead: its head and a first event
    at once, a second event only once :meth:`release_stream` was called, then the end. It
    carries no ``X-Accel-Buffering`` header, so whatever buffering a proxy does shows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[RecordedRequest] = []
        self._release = trio.Event()

    def release_stream(self) -> None:
        """Let event streams send their second event and end."""
        self._release.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_RECORDED_HEAD)
            request: h11.Request | None = None
            body_bytes = 0
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(READ_SIZE))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body_bytes += len(event.data)
                        if body_bytes > MAX_RECORDED_BODY:
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:  # the client left before a whole request
                        return
            except (h11.RemoteProtocolError, trio.BrokenResourceError):
                return
            assert request is not None
            recorded = RecordedRequest(
                method=request.method.decode("ascii"),
                target=request.target.decode("latin-1"),
                http_version=request.http_version.decode("ascii"),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers],
                body_bytes=body_bytes,
            )
            self.requests.append(recorded)
            if recorded.target == STREAM_PATH:
                await self._stream_events(stream, conn)
                return
            body = json.dumps(recorded.to_json()).encode()
            response = h11.Response(
                status_code=200,
                headers=[
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ],
            )
            try:
                await stream.send_all(
                    (conn.send(response) or b"")
                    + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
            except trio.BrokenResourceError:
                return

    async def _stream_events(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        head = h11.Response(
            status_code=200,
            headers=[("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")],
        )
        try:
            await stream.send_all(
                (conn.send(head) or b"") + (conn.send(h11.Data(data=FIRST_EVENT)) or b"")
            )
            await self._release.wait()
            await stream.send_all(
                (conn.send(h11.Data(data=SECOND_EVENT)) or b"")
                + (conn.send(h11.EndOfMessage()) or b"")
            )
        except trio.BrokenResourceError:
            return
