"""The relay behind a real TLS terminator: the shipped ``docs/deploy/nginx.conf`` in front of
``repowire relay start``, with a certificate from a private CA, and a daemon that reaches it
over ``wss://`` the way the deployment guide says (``repowire setup --relay --relay-url
wss://... --ca-file ...`` then ``repowire serve --relay``).

Every process is started as a user would start it and stopped with SIGTERM (SIGKILL after a
bounded wait). Clients trust only the test CA.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionRejected

from common import looks_like_key
from connector import Connector, ConnectorConfig, LinkState
from repowire.cli import build_parser
from repowire.config import load_settings
from tests.support.clients import Address, HttpResponse, SseReader, http_request
from tests.support.leaks import assert_no_full_key
from tests.support.processes import (
    LOOPBACK,
    ChildProcess,
    Cli,
    RelayProcess,
    free_port,
    free_ports,
    start_child,
    stop_processes,
    wait_for_relay_state,
)
from tests.support.sessions import cookie_from, form_body
from tests.support.system import needs

from .tls_support import (
    DEPLOY_DIR,
    FIRST_EVENT,
    SECOND_EVENT,
    STREAM_PATH,
    TLS_HOST,
    NginxSite,
    RecordedRequest,
    RecordingServer,
    RunningNginx,
    TlsFiles,
    find_nginx,
    https_request,
    make_certificates,
    open_https_stream,
    open_wss,
    start_nginx,
)

#: The tests that run nginx; the ones about the other deployment files run anywhere.
needs_nginx = needs(
    "nginx and openssl",
    find_nginx() is not None and shutil.which("openssl") is not None,
    "apt-get install nginx-light openssl",
)

#: Seconds to bring up certificates, the relay, nginx and the daemon.
STARTUP_TIMEOUT = 30
#: Seconds one test's checks may take once everything runs.
TEST_TIMEOUT = 20
#: Seconds to wait for the connector's first keepalive round (it pings every 5 s).
KEEPALIVE_WAIT = 15
#: A browser's address other than nginx's own: loopback has all of 127.0.0.0/8.
BROWSER_ADDRESS = "127.0.0.2"
#: An Origin that is not the relay's.
FOREIGN_ORIGIN = "https://evil.example"
#: Size of the uploads sent through the proxy: over nginx's 1 MiB default limit.
UPLOAD_SIZE = 2 * 1024 * 1024


# -- the stack ------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class ProxiedRelay:
    """A relay process behind nginx. ``cli`` runs commands with ``REPOWIRE_HOME=home``."""

    tls: TlsFiles
    nginx: RunningNginx
    relay: ChildProcess
    relay_data: Path
    cli: Cli

    @property
    def port(self) -> int:
        """nginx's HTTPS port: the only one a browser or a daemon uses."""
        return self.nginx.https_port

    @property
    def origin(self) -> str:
        return self.nginx.origin

    @property
    def ca_file(self) -> Path:
        return self.tls.ca_cert

    async def request(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        """A request through nginx over HTTPS (trusting only the test CA)."""
        return await https_request(self.port, self.ca_file, method, path, **kwargs)


@attrs.define(kw_only=True)
class ProxiedStack:
    """A daemon (``repowire serve --relay``) linked to a :class:`ProxiedRelay` over wss."""

    proxied: ProxiedRelay
    serve: ChildProcess
    daemon_address: Address
    api_key: str = attrs.field(repr=False)

    async def relay_state(self) -> Mapping[str, Any]:
        """The ``relay`` part of the daemon's ``/health`` (its connector's status)."""
        health = await http_request(self.daemon_address, "GET", "/health")
        assert health.status == 200
        relay = health.json()["relay"]
        assert isinstance(relay, dict)
        return relay


@pytest.fixture
async def proxied_relay(tmp_path: Path) -> AsyncIterator[ProxiedRelay]:
    work = tmp_path / "work"
    work.mkdir()
    cli = Cli(tmp_path / "home", work)
    https_port, http_port = free_ports(2)
    relay_data = tmp_path / "relay-data"
    with trio.fail_after(STARTUP_TIMEOUT):
        tls = await make_certificates(tmp_path / "tls")
    public = ("--public-url", f"https://{TLS_HOST}:{https_port}", "--trusted-proxy", LOOPBACK)
    children: list[ChildProcess] = []
    relay = RelayProcess(cli, relay_data, public, children=children)
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            await relay.start()
            assert relay.child is not None
            site = NginxSite(
                https_port=https_port,
                http_port=http_port,
                relay_port=relay.port,
                tls=tls,
                log_dir=tmp_path / "nginx-logs",
            )
            nginx = await start_nginx(tmp_path / "nginx", site)
            children.append(nginx.process)
        yield ProxiedRelay(tls=tls, nginx=nginx, relay=relay.child, relay_data=relay_data, cli=cli)
    finally:
        await stop_processes(children)


@pytest.fixture
async def proxied_stack(proxied_relay: ProxiedRelay) -> AsyncIterator[ProxiedStack]:
    proxied = proxied_relay
    cli = proxied.cli
    with trio.fail_after(STARTUP_TIMEOUT):
        setup = await cli.run(
            *("setup", "--relay", "--relay-url", proxied.nginx.wss_url),
            *("--ca-file", str(proxied.ca_file)),
        )
    assert setup.returncode == 0, setup.stderr
    assert_no_full_key(setup.stdout, setup.stderr)
    configured = load_settings(cli.home, environ={}).relay
    assert configured.url == proxied.nginx.wss_url
    assert configured.ca_file == proxied.ca_file
    assert configured.api_key is not None and looks_like_key(configured.api_key)

    daemon_port = free_port()
    serve = await start_child(cli, "serve", "serve", "--relay", "--port", str(daemon_port))
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            await wait_for_relay_state(serve, (LOOPBACK, daemon_port), "connected")
        yield ProxiedStack(
            proxied=proxied,
            serve=serve,
            daemon_address=(LOOPBACK, daemon_port),
            api_key=configured.api_key,
        )
    finally:
        await stop_processes([serve, proxied.nginx.process, proxied.relay])


async def sign_in(stack: ProxiedStack) -> tuple[str, str]:
    """Sign in through nginx as a browser on the relay's page would; the Cookie header."""
    proxied = stack.proxied
    answer = await proxied.request(
        "POST",
        "/auth",
        headers=[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", proxied.origin),
        ],
        body=form_body(api_key=stack.api_key),
    )
    assert answer.status == 303, answer.body[:500]
    return cookie_from(answer)


# -- the relay and a daemon behind nginx ----------------------------------------------------


@needs_nginx
async def test_sign_in_behind_nginx_gives_a_secure_cookie_and_requests_reach_the_daemon(
    proxied_stack: ProxiedStack,
) -> None:
    stack = proxied_stack
    proxied = stack.proxied
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    with trio.fail_after(TEST_TIMEOUT):
        refused = await proxied.request(
            "POST",
            "/auth",
            headers=[*form, ("Origin", FOREIGN_ORIGIN)],
            body=form_body(api_key=stack.api_key),
        )
        assert refused.status == 403
        assert refused.header("set-cookie") is None

        answer = await proxied.request(
            "POST",
            "/auth",
            headers=[*form, ("Origin", proxied.origin)],
            body=form_body(api_key=stack.api_key),
        )
        assert answer.status == 303
        assert answer.header("location") == "/dashboard/"
        assert answer.header("strict-transport-security") == "max-age=63072000"
        set_cookie = answer.header("set-cookie")
        assert set_cookie is not None
        attributes = [part.strip().lower() for part in set_cookie.split(";")[1:]]
        assert "secure" in attributes
        assert "httponly" in attributes
        assert "samesite=lax" in attributes
        assert stack.api_key not in set_cookie
        cookie = cookie_from(answer)

        anonymous = await proxied.request("GET", "/peers")
        assert anonymous.status == 401
        assert anonymous.json()["error"] == "unauthorized"

        listed = await proxied.request("GET", "/peers", headers=[cookie])
        assert listed.status == 200
        assert listed.json() == {"peers": []}
        created = await proxied.request(
            "POST",
            "/peers",
            headers=[cookie, ("Origin", proxied.origin)],
            json_body={"name": "alice"},
        )
        assert created.status == 201, created.body
        # The request went through to the daemon itself.
        direct = await http_request(stack.daemon_address, "GET", "/peers")
        assert [peer["name"] for peer in direct.json()["peers"]] == ["alice"]

    # Neither the key nor the session id is in any log on the way.
    session_id = cookie[1].split("=", 1)[1]
    logs = [
        proxied.nginx.access_log(),
        proxied.nginx.process.stderr(),
        proxied.relay.stdout(),
        proxied.relay.stderr(),
        stack.serve.stdout(),
        stack.serve.stderr(),
    ]
    assert_no_full_key(*logs)
    assert not any(session_id in log for log in logs)


@needs_nginx
async def test_events_stream_through_nginx_one_by_one(proxied_stack: ProxiedStack) -> None:
    stack = proxied_stack
    proxied = stack.proxied
    with trio.fail_after(TEST_TIMEOUT):
        cookie = await sign_in(stack)
        async with open_https_stream(
            proxied.port,
            proxied.ca_file,
            "GET",
            "/events/stream",
            headers=[cookie, ("Accept", "text/event-stream")],
        ) as stream:
            assert stream.status == 200
            content_type = stream.header("content-type")
            assert content_type is not None and content_type.startswith("text/event-stream")
            assert stream.header("content-length") is None
            events = SseReader(stream)
            for name in ("alice", "bob"):
                # Each event is caused only after the previous one arrived: nothing can be
                # waiting in a buffer for the stream to end.
                created = await http_request(
                    stack.daemon_address, "POST", "/peers", json_body={"name": name}
                )
                assert created.status == 201
                with trio.fail_after(5):
                    event = await events.next_event()
                assert event.event == "peer_joined"
                assert event.json()["data"]["name"] == name
                assert not stream.ended


@needs_nginx
async def test_websocket_through_nginx_needs_the_public_origin(
    proxied_stack: ProxiedStack,
) -> None:
    stack = proxied_stack
    proxied = stack.proxied
    with trio.fail_after(TEST_TIMEOUT):
        cookie = await sign_in(stack)
        # trio-websocket raises the refusal inside the helper's nursery.
        with pytest.RaisesGroup(ConnectionRejected) as refused:
            async with open_wss(
                proxied.port, proxied.ca_file, "/ws", headers=[cookie, ("Origin", FOREIGN_ORIGIN)]
            ):
                pass
        rejection = refused.value.exceptions[0]
        assert isinstance(rejection, ConnectionRejected)
        assert rejection.status_code == 403

        async with open_wss(
            proxied.port, proxied.ca_file, "/ws", headers=[cookie, ("Origin", proxied.origin)]
        ) as ws:
            created = await http_request(
                stack.daemon_address, "POST", "/peers", json_body={"name": "carol"}
            )
            assert created.status == 201
            pushed = json.loads(await ws.get_message())
            assert pushed["type"] == "event"
            assert pushed["event"]["type"] == "peer_joined"
            assert pushed["event"]["data"]["name"] == "carol"

            await ws.send_message(json.dumps({"type": "notify", "to": "nobody", "text": "hi"}))
            for _ in range(10):
                answer = json.loads(await ws.get_message())
                if answer["type"] == "result":
                    break
            else:
                raise AssertionError("no result for the notify message")
            assert answer["ok"] is False
            assert answer["status"] == 404
            assert answer["error"] == "unknown_peer"


@needs_nginx
async def test_forwarded_headers_reach_the_daemon(proxied_stack: ProxiedStack) -> None:
    """A second daemon that records what it receives, linked through nginx with the CA."""
    stack = proxied_stack
    proxied = stack.proxied
    async with trio.open_nursery() as nursery:
        with trio.fail_after(TEST_TIMEOUT):
            recorder: RecordingServer = await nursery.start(RecordingServer().serve)
            connector = Connector(
                ConnectorConfig(
                    relay_url=proxied.nginx.wss_url,
                    api_key=stack.api_key,
                    daemon_id="recorder",
                    daemon_port=recorder.port,
                    ca_file=proxied.ca_file,
                )
            )
            await nursery.start(connector.run)
            await connector.wait_state(LinkState.CONNECTED)
            cookie = await sign_in(stack)

            # The browser claims another address and plain HTTP; nginx and the relay replace
            # both with what they saw.
            answer = await proxied.request(
                "GET",
                "/d/recorder/echo?q=1",
                headers=[cookie, ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "http")],
                local_address=BROWSER_ADDRESS,
            )
            assert answer.status == 200, answer.body[:500]
            received = RecordedRequest.from_json(answer.json())
            assert received.target == "/echo?q=1"
            assert received.header("x-forwarded-proto") == "https"
            assert received.header("x-forwarded-for") == BROWSER_ADDRESS
            assert received.header("x-forwarded-host") == f"{TLS_HOST}:{proxied.port}"
            assert received.header("cookie") is None

            upload = await proxied.request(
                "POST",
                "/d/recorder/upload",
                headers=[
                    cookie,
                    ("Origin", proxied.origin),
                    ("Content-Type", "application/octet-stream"),
                ],
                body=bytes(UPLOAD_SIZE),
            )
            assert upload.status == 200, upload.body[:500]
            assert RecordedRequest.from_json(upload.json()).body_bytes == UPLOAD_SIZE
        nursery.cancel_scope.cancel()


