"""The config file: round trips, precedence, validation, atomic private writes."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from common import generate_key, mask_key
from repowire.cli import main
from repowire.config import (
    DEFAULT_DAEMON_PORT,
    DEFAULT_RELAY_URL,
    ConfigError,
    Overrides,
    ensure_daemon_id,
    http_base,
    load_settings,
    make_daemon_id,
    read_settings,
    redact_secrets,
    repowire_home,
    update_config,
)
from tests.support.leaks import assert_no_full_key

from .cli_support import one_line, write_config

COMMENTED = """\
# Top comment: my settings
daemon:
  host: 127.0.0.1   # local only
  port: 9000
  id: laptop-abc123

# The relay section
relay:
  enabled: false  # off for now
  url: 'ws://relay.example:8000'
  extra_option: keep-me
telegram:
  token: not-ours   # some other tool's key
# trailing comment
"""


# -- round trips -------------------------------------------------------------------------------


def test_update_keeps_comments_order_and_unknown_keys(home: Path) -> None:
    path = write_config(home, COMMENTED)
    key = generate_key()
    update_config(home, {"relay": {"enabled": True, "api_key": key}})
    assert path.read_text() == COMMENTED.replace(
        "  enabled: false  # off for now", "  enabled: true   # off for now"
    ).replace("  extra_option: keep-me\n", f"  extra_option: keep-me\n  api_key: {key}\n")


def test_new_key_in_a_section_goes_above_the_next_sections_comment(home: Path) -> None:
    path = write_config(home, "daemon:\n  port: 9000\n\n# relay below\nrelay:\n  enabled: false\n")
    update_config(home, {"daemon": {"host": "127.0.0.2"}})
    assert path.read_text() == (
        "daemon:\n  port: 9000\n  host: 127.0.0.2\n\n# relay below\nrelay:\n  enabled: false\n"
    )


def test_new_section_is_appended_and_reads_back(home: Path) -> None:
    path = write_config(home, COMMENTED)
    update_config(home, {"newsection": {"flag": True}})
    # The file's last comment stays last: it follows the last item, whatever that now is.
    assert path.read_text() == COMMENTED.replace(
        "# trailing comment\n", "newsection:\n  flag: true\n# trailing comment\n"
    )


def test_none_removes_a_key_and_keeps_the_rest(home: Path) -> None:
    path = write_config(home, COMMENTED)
    update_config(home, {"relay": {"extra_option": None}})
    assert path.read_text() == COMMENTED.replace("  extra_option: keep-me\n", "")


def test_unchanged_values_do_not_rewrite_the_file(home: Path) -> None:
    path = write_config(home, COMMENTED)
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    update_config(home, {"relay": {"url": "ws://relay.example:8000", "enabled": False}})
    assert path.stat().st_mtime_ns == before - 10**9
    assert path.read_text() == COMMENTED


def test_comment_only_file_keeps_its_comments(home: Path) -> None:
    path = write_config(home, "# written by hand\n# nothing yet\n")
    update_config(home, {"relay": {"enabled": True}})
    assert path.read_text() == "# written by hand\n# nothing yet\nrelay:\n  enabled: true\n"


def test_missing_file_is_created_private_with_defaults_applied(home: Path) -> None:
    assert not home.exists()
    update_config(home, {"relay": {"enabled": True}})
    path = home / "config.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    settings = load_settings(home)
    assert settings.relay.enabled is True
    assert settings.relay.url == DEFAULT_RELAY_URL
    assert settings.daemon.port == DEFAULT_DAEMON_PORT
    assert settings.config_path == path


def test_write_makes_a_readable_file_private_and_leaves_no_temp_files(home: Path) -> None:
    path = write_config(home, COMMENTED)
    path.chmod(0o644)
    update_config(home, {"relay": {"api_key": generate_key()}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == [".config.lock", "config.yaml"]


def test_write_through_a_symlink_keeps_the_symlink(home: Path, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "repowire.yaml"
    real.parent.mkdir()
    real.write_text(COMMENTED)
    home.mkdir()
    (home / "config.yaml").symlink_to(real)
    update_config(home, {"relay": {"enabled": True}})
    assert (home / "config.yaml").is_symlink()
    assert "enabled: true" in real.read_text()


# -- precedence: flags > environment > file > defaults -----------------------------------------


def test_defaults_when_nothing_is_configured(home: Path) -> None:
    settings = load_settings(home, environ={})
    assert settings.relay.enabled is False
    assert settings.relay.url == "wss://repowire.io"
    assert settings.relay.api_key is None
    assert settings.daemon.host == "127.0.0.1"
    assert settings.daemon.port == 8377


def test_file_beats_defaults(home: Path) -> None:
    file_key = generate_key()
    write_config(home, COMMENTED.replace("  extra_option: keep-me\n", f"  api_key: {file_key}\n"))
    settings = load_settings(home, environ={})
    assert settings.daemon.port == 9000
    assert settings.daemon.daemon_id == "laptop-abc123"
    assert settings.relay.url == "ws://relay.example:8000"
    assert settings.relay.api_key == file_key
    assert settings.relay.enabled is False


def test_environment_beats_file_and_flags_beat_environment(home: Path) -> None:
    file_key, env_key, flag_key = generate_key(), generate_key(), generate_key()
    write_config(home, COMMENTED.replace("  extra_option: keep-me\n", f"  api_key: {file_key}\n"))
    environ = {
        "REPOWIRE_RELAY_URL": "wss://env.example",
        "REPOWIRE_API_KEY": env_key,
        "REPOWIRE_RELAY_ENABLED": "true",
        "REPOWIRE_DAEMON_PORT": "9100",
    }
    from_env = load_settings(home, environ=environ)
    assert from_env.relay.url == "wss://env.example"
    assert from_env.relay.api_key == env_key
    assert from_env.relay.enabled is True
    assert from_env.daemon.port == 9100

    flags = Overrides(
        relay_url="ws://flag.example:1234",
        api_key=flag_key,
        relay_enabled=False,
        daemon_port=9200,
        daemon_host="127.0.0.3",
        daemon_id="from-flag",
    )
    from_flags = load_settings(home, flags, environ=environ)
    assert from_flags.relay.url == "ws://flag.example:1234"
    assert from_flags.relay.api_key == flag_key
    assert from_flags.relay.enabled is False
    assert from_flags.daemon.port == 9200
    assert from_flags.daemon.host == "127.0.0.3"
    assert from_flags.daemon.daemon_id == "from-flag"


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        *[("1", True), ("true", True), ("YES", True), ("on", True)],
        *[("0", False), ("false", False), ("No", False), ("off", False)],
    ],
)
def test_relay_enabled_words(home: Path, word: str, expected: bool) -> None:
    write_config(home, f"relay:\n  enabled: {str(not expected).lower()}\n")
    assert load_settings(home, environ={"REPOWIRE_RELAY_ENABLED": word}).relay.enabled is expected


def test_empty_environment_variable_counts_as_unset(home: Path) -> None:
    write_config(home, "relay:\n  url: ws://file.example\n")
    environ = {"REPOWIRE_RELAY_URL": "", "REPOWIRE_API_KEY": " ", "REPOWIRE_DAEMON_PORT": ""}
    settings = load_settings(home, environ=environ)
    assert settings.relay.url == "ws://file.example"
    assert settings.relay.api_key is None
    assert settings.daemon.port == 8377


def test_home_comes_from_repowire_home_else_the_user_directory(tmp_path: Path) -> None:
    assert repowire_home({"REPOWIRE_HOME": str(tmp_path)}) == tmp_path
    assert repowire_home({}) == Path.home() / ".repowire"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("REPOWIRE_RELAY_ENABLED", "maybe", "REPOWIRE_RELAY_ENABLED must be 1/0/true/false"),
        ("REPOWIRE_DAEMON_PORT", "80a", "REPOWIRE_DAEMON_PORT must be a port number"),
        ("REPOWIRE_DAEMON_PORT", "70000", "REPOWIRE_DAEMON_PORT must be a port number"),
        ("REPOWIRE_DAEMON_PORT", "\u00b2", "REPOWIRE_DAEMON_PORT must be a port number"),
        ("REPOWIRE_RELAY_URL", "ftp://x.example", "REPOWIRE_RELAY_URL: relay URL"),
        ("REPOWIRE_RELAY_URL", "ws://x.example/foo", "names the path '/foo'"),
        ("REPOWIRE_API_KEY", "rw_short", "REPOWIRE_API_KEY does not look like"),
    ],
)
def test_bad_environment_values_are_config_errors(
    home: Path, name: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_settings(home, environ={name: value})
    assert not home.exists()  # not even a daemon id was written


def test_bad_environment_value_exits_3_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REPOWIRE_DAEMON_PORT", "lots")
    assert main(["status"]) == 3
    captured = capsys.readouterr()
    assert "REPOWIRE_DAEMON_PORT" in one_line(captured.err)
    assert captured.out == ""


def test_bad_environment_key_is_never_echoed(home: Path) -> None:
    almost_a_key = "rw_" + "x" * 42 + "!"
    with pytest.raises(ConfigError) as caught:
        load_settings(home, environ={"REPOWIRE_API_KEY": almost_a_key})
    assert almost_a_key not in str(caught.value)
    assert "x" * 10 not in str(caught.value)


# -- malformed files: a clear one-line error, the file untouched --------------------------------

MALFORMED = {
    "bad YAML": ("relay:\n  url: [unclosed\n", "invalid YAML at line"),
    "tab indentation": ("relay:\n\turl: ws://x\n", "invalid YAML at line 2"),
    "top level is a list": ("- relay\n- daemon\n", "the top level must be a mapping"),
    "section is a string": ("relay: yes please\n", "'relay' must be a mapping"),
    "port is a string": ("daemon:\n  port: eighty\n", "daemon.port must be a port number"),
    "port out of range": ("daemon:\n  port: 0\n", "daemon.port must be a port number"),
    "port is a boolean": ("daemon:\n  port: true\n", "daemon.port must be a port number"),
    "enabled is a string": ("relay:\n  enabled: 'yes'\n", "relay.enabled must be true or false"),
    "url is ftp": ("relay:\n  url: ftp://relay.example\n", "must start with ws:// or wss://"),
    "url names another path": ("relay:\n  url: ws://relay.example/foo\n", "names the path '/foo'"),
    "url has no host": ("relay:\n  url: 'wss://'\n", "has no host"),
    "url holds credentials": ("relay:\n  url: wss://me:pw@r.example\n", "must not contain cred"),
    "url is a number": ("relay:\n  url: 42\n", "relay.url must be a string"),
    "key of the wrong shape": ("relay:\n  api_key: hunter2\n", "relay.api_key does not look"),
    "daemon id with spaces": ("daemon:\n  id: my laptop\n", "daemon id 'my laptop' must be"),
    "missing ca file": ("relay:\n  ca_file: /nonexistent/ca.pem\n", "is not a readable file"),
    "not UTF-8": ("relay:\n  url: ws://\xff\n", "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_and_is_left_untouched(home: Path, case: str) -> None:
    text, fragment = MALFORMED[case]
    home.mkdir()
    path = home / "config.yaml"
    data = text.encode("latin-1") if case == "not UTF-8" else text.encode()
    path.write_bytes(data)
    for attempt in (
        lambda: load_settings(home, environ={}),
        lambda: update_config(home, {"relay": {"enabled": True}}),
        lambda: ensure_daemon_id(home),
    ):
        with pytest.raises(ConfigError) as caught:
            attempt()
        message = str(caught.value)
        assert fragment in message
        assert message.startswith(str(path))
        assert "\n" not in message
        assert path.read_bytes() == data


#: A config file without a daemon id: ``load_settings`` would write one unless told not to.
WITHOUT_ID = "# no id yet\nrelay:\n  enabled: true  # on\n  url: ws://relay.example:8000\n"


@pytest.mark.parametrize("case", ["with a daemon id", "without a daemon id", *sorted(MALFORMED)])
def test_loading_never_writes_the_file(home: Path, case: str) -> None:
    if case in MALFORMED:
        text, _ = MALFORMED[case]
        data = text.encode("latin-1") if case == "not UTF-8" else text.encode()
    else:
        data = (COMMENTED if case == "with a daemon id" else WITHOUT_ID).encode()
    home.mkdir()
    path = home / "config.yaml"
    path.write_bytes(data)
    # An hour in the past: a rewrite, even of the same bytes, would move it.
    past = path.stat().st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(past, past))
    loads: list[Callable[[], object]] = [
        lambda: read_settings(home, environ={}),
        lambda: load_settings(home, environ={}, persist=False),
    ]
    if case != "without a daemon id":
        # Nothing to persist (an id is stored), or nothing valid to persist it into.
        loads.append(lambda: load_settings(home, environ={}))
    for load in loads:
        if case in MALFORMED:
            with pytest.raises(ConfigError):
                load()
        else:
            load()
        assert path.read_bytes() == data
        assert path.stat().st_mtime_ns == past
        assert sorted(p.name for p in home.iterdir()) == ["config.yaml"]


def test_a_read_without_a_stored_daemon_id_says_it_is_temporary(home: Path) -> None:
    write_config(home, WITHOUT_ID)
    first = read_settings(home, environ={})
    assert first.daemon.id_is_temporary
    assert "id:" not in (home / "config.yaml").read_text()
    stored = load_settings(home, environ={})
    assert not stored.daemon.id_is_temporary
    assert f"id: {stored.daemon.daemon_id}" in (home / "config.yaml").read_text()
    assert read_settings(home, environ={}).daemon == stored.daemon


@pytest.mark.parametrize("command", [["status"], ["setup", "--relay"], ["serve"]])
def test_malformed_file_exits_3_with_one_line(
    home: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(home, "relay:\n  enabled: sometimes\n  url: [\n")
    before = path.read_bytes()
    assert main(command) == 3
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("repowire: configuration error: ")
    assert str(path) in line
    assert captured.out == ""
    assert path.read_bytes() == before


def test_duplicate_key_error_does_not_echo_the_values(home: Path) -> None:
    first, second = generate_key(), generate_key()
    write_config(home, f"relay:\n  api_key: {first}\n  api_key: {second}\n")
    with pytest.raises(ConfigError, match="duplicate key") as caught:
        load_settings(home)
    assert_no_full_key(str(caught.value))


def test_oversized_file_is_refused_unread(home: Path) -> None:
    path = write_config(home, "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than"):
        load_settings(home)
    assert path.read_text() == "# padding\n" * 200_000


def test_update_refuses_a_bad_value_and_writes_nothing(home: Path) -> None:
    path = write_config(home, COMMENTED)
    with pytest.raises(ConfigError, match="names the path '/elsewhere'"):
        update_config(home, {"relay": {"url": "ws://relay.example/elsewhere"}})
    with pytest.raises(ConfigError, match="api_key does not look like"):
        update_config(home, {"relay": {"api_key": "not-a-key"}})
    with pytest.raises(ConfigError, match="cannot store a list"):
        update_config(home, {"relay": {"url": ["a"]}})
    assert path.read_text() == COMMENTED


def test_unwritable_home_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create or lock"):
        update_config(blocker / "home", {"relay": {"enabled": True}})


def test_bad_overrides_are_config_errors(home: Path) -> None:
    with pytest.raises(ConfigError, match="--relay-url"):
        load_settings(home, Overrides(relay_url="ftp://x"), environ={})
    with pytest.raises(ConfigError, match="--api-key does not look like"):
        load_settings(home, Overrides(api_key="nope"), environ={})
    with pytest.raises(ConfigError, match="--daemon-id"):
        load_settings(home, Overrides(daemon_id="has space"), environ={})


# -- daemon id, URLs, masking ------------------------------------------------------------------


def test_daemon_id_is_generated_once_and_kept(home: Path) -> None:
    first = ensure_daemon_id(home)
    assert re.fullmatch(r"[a-z0-9-]+-[0-9a-f]{6}", first)
    assert ensure_daemon_id(home) == first
    assert load_settings(home).daemon.daemon_id == first
    assert f"id: {first}" in (home / "config.yaml").read_text()


def test_daemon_id_override_is_not_written(home: Path) -> None:
    settings = load_settings(home, Overrides(daemon_id="chosen"), environ={})
    assert settings.daemon.daemon_id == "chosen"
    assert not (home / "config.yaml").exists()


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("My_Laptop.local", "my-laptop-local-a1b2c3"),
        ("---", "daemon-a1b2c3"),
        ("", "daemon-a1b2c3"),
        ("héllo wörld", "h-llo-w-rld-a1b2c3"),
        ("a" * 80, "a" * 40 + "-a1b2c3"),
    ],
)
def test_make_daemon_id_sanitises_the_hostname(hostname: str, expected: str) -> None:
    assert make_daemon_id(hostname, "a1b2c3") == expected


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("wss://h/ws/relay", "https://h"),
        ("ws://h:8000", "http://h:8000"),
        ("wss://relay.example:8443/ws/relay/", "https://relay.example:8443"),
        ("ws://[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_http_base(url: str, base: str) -> None:
    assert http_base(url) == base


@pytest.mark.parametrize("url", ["https://h", "wss://", "wss://u:p@h", "wss://h/?k=v", "ws://h:x"])
def test_http_base_refuses_non_relay_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        http_base(url)


def test_settings_repr_masks_the_key(home: Path) -> None:
    secret = generate_key()
    settings = load_settings(home, Overrides(api_key=secret), environ={})
    assert secret not in repr(settings)
    assert mask_key(secret) in repr(settings)
    assert secret not in repr(Overrides(api_key=secret))


def test_redact_secrets_masks_every_key_shaped_text() -> None:
    secret = generate_key()
    text = redact_secrets(f"header Bearer {secret} and rw_partial")
    assert secret not in text
    assert mask_key(secret) in text
    assert "rw_partial" not in text


def test_relative_ca_file_is_relative_to_home(home: Path) -> None:
    home.mkdir()
    (home / "ca.pem").write_text("not checked here")
    write_config(home, "relay:\n  ca_file: ca.pem\n")
    assert load_settings(home).relay.ca_file == home / "ca.pem"
