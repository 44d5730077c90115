"""Argument handling, ``serve``, ``relay start`` and ``relay keys``."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import relay
import repowire.dashboard
from common import generate_key, looks_like_key, mask_key
from repowire import cli
from repowire.cli import main
from repowire.config import Settings, load_settings
from repowire.dashboard import STATIC_DIR
from tests.support.fake_http import FakeHttpServer
from tests.support.leaks import assert_no_full_key

from .cli_support import NETWORK_TEST_TIMEOUT, one_line, read_config, run_cli, write_config

# -- help, version, usage errors --------------------------------------------------------------

COMMANDS = [
    [],
    ["setup"],
    ["status"],
    ["serve"],
    ["relay"],
    ["relay", "start"],
    ["relay", "keys"],
    ["relay", "keys", "create"],
    ["relay", "keys", "list"],
    ["relay", "keys", "revoke"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "repowire")
def test_help_for_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: {' '.join(['repowire', *command])}")
    assert captured.err == ""


def test_top_level_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in ("0    success", "2    status: the daemon is not running", "3    configuration"):
        assert line in out
    for command in ("setup", "status", "serve", "relay"):
        assert command in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"repowire {importlib.metadata.version('repowire')}\n"


def test_python_dash_m_runs_the_same_command() -> None:
    root = Path(cli.__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "repowire", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        check=False,
    )
    expected = f"repowire {importlib.metadata.version('repowire')}\n"
    assert (result.returncode, result.stdout) == (0, expected)


BAD_USAGE = [
    ["--bogus"],
    ["frobnicate"],
    ["setup"],
    ["setup", "--relay", "--nope"],
    ["setup", "--relay", "--ca-file", "/nonexistent/ca.pem"],
    ["status", "extra"],
    ["serve", "--port", "abc"],
    ["serve", "--port", "0"],
    ["serve", "--relay", "--no-relay"],
    ["serve", "--daemon-id", "bad id"],
    ["serve", "--relay-url", "ftp://x"],
    ["relay"],
    ["relay", "start", "--registration", "maybe"],
    ["relay", "start", "--trusted-proxy", "not-an-ip"],
    ["relay", "start", "--max-body-size", "-5"],
    ["relay", "start", "--body-timeout", "0"],
    ["relay", "start", "--body-timeout", "nan"],
    ["relay", "start", "--body-timeout", "soon"],
    ["relay", "start", "--port", "70000"],
    ["relay", "start", "--public-url", "ftp://x"],
    ["relay", "keys"],
    ["relay", "keys", "revoke"],
]


@pytest.mark.parametrize("argv", BAD_USAGE, ids=" ".join)
def test_bad_usage_is_one_line_and_exit_64(
    argv: list[str], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 64
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert "error:" in line
    assert line.endswith("--help')")
    assert captured.out == ""
    assert not home.exists()  # a refused command touches nothing


def test_a_key_in_an_unknown_flag_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    key = generate_key()
    assert main(["status", "--api-key", key]) == 64
    line = one_line(capsys.readouterr().err)
    assert "unrecognized arguments" in line
    assert mask_key(key) in line
    assert_no_full_key(line)


def test_a_key_given_as_a_command_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    key = generate_key()
    assert main([key]) == 64
    assert_no_full_key(capsys.readouterr().err)


# -- serve -------------------------------------------------------------------------------------


@attrs.define
class FakeServe:
    """Stands in for ``repowire._serve``: records the settings, then does what it is told."""

    calls: list[Settings] = attrs.field(factory=list)
    raise_: BaseException | None = None

    async def serve(self, settings: Settings) -> None:
        self.calls.append(settings)
        await trio.lowlevel.checkpoint()
        if self.raise_ is not None:
            raise self.raise_


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> FakeServe:
    fake = FakeServe()
    module = types.ModuleType("repowire._serve")
    module.serve = fake.serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "repowire._serve", module)
    return fake


def test_serve_passes_resolved_settings(
    home: Path, fake_serve: FakeServe, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(home, "daemon:\n  id: box-111111\n  port: 9000\nrelay:\n  enabled: false\n")
    assert main(["serve"]) == 0
    [settings] = fake_serve.calls
    assert settings.daemon.port == 9000
    assert settings.daemon.host == "127.0.0.1"
    assert settings.daemon.daemon_id == "box-111111"
    assert settings.relay.enabled is False
    assert capsys.readouterr().err == ""


def test_serve_flags_win(
    home: Path, fake_serve: FakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key()
    write_config(home, f"daemon:\n  port: 9000\nrelay:\n  enabled: false\n  api_key: {key}\n")
    monkeypatch.setenv("REPOWIRE_DAEMON_PORT", "9001")
    argv = ["serve", "--relay", "--host", "127.0.0.5", "--port", "9002"]
    argv += ["--relay-url", "ws://127.0.0.1:1", "--daemon-id", "flag-id"]
    assert main(argv) == 0
    [settings] = fake_serve.calls
    assert (settings.daemon.host, settings.daemon.port) == ("127.0.0.5", 9002)
    assert settings.daemon.daemon_id == "flag-id"
    assert settings.relay.enabled is True
    assert settings.relay.url == "ws://127.0.0.1:1"
    assert settings.relay.api_key == key


def test_serve_no_relay_overrides_the_file(
    home: Path, fake_serve: FakeServe, closed_port: int
) -> None:
    write_config(home, f"relay:\n  enabled: true\n  url: ws://127.0.0.1:{closed_port}\n")
    assert main(["serve", "--no-relay"]) == 0
    [settings] = fake_serve.calls
    assert settings.relay.enabled is False
    assert settings.relay.api_key is None


async def test_serve_relay_without_key_registers_first(
    home: Path,
    fake_serve: FakeServe,
    http_server: FakeHttpServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    new_key = generate_key()
    http_server.reply_json(
        "POST", "/api/v1/register", 201, {"api_key": new_key, "key_id": "k1", "scope_id": "s1"}
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(["serve", "--relay", "--relay-url", http_server.ws_url])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [settings] = fake_serve.calls
    assert settings.relay.api_key == new_key
    assert load_settings(home, environ={}).relay.api_key == new_key
    [request] = http_server.requests
    assert request.json() == {"label": settings.daemon.daemon_id}
    assert mask_key(new_key) in captured.out
    assert_no_full_key(captured.out, captured.err)


def test_serve_relay_registration_failure_does_not_serve(
    home: Path, fake_serve: FakeServe, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--relay", "--relay-url", f"ws://127.0.0.1:{closed_port}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "cannot obtain an API key" in line
    assert "--no-relay" in line
    assert fake_serve.calls == []


def test_serve_ctrl_c_exits_0_quietly(
    home: Path, fake_serve: FakeServe, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_serve.raise_ = KeyboardInterrupt()
    assert main(["serve"]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (OSError(98, "Address already in use"), "cannot serve: Address already in use"),
        (
            ExceptionGroup("serving", [RuntimeError("daemon crashed")]),
            "unexpected error: RuntimeError: daemon crashed",
        ),
    ],
)
def test_serve_failures_are_one_line(
    home: Path,
    fake_serve: FakeServe,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    fragment: str,
) -> None:
    fake_serve.raise_ = error
    assert main(["serve"]) == 1
    assert fragment in one_line(capsys.readouterr().err)


def test_serve_without_the_daemon_module(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "repowire._serve", None)
    assert main(["serve"]) == 1
    assert "the daemon is not available" in one_line(capsys.readouterr().err)


# -- relay start -------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class FakeRelaySettings:
    """The field names ``relay.RelaySettings`` has; defaults stand for the relay's own."""

    host: str
    port: int
    data_dir: Path
    registration: str
    dashboard_dir: Path | None = None
    public_url: str | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    max_body_size: int | None = None
    body_timeout: float | None = None
    trusted_proxies: tuple[str, ...] = ()
    max_links_per_scope: int | None = None
    max_streams_per_scope: int | None = None
    max_scope_buffered: int | None = None
    max_scope_window_growth: int | None = None
    stream_open_timeout: float | None = None
    max_websocket_message_size: int | None = None
    metrics_listen: str | None = None


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []

    async def serve_relay_main(settings: Any) -> None:
        calls.append(settings)
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(relay, "RelaySettings", FakeRelaySettings, raising=False)
    monkeypatch.setattr(relay, "serve_relay_main", serve_relay_main, raising=False)
    return calls