@pytest.mark.slow
@needs_nginx
async def test_daemon_link_through_nginx_survives_keepalive(proxied_stack: ProxiedStack) -> None:
    stack = proxied_stack
    proxied = stack.proxied
    with trio.fail_after(KEEPALIVE_WAIT):
        first = await stack.relay_state()
        # An answered ping sets the round-trip time; the connector pings every 5 s.
        state = first
        while state["rtt_ms"] is None:
            await trio.sleep(0.2)
            state = await stack.relay_state()
    assert state["state"] == "connected"
    assert state["connected_since"] == first["connected_since"]
    assert state["attempts"] == 1

    with trio.fail_after(TEST_TIMEOUT):
        relay_health = await proxied.request("GET", "/health")
        assert relay_health.json()["daemons_connected"] == 1
        cookie = await sign_in(stack)
        listed = await proxied.request("GET", "/peers", headers=[cookie])
        assert listed.status == 200
        status = await proxied.cli.run("status", "--json", "--port", str(stack.daemon_address[1]))
    assert status.returncode == 0, status.stderr
    assert_no_full_key(status.stdout, status.stderr)
    report = json.loads(status.stdout)
    assert report["relay"]["state"] == "connected"
    assert report["relay"]["rtt_ms"] is not None
    assert report["config"]["url"] == proxied.nginx.wss_url


