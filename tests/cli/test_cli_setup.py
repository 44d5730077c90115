"""``repowire setup --relay`` against a scripted relay on loopback."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest
import trio

from common import generate_key, mask_key
from repowire.cli import main
from repowire.config import load_settings
from tests.support.fake_http import FakeHttpServer, Reply, SelfSigned
from tests.support.leaks import assert_no_full_key

from .cli_support import NETWORK_TEST_TIMEOUT, one_line, read_config, run_cli, write_config


def main_setup(extra: list[str]) -> int:
    return main(["setup", "--relay", *extra])


def assert_relay_untouched(home: Path) -> None:
    # The daemon id may have been generated (it labels the registration); nothing else.
    assert "relay" not in read_config(home)
    settings = load_settings(home, environ={})
    assert (settings.relay.enabled, settings.relay.api_key) == (False, None)


EXISTING = """\
# my repowire settings
daemon:
  port: 8377   # the usual
  id: box-123abc
relay:
  enabled: false
other_tool:
  keep: true   # not repowire's
"""


def register_reply(server: FakeHttpServer, api_key: str) -> None:
    server.reply_json(
        "POST",
        "/api/v1/register",
        201,
        {"api_key": api_key, "key_id": "key_00aa11bb", "scope_id": "scope_22cc33dd"},
    )


async def test_registers_when_there_is_no_key(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    new_key = generate_key()
    register_reply(http_server, new_key)
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(["setup", "--relay", "--relay-url", http_server.ws_url])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    settings = load_settings(home, environ={})
    assert settings.relay.enabled is True
    assert settings.relay.url == http_server.ws_url
    assert settings.relay.api_key == new_key
    assert stat.S_IMODE((home / "config.yaml").stat().st_mode) == 0o600

    [request] = http_server.requests
    assert (request.method, request.target) == ("POST", "/api/v1/register")
    assert request.json() == {"label": settings.daemon.daemon_id}
    assert "authorization" not in request.headers

    assert mask_key(new_key) in captured.out
    assert "key_00aa11bb" in captured.out
    assert captured.err == ""
    assert_no_full_key(captured.out, captured.err)


async def test_keeps_comments_and_other_keys(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(home, EXISTING)
    new_key = generate_key()
    register_reply(http_server, new_key)
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["setup", "--relay", "--relay-url", http_server.ws_url]) == 0
    assert read_config(home) == EXISTING.replace(
        "  enabled: false\n",
        f"  enabled: true\n  url: {http_server.ws_url}\n  api_key: {new_key}\n",
    )
    [request] = http_server.requests
    assert request.json() == {"label": "box-123abc"}
    assert_no_full_key(*capsys.readouterr())


async def test_existing_key_is_kept_without_asking_the_relay(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    write_config(home, f"relay:\n  api_key: {key}\n")
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["setup", "--relay", "--relay-url", http_server.ws_url]) == 0
    assert http_server.requests == []
    settings = load_settings(home, environ={})
    assert (settings.relay.api_key, settings.relay.enabled) == (key, True)
    captured = capsys.readouterr()
    assert "kept" in captured.out
    assert mask_key(key) in captured.out
    assert_no_full_key(captured.out, captured.err)


def test_given_key_is_stored_without_asking_the_relay(
    home: Path, capsys: pytest.CaptureFixture[str], key: str, closed_port: int
) -> None:
    # The relay is not even reachable: a given key needs no request.
    url = f"ws://127.0.0.1:{closed_port}"
    assert main_setup(["--relay-url", url, "--api-key", key]) == 0
    assert load_settings(home, environ={}).relay.api_key == key
    captured = capsys.readouterr()
    assert "stored the key given" in captured.out
    assert_no_full_key(captured.out, captured.err)


def test_given_key_can_come_from_stdin(
    home: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    monkeypatch: pytest.MonkeyPatch,
    closed_port: int,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    # The key is checked with the relay: loopback, where nothing answers.
    assert main_setup(["--relay-url", f"ws://127.0.0.1:{closed_port}", "--api-key", "-"]) == 0
    assert load_settings(home, environ={}).relay.api_key == key
    assert_no_full_key(*capsys.readouterr())


@pytest.mark.parametrize(
    "bad_key", ["hunter2", "rw_tooshort", "rw_" + "a" * 42 + "=", "RW_" + "a" * 43]
)
def test_invalid_key_is_refused_without_echo_or_write(
    home: Path, capsys: pytest.CaptureFixture[str], bad_key: str
) -> None:
    assert main_setup(["--api-key", bad_key]) == 64
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert "does not look like a Repowire API key" in line
    assert bad_key not in line
    assert captured.out == ""
    assert not (home / "config.yaml").exists()


def test_invalid_key_from_stdin_is_refused(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("rw_not_a_real_key\n"))
    assert main_setup(["--api-key", "-"]) == 64
    line = one_line(capsys.readouterr().err)
    assert "does not look like" in line
    assert "rw_not_a_real_key" not in line
    assert not (home / "config.yaml").exists()


async def test_rotate_sends_the_old_key_as_bearer_and_stores_the_new_one(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    write_config(home, f"relay:\n  enabled: true\n  api_key: {key}\n")
    new_key = generate_key()
    http_server.reply_json(
        "POST", "/api/v1/keys/rotate", 200, {"api_key": new_key, "key_id": "key_99ff"}
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(
            ["setup", "--relay", "--relay-url", http_server.ws_url, "--rotate-key"]
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [request] = http_server.requests
    assert (request.method, request.target) == ("POST", "/api/v1/keys/rotate")
    assert request.headers["authorization"] == f"Bearer {key}"
    assert load_settings(home, environ={}).relay.api_key == new_key
    assert "rotated" in captured.out
    assert mask_key(new_key) in captured.out
    assert_no_full_key(captured.out, captured.err)


async def test_rotate_rejected_keeps_the_old_key(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    original = f"daemon:\n  id: box-000002\nrelay:\n  api_key: {key}\n"
    write_config(home, original)
    http_server.reply_json(
        "POST", "/api/v1/keys/rotate", 401, {"error": "invalid_key", "detail": "Unknown key."}
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(
            ["setup", "--relay", "--relay-url", http_server.ws_url, "--rotate-key"]
        )
    assert code == 1
    captured = capsys.readouterr()
    assert "rejected the current API key" in one_line(captured.err)
    assert read_config(home) == original
    assert_no_full_key(captured.out, captured.err)


def test_rotate_without_a_key_fails_clearly(
    home: Path, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    assert main_setup(["--relay-url", f"ws://127.0.0.1:{closed_port}", "--rotate-key"]) == 1
    assert "no API key" in one_line(capsys.readouterr().err)


def test_api_key_and_rotate_are_exclusive(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = generate_key()
    assert main_setup(["--api-key", key, "--rotate-key"]) == 64
    line = one_line(capsys.readouterr().err)
    assert "not allowed with" in line
    assert key not in line


def test_unreachable_relay_fails_in_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    assert main_setup(["--relay-url", f"ws://127.0.0.1:{closed_port}"]) == 1
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert f"cannot connect to http://127.0.0.1:{closed_port}/api/v1/register" in line
    # A failed setup leaves relay access as it was: not half-enabled without a key.
    assert_relay_untouched(home)


@pytest.mark.parametrize(
    ("status", "document", "fragment"),
    [
        (403, {"error": "registration_closed"}, "registration is closed"),
        (429, {"error": "rate_limited"}, "try again later"),
        (500, {"error": "internal", "detail": "Boom."}, "refused registration (500: internal"),
        (201, {"api_key": "nope", "key_id": "k", "scope_id": "s"}, "without a valid API key"),
        (201, {"key_id": "k"}, "without a valid API key"),
    ],
)
async def test_relay_refusals_are_reported(
    home: Path,
    http_server: FakeHttpServer,
    capsys: pytest.CaptureFixture[str],
    status: int,
    document: dict[str, str],
    fragment: str,
) -> None:
    http_server.reply_json("POST", "/api/v1/register", status, document)
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["setup", "--relay", "--relay-url", http_server.ws_url]) == 1
    assert fragment in one_line(capsys.readouterr().err)
    assert_relay_untouched(home)


async def test_relay_answering_html_is_reported(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    http_server.reply_raw(
        "POST", "/api/v1/register", Reply(status=200, body=b"<h1>hi</h1>", content_type="text/html")
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["setup", "--relay", "--relay-url", http_server.ws_url]) == 1
    assert "not JSON" in one_line(capsys.readouterr().err)


async def test_self_signed_relay_with_ca_file(
    home: Path,
    tls_server: FakeHttpServer,
    self_signed: SelfSigned,
    capsys: pytest.CaptureFixture[str],
) -> None:
    new_key = generate_key()
    register_reply(tls_server, new_key)
    argv = ["setup", "--relay", "--relay-url", tls_server.ws_url]
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(argv) == 1
        assert "not trusted" in one_line(capsys.readouterr().err)
        assert await run_cli([*argv, "--ca-file", str(self_signed.cert)]) == 0
    settings = load_settings(home, environ={})
    assert settings.relay.api_key == new_key
    assert settings.relay.ca_file == self_signed.cert.resolve()
    assert settings.relay.url.startswith("wss://127.0.0.1:")
    assert_no_full_key(*capsys.readouterr())


def test_bad_relay_url_flag_is_a_usage_error(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_setup(["--relay-url", "ftp://relay.example"]) == 64
    assert "must start with ws:// or wss://" in one_line(capsys.readouterr().err)
    assert not (home / "config.yaml").exists()


def test_environment_overrides_are_pointed_out(
    home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    closed_port: int,
) -> None:
    monkeypatch.setenv("REPOWIRE_RELAY_URL", "wss://elsewhere.example")
    # The key is checked with the file's relay (loopback, where nothing answers).
    write_config(home, f"relay:\n  url: ws://127.0.0.1:{closed_port}\n")
    assert main_setup(["--api-key", generate_key()]) == 0
    out = capsys.readouterr().out
    assert "REPOWIRE_RELAY_URL is set and overrides relay.url" in out
    # The file kept the file's own URL, not the environment's.
    assert f"url: ws://127.0.0.1:{closed_port}" in read_config(home)
