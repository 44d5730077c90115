"""The first hour with the command line (issue 14): every wrong turn explained.

Keys checked at setup and a way out of a dead key (item 3), relay URLs normalised (4), the
hosted relay named (5), the dashboard URL and a sign-in link with a QR code (1), reading
without writing (11), a CLI as people expect it (16), logs (9), a taken port (6).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import segno
import trio

from common import generate_key, mask_key
from repowire import config
from repowire.cli import build_parser, completion_script, main
from repowire.config import _load as config_load
from repowire.config import dashboard_url, load_settings
from tests.support.fake_http import FakeHttpServer
from tests.support.leaks import assert_no_full_key
from tests.support.processes import ChildProcess, Cli, start_child
from tests.support.system import skip_missing

from .cli_support import NETWORK_TEST_TIMEOUT, one_line, read_config, run_cli, write_config

# -- item 11: reading must not write ---------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["relay", "login-link"]])
async def test_read_only_commands_leave_a_fresh_home_untouched(
    tmp_path: Path, args: list[str]
) -> None:
    home = tmp_path / "fresh-home"
    work = tmp_path / "work"
    work.mkdir()
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        # Port 1: no daemon answers there, whatever runs on this machine.
        flags = ["--port", "1"] if args[0] == "status" else []
        result = await Cli(home, work).run(*args, *flags)
    assert result.returncode in (1, 2), result.stderr
    assert not home.exists(), sorted(p.name for p in home.iterdir())


# -- item 3: a key is checked at setup; a way out of a dead key ------------------------------


async def test_setup_checks_a_given_key_with_the_relay(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    http_server.reply_json("GET", "/api/v1/daemons", 200, {"daemons": []})
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(
            ["setup", "--relay", "--relay-url", http_server.ws_url, "--api-key", key]
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "stored the key given, the relay accepts it" in captured.out
    [request] = http_server.requests
    assert (request.method, request.target) == ("GET", "/api/v1/daemons")
    assert request.headers["authorization"] == f"Bearer {key}"
    assert load_settings(home, environ={}).relay.api_key == key
    assert_no_full_key(captured.out, captured.err)


async def test_setup_refuses_a_key_the_relay_rejects(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    http_server.reply_json("GET", "/api/v1/daemons", 401, {"error": "unauthorized"})
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(
            ["setup", "--relay", "--relay-url", http_server.ws_url, "--api-key", key]
        )
    captured = capsys.readouterr()
    assert code == 1
    line = one_line(captured.err)
    assert "does not accept this API key" in line
    assert "nothing was stored" in line
    assert "'repowire setup --relay --new-key'" in line
    assert not (home / "config.yaml").exists() or "api_key" not in read_config(home)
    assert_no_full_key(captured.out, captured.err)


def test_setup_stores_a_key_with_a_warning_when_the_relay_is_unreachable(
    home: Path, capsys: pytest.CaptureFixture[str], key: str, closed_port: int
) -> None:
    url = f"ws://127.0.0.1:{closed_port}"
    assert main(["setup", "--relay", "--relay-url", url, "--api-key", key]) == 0
    captured = capsys.readouterr()
    assert "could not reach the relay at http://127.0.0.1:" in captured.out
    assert "stored it anyway" in captured.out
    assert load_settings(home, environ={}).relay.api_key == key


async def test_new_key_replaces_a_dead_key_after_confirmation(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    dead = generate_key()
    write_config(
        home,
        f"daemon:\n  id: box-1\nrelay:\n  enabled: true\n  url: {http_server.ws_url}\n"
        f"  api_key: {dead}\n",
    )
    http_server.reply_json(
        "POST",
        "/api/v1/register",
        201,
        {"api_key": key, "key_id": "key_00aa11bb", "scope_id": "scope_22cc33dd"},
    )
    # Without a terminal to ask on, it needs --yes.
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        refused = await run_cli(["setup", "--relay", "--new-key"])
    assert refused == 64
    assert "confirm with --yes" in one_line(capsys.readouterr().err)
    assert http_server.requests == []
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(["setup", "--relay", "--new-key", "--yes"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "registered a new key key_00aa11bb in a new scope scope_22cc33dd" in captured.out
    [request] = http_server.requests
    assert request.json() == {"label": "box-1"}
    assert "authorization" not in request.headers
    assert load_settings(home, environ={}).relay.api_key == key
    assert_no_full_key(captured.out, captured.err)


async def test_status_after_a_refused_key_advises_only_a_new_key(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    write_config(
        home,
        f"daemon:\n  port: {http_server.port}\n  id: box-1\n"
        f"relay:\n  enabled: true\n  api_key: {key}\n",
    )
    relay = {
        "state": "down",
        "last_error": "relay closed the link (4401: invalid key); invalid API key",
        "attempts": 3,
    }
    http_server.reply_json(
        "GET", "/health", 200, {"daemon_id": "box-1", "version": "0", "relay": relay}
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["status"]) == 1
        text = capsys.readouterr().out
        assert await run_cli(["status", "--json"]) == 1
        document = json.loads(capsys.readouterr().out)
    [hint] = [line for line in text.splitlines() if line.startswith("hint: ")]
    assert "'repowire setup --relay --new-key'" in hint
    assert "--rotate-key" not in hint
    assert document["hints"] == [hint.removeprefix("hint: ")]


# -- item 4: relay URLs ---------------------------------------------------------------------


def test_an_http_relay_url_is_taken_as_ws_and_said_so(
    home: Path, capsys: pytest.CaptureFixture[str], key: str, closed_port: int
) -> None:
    given = f"http://127.0.0.1:{closed_port}"
    assert main(["setup", "--relay", "--relay-url", given, "--api-key", key]) == 0
    captured = capsys.readouterr()
    assert f"taken as 'ws://127.0.0.1:{closed_port}'" in captured.err
    assert load_settings(home, environ={}).relay.url == f"ws://127.0.0.1:{closed_port}"


@pytest.mark.parametrize("path", ["/foo", "/ws", "/api/v1"])
def test_a_relay_url_with_another_path_is_refused(
    home: Path, capsys: pytest.CaptureFixture[str], path: str
) -> None:
    assert main(["setup", "--relay", "--relay-url", f"ws://127.0.0.1:8000{path}"]) == 64
    line = one_line(capsys.readouterr().err)
    assert f"names the path '{path}'" in line
    assert "root" in line and "/ws/relay" in line
    assert not (home / "config.yaml").exists()


@pytest.mark.parametrize("url", ["ws://h:1/", "ws://h:1/ws/relay", "ws://h:1/ws/relay/"])
def test_a_relay_url_may_name_the_root_or_the_endpoint(home: Path, url: str) -> None:
    assert load_settings(home, config.Overrides(relay_url=url), environ={}).relay.url == url


# -- item 5: the hosted relay is named -------------------------------------------------------


def test_setup_names_the_hosted_relay_when_no_url_is_configured(
    home: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hosted relay's address, pointed at loopback: no test leaves this machine.
    stand_in = f"ws://127.0.0.1:{closed_port}"
    monkeypatch.setattr(config_load, "DEFAULT_RELAY_URL", stand_in)
    assert main(["setup", "--relay", "--api-key", key]) == 0
    out = capsys.readouterr().out
    assert out.count(f"no relay URL configured: using the hosted relay {stand_in}") == 1
    # Once stored, it is configured: said no more.
    assert main(["setup", "--relay"]) == 0
    assert "hosted relay" not in capsys.readouterr().out


# -- item 1: the dashboard URL and a sign-in link ---------------------------------------------


@pytest.mark.parametrize(
    ("relay_url", "expected"),
    [
        ("wss://relay.example", "https://relay.example/d/box-1/dashboard/"),
        ("ws://127.0.0.1:8000/ws/relay", "http://127.0.0.1:8000/d/box-1/dashboard/"),
    ],
)
def test_dashboard_url(relay_url: str, expected: str) -> None:
    assert dashboard_url(relay_url, "box-1") == expected


async def test_status_shows_the_dashboard_url(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    write_config(
        home,
        f"daemon:\n  port: {http_server.port}\n  id: box-1\n"
        f"relay:\n  enabled: true\n  url: wss://relay.example\n  api_key: {key}\n",
    )
    http_server.reply_json(
        "GET",
        "/health",
        200,
        {"daemon_id": "box-1", "relay": {"state": "connected", "retrying": False}},
    )
    expected = "https://relay.example/d/box-1/dashboard/"
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["status"]) == 0
        assert f"  dashboard:       {expected}\n" in capsys.readouterr().out
        assert await run_cli(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dashboard_url"] == expected


LINK = "https://relay.example/signin#tok_0123456789abcdefghijklmnopqrstuvwxyz"


def qr_modules(text: str) -> list[list[bool]]:
    """The dark modules of a half-block QR code as printed (light modules are drawn)."""
    halves = {" ": (True, True), "\u2580": (False, True), "\u2584": (True, False)}
    rows: list[list[bool]] = []
    for line in text.splitlines():
        pairs = [halves.get(char, (False, False)) for char in line]
        rows.append([top for top, _ in pairs])
        rows.append([bottom for _, bottom in pairs])
    return rows


def expected_modules(url: str) -> list[list[bool]]:
    code = segno.make(url)
    border = 4
    size = len(code.matrix[0]) + 2 * border
    rows = [[False] * size for _ in range(border)]
    rows += [[False] * border + [bool(m) for m in row] + [False] * border for row in code.matrix]
    rows += [[False] * size for _ in range(border)]
    if len(rows) % 2:
        # The last half row, below the quiet zone, is left blank (the terminal's own color).
        rows.append([True] * size)
    return rows


async def test_login_link_prints_a_qr_code_and_the_url(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    write_config(
        home,
        f"daemon:\n  id: box-1\nrelay:\n  enabled: true\n  url: {http_server.ws_url}\n"
        f"  api_key: {key}\n",
    )
    http_server.reply_json(
        "POST", "/api/v1/login-links", 201, {"url": LINK, "expires_at": 2e9, "expires_in": 300}
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["relay", "login-link"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "works once, expires in 5 min" in lines[0]
    assert lines[-1] == LINK
    qr_text = "\n".join(lines[1:-1])
    assert qr_modules(qr_text) == expected_modules(LINK)
    [request] = http_server.requests
    assert request.headers["authorization"] == f"Bearer {key}"
    assert request.json() == {"daemon_id": "box-1"}
    assert_no_full_key(out)
    assert mask_key(key) not in out

    zbarimg = shutil.which("zbarimg")
    if zbarimg is None:
        # Everything above held; what is left needs a QR decoder (CI installs it).
        skip_missing("zbarimg, to decode the QR code", "apt-get install zbar-tools")
    image = home / "qr.png"
    # The printed modules, drawn as an image, must scan back to the URL.
    matrix = [[not dark for dark in row] for row in qr_modules(qr_text)]
    _write_png(image, matrix)
    decoded = await trio.run_process(
        [zbarimg, "--raw", "-q", str(image)], capture_stdout=True, check=False
    )
    assert decoded.stdout.decode().strip() == LINK


def _write_png(path: Path, light: list[list[bool]], scale: int = 4) -> None:
    import struct
    import zlib

    height, width = len(light) * scale, len(light[0]) * scale
    raw = b""
    for row in light:
        line = b"\x00" + b"".join((b"\xff" if cell else b"\x00") * scale for cell in row)
        raw += line * scale

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


async def test_login_link_json_and_refusals(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    write_config(home, f"relay:\n  url: {http_server.ws_url}\n  api_key: {key}\n")
    http_server.reply_json(
        "POST", "/api/v1/login-links", 201, {"url": LINK, "expires_at": 2e9, "expires_in": 300}
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["relay", "login-link", "--json"]) == 0
        document = json.loads(capsys.readouterr().out)
        assert document == {
            "url": LINK,
            "expires_at": 2e9,
            "expires_in": 300,
            "daemon_id": None,
        }
        # No daemon id stored yet: none is sent (and none is made up and written).
        assert http_server.requests[0].json() == {}
        assert "daemon" not in read_config(home)

        http_server.reply_json("POST", "/api/v1/login-links", 401, {"error": "unauthorized"})
        assert await run_cli(["relay", "login-link"]) == 1
        assert "--new-key" in one_line(capsys.readouterr().err)


def test_login_link_without_a_key_says_what_to_do(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["relay", "login-link"]) == 1
    assert "run 'repowire setup --relay' first" in one_line(capsys.readouterr().err)
    assert not home.exists()


# -- item 16: the CLI as people expect it -----------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flags(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag]) == 0
    assert capsys.readouterr().out.startswith("repowire ")


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["status", "--bogus"], "repowire status"),
        (["relay", "keys", "list", "--bogus"], "repowire relay keys list"),
        (["serve", "extra"], "repowire serve"),
    ],
)
def test_an_unknown_flag_is_reported_by_its_command(
    argv: list[str], prog: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 64
    assert one_line(capsys.readouterr().err).startswith(f"{prog}: error: unrecognized arguments")


def _every_parser() -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        found.append((parser.prog, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)

    walk(build_parser())
    return found


def test_every_option_is_described_and_help_shows_defaults_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for prog, parser in _every_parser():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # its choices are described one by one
            assert action.help, f"{prog}: {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        if parser._subparsers is None:
            assert "64   usage error" in text and "130  interrupted" in text, prog
    start = dict(_every_parser())["repowire relay start"].format_help()
    assert "(default 8000)" in start.replace("\n", " ").replace("  ", " ")
    assert "(default text)" in start.replace("\n", " ")


def test_bash_completion_is_valid_and_completes_subcommands(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    script = tmp_path / "repowire.bash"
    script.write_text(completion_script("bash", build_parser()))
    subprocess.run([bash, "-n", str(script)], check=True, timeout=30)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in ("repowire", *words))
        program = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; "
            '_repowire; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(
            [bash, "--norc", "-c", program], capture_output=True, text=True, timeout=30, check=True
        )
        return done.stdout.split()

    assert {"setup", "status", "serve", "relay", "completion"} <= set(complete(""))
    assert complete("re") == ["relay"]
    assert set(complete("relay", "")) >= {"start", "keys", "login-link"}
    assert complete("relay", "keys", "")[:3] == ["create", "list", "revoke"]
    assert "--log-format" in complete("relay", "start", "--log")
    assert complete("serve", "--port", "9000", "--rel") == ["--relay", "--relay-url"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion_scripts(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0
    out = capsys.readouterr().out
    assert "login-link" in out and "--new-key" in out.replace("-l new-key", "--new-key")
    program = shutil.which(shell)
    if program is not None:
        subprocess.run([program, "-n", "-c", out], check=True, timeout=30)


# -- item 9: logging flags ------------------------------------------------------------------


async def test_relay_start_logs_json_lines_with_level_and_logger(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cli_run = Cli(tmp_path / "home", work)
    relay: ChildProcess = await start_child(
        cli_run,
        "relay",
        "relay",
        "start",
        *("--port", "0", "--metrics-listen", "off", "--log-format", "json"),
        *("--data-dir", str(tmp_path / "data")),
    )
    try:
        with trio.fail_after(NETWORK_TEST_TIMEOUT):
            await relay.wait_for_line("repowire relay listening on http://")
            assert await relay.terminate() == 0
    finally:
        with trio.CancelScope(shield=True):
            await relay.terminate()
    records = [json.loads(line) for line in relay.stderr().splitlines() if line.startswith("{")]
    assert records, relay.stderr()
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    assert any(r["logger"].startswith("repowire.") for r in records)


def test_quiet_and_verbose_set_the_level() -> None:
    from repowire._logging import log_level

    assert log_level(verbose=0, quiet=0, environ={}) == 20
    assert log_level(verbose=1, quiet=0, environ={}) == 10
    assert log_level(verbose=0, quiet=1, environ={}) == 30
    assert log_level(verbose=0, quiet=0, environ={"REPOWIRE_DEBUG": "1"}) == 10


# -- item 6: a taken port -------------------------------------------------------------------


async def test_relay_start_on_a_taken_port_names_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with trio.fail_after(NETWORK_TEST_TIMEOUT):
            result = await Cli(tmp_path / "home", work).run(
                "relay",
                "start",
                "--port",
                str(port),
                "--metrics-listen",
                "off",
                "--data-dir",
                str(tmp_path / "data"),
            )
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"127.0.0.1:{port}" in line
    assert "--port" in line
    assert "another program holds that address" in line
