"""``repowire status`` against a fake daemon ``/health`` on loopback (and no daemon at all)."""

from __future__ import annotations

import datetime
import json
import types
from pathlib import Path
from typing import Any

import pytest
import trio

from common import generate_key, mask_key
from repowire.cli import _status, format_time, main
from tests.support.fake_http import FakeHttpServer, Reply
from tests.support.leaks import assert_no_full_key

from .cli_support import NETWORK_TEST_TIMEOUT, one_line, run_cli, write_config


def point_at(home: Path, server_port: int, extra: str = "") -> None:
    write_config(home, f"daemon:\n  port: {server_port}\n  id: box-000001\n{extra}")


def health(relay: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok", "daemon_id": "box-000001", "version": "0.1.0", "relay": relay}


#: The status command's clock is pinned here (see `frozen_clock`), so ages are exact.
NOW = 1_700_000_000.0


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_status, "time", types.SimpleNamespace(time=lambda: NOW))


STATES: dict[str, tuple[dict[str, Any], int, list[str]]] = {
    "connected": (
        {"state": "connected", "connected_since": NOW - 42, "rtt_ms": 12.4, "attempts": 1},
        0,
        ["relay:           connected", "connected since:", "(42 s ago)", "12 ms"],
    ),
    "connecting": (
        {"state": "connecting", "attempts": 3, "next_retry_at": NOW + 30},
        1,
        ["relay:           connecting", "attempts:        3", "(in 30 s)"],
    ),
    "down": (
        {
            "state": "down",
            "last_error": "invalid key",
            "last_error_at": NOW - 90,
            "attempts": 7,
            "next_retry_at": NOW + 60,
        },
        1,
        ["relay:           down", "last error:      invalid key", "(90 s ago)", "(in 60 s)"],
    ),
    "disabled": ({"state": "disabled"}, 0, ["relay:           disabled"]),
}


@pytest.mark.parametrize("state", sorted(STATES))
async def test_each_state_is_shown_with_its_exit_code(
    home: Path,
    http_server: FakeHttpServer,
    capsys: pytest.CaptureFixture[str],
    state: str,
    key: str,
) -> None:
    relay, expected_code, fragments = STATES[state]
    point_at(home, http_server.port, f"relay:\n  enabled: true\n  api_key: {key}\n")
    http_server.reply_json("GET", "/health", 200, health(relay))
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(["status"])
    captured = capsys.readouterr()
    assert code == expected_code
    assert captured.err == ""
    out = captured.out
    assert f"Daemon at http://127.0.0.1:{http_server.port}: running" in out
    assert "id box-000001" in out
    assert "enabled:  yes" in out
    assert f"api key:  present, {mask_key(key)}" in out
    assert str(home / "config.yaml") in out
    for fragment in fragments:
        assert fragment in out
    assert_no_full_key(captured.out, captured.err)
    assert [r.target for r in http_server.requests] == ["/health"]


@pytest.mark.parametrize("state", sorted(STATES))
async def test_json_output_for_each_state(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], state: str
) -> None:
    relay, expected_code, _ = STATES[state]
    point_at(home, http_server.port)
    http_server.reply_json("GET", "/health", 200, health(relay))
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(["status", "--json"])
    captured = capsys.readouterr()
    assert code == expected_code
    document = json.loads(captured.out)
    assert document["relay"] == relay
    assert document["daemon"]["running"] is True
    assert document["daemon"]["daemon_id"] == "box-000001"
    assert document["config"]["api_key_present"] is False
    assert document["exit_code"] == expected_code


def test_no_daemon_says_so_in_one_line_and_exits_2(
    home: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    point_at(home, closed_port)
    assert main(["status"]) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert f"not running at http://127.0.0.1:{closed_port}" in line
    assert "repowire serve" in line
    assert "enabled:  no" in captured.out
    assert "api key:  none" in captured.out


def test_no_daemon_json(home: Path, closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    point_at(home, closed_port)
    assert main(["status", "--json"]) == 2
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["daemon"]["running"] is False
    assert "not running" in document["daemon"]["error"]
    assert document["relay"] is None
    assert captured.err == ""


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (Reply(status=500, body=b'{"error": "internal"}'), "answered /health with 500"),
        (Reply(status=200, body=b"hello", content_type="text/plain"), "not answering properly"),
    ],
)
async def test_something_else_on_the_port_exits_2(
    home: Path,
    http_server: FakeHttpServer,
    capsys: pytest.CaptureFixture[str],
    reply: Reply,
    fragment: str,
) -> None:
    point_at(home, http_server.port)
    http_server.reply_raw("GET", "/health", reply)
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["status"]) == 2
    assert fragment in one_line(capsys.readouterr().err)


async def test_unknown_or_missing_state_exits_1(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    point_at(home, http_server.port)
    http_server.reply_json("GET", "/health", 200, health({"state": "sideways"}))
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["status"]) == 1
        assert "sideways (unknown state)" in capsys.readouterr().out
        http_server.reply_json("GET", "/health", 200, {"status": "ok"})
        assert await run_cli(["status"]) == 1
        assert "unknown (the daemon did not report it)" in capsys.readouterr().out


async def test_a_key_in_the_daemons_error_text_is_masked(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    leaked = generate_key()
    point_at(home, http_server.port)
    relay = {"state": "down", "last_error": f"relay refused {leaked}"}
    http_server.reply_json("GET", "/health", 200, health(relay))
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["status"]) == 1
        assert await run_cli(["status", "--json"]) == 1
    captured = capsys.readouterr()
    assert mask_key(leaked) in captured.out
    assert_no_full_key(captured.out, captured.err)


async def test_environment_port_is_where_status_looks(
    home: Path,
    http_server: FakeHttpServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    point_at(home, 1)  # the file points nowhere useful; the environment wins
    monkeypatch.setenv("REPOWIRE_DAEMON_PORT", str(http_server.port))
    http_server.reply_json("GET", "/health", 200, health({"state": "disabled"}))
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await run_cli(["status"]) == 0
    assert "relay:           disabled" in capsys.readouterr().out


async def test_port_flag_beats_environment(
    home: Path,
    http_server: FakeHttpServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    closed_port: int,
) -> None:
    point_at(home, closed_port)
    monkeypatch.setenv("REPOWIRE_DAEMON_PORT", str(closed_port))
    http_server.reply_json("GET", "/health", 200, health({"state": "connected"}))
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        code = await run_cli(["status", "--host", "127.0.0.1", "--port", str(http_server.port)])
    assert code == 0
    assert "relay:           connected" in capsys.readouterr().out


def test_format_time_accepts_epoch_and_iso() -> None:
    now = 1_700_000_000.0
    local = datetime.datetime.fromtimestamp(now - 5).astimezone().isoformat(timespec="seconds")
    assert format_time(now - 5, now) == f"{local} (5 s ago)"
    iso = datetime.datetime.fromtimestamp(now + 7, tz=datetime.UTC).isoformat()
    assert format_time(iso, now).endswith("(in 7 s)")
    assert format_time(iso.replace("+00:00", "Z"), now).endswith("(in 7 s)")
    assert format_time(now - 3 * 3600, now).endswith("(3 h ago)")
    assert format_time("not a time", now) == "not a time"