def test_relay_start_defaults(home: Path, started: list[Any]) -> None:
    assert main(["relay", "start"]) == 0
    assert started == [
        FakeRelaySettings(
            host="127.0.0.1",
            port=8000,
            data_dir=home / "relay",
            registration="open",
            metrics_listen="127.0.0.1:9108",
            # The relay has no dashboard of its own: the command names repowire's.
            dashboard_dir=STATIC_DIR,
        )
    ]


def test_relay_start_passes_every_flag(home: Path, started: list[Any], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    dashboard = tmp_path / "dash"
    dashboard.mkdir()
    argv = ["relay", "start", "--host", "0.0.0.0", "--port", "0"]
    argv += ["--data-dir", str(tmp_path / "data"), "--dashboard-dir", str(dashboard)]
    argv += ["--public-url", "https://relay.example/", "--registration", "closed"]
    argv += ["--certfile", str(cert), "--keyfile", str(key), "--max-body-size", "1048576"]
    argv += ["--body-timeout", "2.5"]
    argv += ["--trusted-proxy", "10.0.0.1", "--trusted-proxy", "192.168.1.1/16"]
    argv += ["--max-links-per-scope", "3", "--max-streams-per-scope", "40"]
    argv += ["--max-scope-buffer", "2097152", "--stream-open-timeout", "1.5"]
    argv += ["--max-scope-window-growth", "0"]
    argv += ["--max-websocket-message", "1048576", "--metrics-listen", "[::1]:0"]
    assert main(argv) == 0
    assert started == [
        FakeRelaySettings(
            host="0.0.0.0",
            port=0,
            data_dir=tmp_path / "data",
            dashboard_dir=dashboard,
            public_url="https://relay.example",
            registration="closed",
            certfile=cert,
            keyfile=key,
            max_body_size=1048576,
            body_timeout=2.5,
            trusted_proxies=("10.0.0.1", "192.168.0.0/16"),
            max_links_per_scope=3,
            max_streams_per_scope=40,
            max_scope_buffered=2097152,
            max_scope_window_growth=0,
            stream_open_timeout=1.5,
            max_websocket_message_size=1048576,
            metrics_listen="[::1]:0",
        )
    ]


def test_relay_start_without_the_bundled_dashboard_says_so(
    home: Path,
    started: list[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(repowire.dashboard, "STATIC_DIR", tmp_path / "missing")
    assert main(["relay", "start"]) == 1
    assert "the dashboard's static files are missing" in one_line(capsys.readouterr().err)
    assert started == []
    # A dashboard of one's own does not need the bundled one.
    own = tmp_path / "own"
    own.mkdir()
    assert main(["relay", "start", "--dashboard-dir", str(own)]) == 0
    assert started[0].dashboard_dir == own


def test_relay_start_metrics_listener_can_be_turned_off(home: Path, started: list[Any]) -> None:
    assert main(["relay", "start", "--metrics-listen", "off"]) == 0
    assert started[0].metrics_listen is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--metrics-listen", "9108"],
        ["--metrics-listen", "example.com:9108"],
        ["--metrics-listen", "127.0.0.1:99999"],
        ["--max-links-per-scope", "0"],
        ["--max-streams-per-scope", "many"],
        ["--max-streams-per-scope", "\u00b2"],
        ["--max-scope-buffer", "\u00b9\u00b2"],
        ["--max-scope-window-growth", "-1"],
        ["--max-scope-window-growth", "64M"],
        ["--stream-open-timeout", "-1"],
    ],
)
def test_relay_start_refuses_bad_quota_and_metrics_flags(
    home: Path, started: list[Any], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["relay", "start", *argv]) == 64
    assert started == []
    assert argv[0] in capsys.readouterr().err


def real_relay_settings() -> Any:
    exported = getattr(relay, "RelaySettings", None)
    if exported is not None:
        return exported
    try:
        return importlib.import_module("relay._settings").RelaySettings
    except ImportError:
        pytest.skip("the relay's settings class is not available")


def test_relay_start_flags_fit_the_real_settings_class(home: Path, tmp_path: Path) -> None:
    settings_class = real_relay_settings()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    parser = cli.build_parser()
    defaults = settings_class(
        **cli.relay_settings_kwargs(parser.parse_args(["relay", "start"]), home)
    )
    assert (defaults.host, defaults.port, defaults.data_dir) == ("127.0.0.1", 8000, home / "relay")
    assert defaults.dashboard_dir == STATIC_DIR
    argv = ["relay", "start", "--public-url", "https://r.example", "--registration", "closed"]
    argv += ["--certfile", str(cert), "--keyfile", str(key), "--max-body-size", "1000"]
    argv += ["--trusted-proxy", "10.0.0.1", "--dashboard-dir", str(tmp_path)]
    argv += ["--body-timeout", "30"]
    full = settings_class(**cli.relay_settings_kwargs(parser.parse_args(argv), home))
    assert full.body_timeout == 30.0
    assert defaults.body_timeout == 60.0
    assert (full.public_url, full.registration, full.max_body_size) == (
        "https://r.example",
        "closed",
        1000,
    )
    assert (full.certfile, full.keyfile, full.dashboard_dir) == (cert, key, tmp_path)
    assert tuple(full.trusted_proxies) == ("10.0.0.1",)


def test_relay_start_needs_cert_and_key_together(
    home: Path, started: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("c")
    assert main(["relay", "start", "--certfile", str(cert)]) == 64
    assert "--certfile and --keyfile go together" in one_line(capsys.readouterr().err)
    assert started == []


def test_relay_start_ctrl_c_exits_0(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted(settings: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(relay, "RelaySettings", FakeRelaySettings, raising=False)
    monkeypatch.setattr(relay, "serve_relay_main", interrupted, raising=False)
    assert main(["relay", "start"]) == 0
    assert capsys.readouterr() == ("", "")


# -- relay keys --------------------------------------------------------------------------------


def create_key(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, str]:
    """Run ``relay keys create``; returns (key id, key) from its output."""
    assert main(["relay", "keys", "create", *extra]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    key = lines[-1]
    assert looks_like_key(key)
    assert out.count(key) == 1  # printed once
    key_id = lines[0].split()[2]
    return key_id, key


def test_keys_create_list_revoke(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_id, key = create_key(capsys, "--label", "laptop")
    assert (home / "relay" / "relay.sqlite3").exists()

    assert main(["relay", "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing
    assert "laptop" in listing
    assert key not in listing
    assert_no_full_key(listing)

    assert main(["relay", "keys", "revoke", key_id]) == 0
    assert "Revoked" in capsys.readouterr().out
    assert main(["relay", "keys", "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["keys"]
    assert row["key_id"] == key_id
    assert row["revoked_at"] is not None
    assert "api_key" not in row

    assert main(["relay", "keys", "revoke", key_id]) == 1
    assert "already revoked" in one_line(capsys.readouterr().err)


def test_keys_create_in_an_existing_scope(
    home: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = ["--data-dir", str(tmp_path / "elsewhere")]
    first_id, first = create_key(capsys, *data)
    assert main(["relay", "keys", "list", "--json", *data]) == 0
    [row] = json.loads(capsys.readouterr().out)["keys"]
    scope = row["scope_id"]
    second_id, second = create_key(capsys, "--scope", scope, *data)
    assert first != second
    assert main(["relay", "keys", "list", "--scope", scope, "--json", *data]) == 0
    ids = [r["key_id"] for r in json.loads(capsys.readouterr().out)["keys"]]
    assert sorted(ids) == sorted([first_id, second_id])
    assert not (home / "relay").exists()


def test_keys_create_in_an_unknown_scope(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["relay", "keys", "create", "--scope", "scope_00000000"]) == 1
    assert "no scope" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["list"], ["revoke", "key_00000000"]])
def test_keys_without_a_store(
    home: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["relay", "keys", *command]) == 1
    assert "no key store at" in one_line(capsys.readouterr().err)
    assert not (home / "relay").exists()


def test_keys_revoke_refuses_a_key_in_place_of_an_id(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = generate_key()
    assert main(["relay", "keys", "revoke", key]) == 64
    line = one_line(capsys.readouterr().err)
    assert "that is an API key, not a key id" in line
    assert_no_full_key(line)


def test_setup_output_never_contains_the_key(
    home: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    key = generate_key()
    assert main(["setup", "--relay", "--api-key", key]) == 0
    # A port with nothing on it: the user's own daemon may hold the default one.
    assert main(["status", "--port", str(closed_port)]) == 2
    captured = capsys.readouterr()
    assert_no_full_key(captured.out, captured.err)
    assert key in read_config(home)


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--max-links-per-scope", "max_links_per_scope"),
        ("--max-streams-per-scope", "max_streams_per_scope"),
        ("--max-scope-buffer", "max_scope_buffered"),
        ("--max-scope-window-growth", "max_scope_window_growth"),
        ("--stream-open-timeout", "stream_open_timeout"),
        ("--max-websocket-message", "max_websocket_message_size"),
    ],
)
def test_relay_start_help_states_the_relays_own_defaults(
    flag: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quota flags leave the default to the relay; their help must say what it is."""
    default = attrs.fields_dict(real_relay_settings())[field].default
    assert main(["relay", "start", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    described = text[text.rindex(flag) :].split(" --", 1)[0]  # past the usage line
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    assert f"default {shown}" in described, (flag, described)