@needs_nginx
async def test_connector_without_the_ca_refuses_the_relay(proxied_relay: ProxiedRelay) -> None:
    proxied = proxied_relay
    cli = proxied.cli
    with trio.fail_after(STARTUP_TIMEOUT):
        created = await cli.run("relay", "keys", "create", "--data-dir", str(proxied.relay_data))
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        assert looks_like_key(key)
        # The key goes in on stdin, as the guide says, not on the command line.
        setup = await trio.run_process(
            cli.argv("setup", "--relay", "--relay-url", proxied.nginx.wss_url, "--api-key", "-"),
            stdin=(key + "\n").encode(),
            env=cli.env,
            cwd=cli.workdir,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        assert setup.returncode == 0, setup.stderr
        assert load_settings(cli.home, environ={}).relay.ca_file is None

    daemon_port = free_port()
    serve = await start_child(cli, "serve", "serve", "--relay", "--port", str(daemon_port))
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            state = await wait_for_relay_state(serve, (LOOPBACK, daemon_port), "down")
            assert state["retrying"] is True
            assert state["connected_since"] is None

            status = await cli.run("status", "--port", str(daemon_port))
            assert status.returncode == 1
            assert "relay:           down" in status.stdout
            assert_no_full_key(status.stdout, status.stderr)

            relay_health = await proxied.request("GET", "/health")
            assert relay_health.json()["daemons_connected"] == 0
    finally:
        await stop_processes([serve])
    assert_no_full_key(serve.stdout(), serve.stderr())
    # The user is told why: the relay's certificate is not trusted.
    error = str(state["last_error"]).lower()
    assert any(word in error for word in ("certificate", "tls", "ssl")), state["last_error"]
    assert "timed out" not in error, state["last_error"]


# -- the shipped nginx site on its own --------------------------------------------------------


@attrs.frozen(kw_only=True)
class RecordedSite:
    """The shipped nginx site in front of a :class:`RecordingServer` instead of a relay."""

    nginx: RunningNginx
    tls: TlsFiles
    recorder: RecordingServer


@asynccontextmanager
async def recorded_site(tmp_path: Path) -> AsyncIterator[RecordedSite]:
    with trio.fail_after(STARTUP_TIMEOUT):
        tls = await make_certificates(tmp_path / "tls")
    async with trio.open_nursery() as nursery:
        recorder: RecordingServer = await nursery.start(RecordingServer().serve)
        https_port, http_port = free_ports(2)
        site = NginxSite(
            https_port=https_port,
            http_port=http_port,
            relay_port=recorder.port,
            tls=tls,
            log_dir=tmp_path / "nginx-logs",
        )
        with trio.fail_after(STARTUP_TIMEOUT):
            nginx = await start_nginx(tmp_path / "nginx", site)
        try:
            yield RecordedSite(nginx=nginx, tls=tls, recorder=recorder)
        finally:
            await stop_processes([nginx.process])
            nursery.cancel_scope.cancel()


@needs_nginx
async def test_nginx_site_forwards_what_the_relay_relies_on(tmp_path: Path) -> None:
    async with recorded_site(tmp_path) as site:
        with trio.fail_after(TEST_TIMEOUT):
            await _check_forwarding(site.nginx, site.tls, site.recorder)


async def _check_forwarding(nginx: RunningNginx, tls: TlsFiles, recorder: RecordingServer) -> None:
    port = nginx.https_port
    ca = tls.ca_cert
    host = f"{TLS_HOST}:{port}"

    plain = await https_request(
        port,
        ca,
        "GET",
        "/peers?secret-looking=1",
        headers=[("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "http")],
        local_address=BROWSER_ADDRESS,
    )
    received = RecordedRequest.from_json(plain.json())
    assert received.http_version == "1.1"
    assert received.header("host") == host
    assert received.header("x-forwarded-proto") == "https"
    # The client's claim stays an earlier hop; the last hop is the address nginx saw.
    assert received.header("x-forwarded-for") == f"203.0.113.9, {BROWSER_ADDRESS}"
    assert received.header("connection") == "close"

    upgrade = await https_request(
        port, ca, "GET", "/ws", headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]
    )
    received = RecordedRequest.from_json(upgrade.json())
    assert received.header("upgrade") == "websocket"
    assert received.header("connection") == "upgrade"

    upload = await https_request(port, ca, "POST", "/upload", body=bytes(UPLOAD_SIZE))
    assert upload.status == 200
    assert RecordedRequest.from_json(upload.json()).body_bytes == UPLOAD_SIZE

    # An event stream without X-Accel-Buffering: the first event must arrive while the
    # server still holds back the second.
    async with open_https_stream(port, ca, "GET", STREAM_PATH) as stream:
        assert stream.status == 200
        received_bytes = b""
        with trio.fail_after(5):
            while len(received_bytes) < len(FIRST_EVENT):
                chunk = await stream.read_chunk()
                assert chunk is not None, "the stream ended before its first event"
                received_bytes += chunk
        assert received_bytes == FIRST_EVENT
        recorder.release_stream()
        assert await stream.read_all() == SECOND_EVENT

    redirect = await http_request((LOOPBACK, nginx.site.http_port), "GET", "/dashboard/")
    assert redirect.status == 301
    assert redirect.header("location") == f"https://{LOOPBACK}/dashboard/"

    # The access log keeps the path but never the query string.
    log = nginx.access_log()
    assert "GET /peers HTTP/1.1" in log
    assert "secret-looking" not in log


@needs_nginx
@needs("curl", shutil.which("curl") is not None, "apt-get install curl")
async def test_nginx_site_speaks_http2_and_forwards_the_host(tmp_path: Path) -> None:
    """Browsers use HTTP/2 where they can; the relay still gets HTTP/1.1 and the Host."""
    curl = shutil.which("curl")
    assert curl is not None
    async with recorded_site(tmp_path) as site:
        port = site.nginx.https_port
        argv = [curl, "--silent", "--show-error", "--http2", "--cacert", str(site.tls.ca_cert)]
        argv += ["--resolve", f"{TLS_HOST}:{port}:{LOOPBACK}"]
        argv += ["--write-out", "\n%{http_version}", f"{site.nginx.origin}/peers"]
        with trio.fail_after(TEST_TIMEOUT):
            result = await trio.run_process(
                argv, check=False, capture_stdout=True, capture_stderr=True
            )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    body, _, version = result.stdout.decode().rpartition("\n")
    assert version == "2"
    received = RecordedRequest.from_json(json.loads(body))
    assert received.http_version == "1.1"
    assert received.header("host") == f"{TLS_HOST}:{port}"
    assert received.header("x-forwarded-proto") == "https"


# -- the other deployment examples ----------------------------------------------------------


def unit_values(unit: Path, key: str) -> list[str]:
    """The values of ``key=`` in a systemd unit, continuation lines joined."""
    text = unit.read_text().replace("\\\n", " ")
    prefix = f"{key}="
    return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]


def exec_start(unit: Path) -> list[str]:
    (command,) = unit_values(unit, "ExecStart")
    return shlex.split(command)


UNITS = ["repowire-relay.service", "repowire-daemon.service"]
#: Judge the unit alone: no dependency units, generators or man pages exist in a test root.
VERIFY_OPTIONS = ["--man=no", "--generators=no", "--recursive-errors=no"]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_runs_a_command_the_cli_accepts(name: str) -> None:
    unit = DEPLOY_DIR / name
    argv = exec_start(unit)
    assert argv[0].endswith("/bin/repowire")
    build_parser().parse_args(argv[1:])
    assert unit_values(unit, "User") == ["repowire"]
    assert unit_values(unit, "Environment") == ["REPOWIRE_HOME=/var/lib/repowire"]
    assert unit_values(unit, "StateDirectory") == ["repowire"]
    assert unit_values(unit, "Restart") == ["on-failure"]
    assert unit_values(unit, "NoNewPrivileges") == ["yes"]
    assert unit_values(unit, "ProtectSystem") == ["strict"]


@needs("systemd-analyze", shutil.which("systemd-analyze") is not None, "apt-get install systemd")
@pytest.mark.parametrize("name", UNITS)
async def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    unit = DEPLOY_DIR / name
    # A root holding the unit and a stand-in for the installed entry point, so that verify
    # judges the unit itself and not this machine's installation paths.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit, root / "etc/systemd/system" / name)
    entry = root / exec_start(unit)[0].lstrip("/")
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    with trio.fail_after(TEST_TIMEOUT):
        result = await trio.run_process(
            [analyze, "verify", *VERIFY_OPTIONS, f"--root={root}", name],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert output.strip() == "", output


def test_deployment_examples_agree_with_each_other() -> None:
    """The relay unit, the Caddyfile and the guide's nginx values describe one setup."""
    args = build_parser().parse_args(exec_start(DEPLOY_DIR / "repowire-relay.service")[1:])
    assert args.host == LOOPBACK
    assert LOOPBACK in args.trusted_proxy
    public = urllib.parse.urlsplit(args.public_url)
    assert public.scheme == "https"

    caddyfile = (DEPLOY_DIR / "Caddyfile").read_text()
    assert f"\n{public.hostname} {{\n" in caddyfile
    assert f"reverse_proxy {LOOPBACK}:{args.port}\n" in caddyfile
    assert "encode" not in [line.split()[0] for line in caddyfile.splitlines() if line.strip()]

    # The guide's sed command fills in every placeholder of the site, and only those.
    guide = (DEPLOY_DIR / "README.md").read_text()
    site = (DEPLOY_DIR / "nginx.conf").read_text()
    placeholders = set(re.findall(r"\{\{([A-Z_]+)\}\}", site))
    filled = dict(re.findall(r"-e 's\|\{\{([A-Z_]+)\}\}\|([^|]*)\|g'", guide))
    assert set(filled) == placeholders
    assert filled["RELAY_PORT"] == str(args.port)
    assert filled["SERVER_NAME"] == public.hostname


@needs("caddy", shutil.which("caddy") is not None, "apt-get install caddy")
async def test_caddyfile_is_valid_for_caddy(tmp_path: Path) -> None:
    caddy = shutil.which("caddy")
    assert caddy is not None
    caddyfile = DEPLOY_DIR / "Caddyfile"
    with trio.fail_after(TEST_TIMEOUT):
        result = await trio.run_process(
            [caddy, "adapt", "--adapter", "caddyfile", "--validate", "--config", str(caddyfile)],
            cwd=tmp_path,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
