"""``repowire relay start``'s store and cluster flags: ``--redis-url``, ``--redis-namespace``,
``--replica-id``, ``--advertise-url``, ``--cluster-secret-file``, ``--store-outage-grace``.

The relay is not started: ``serve_relay_main`` is replaced, and what it would have been given
(the real :class:`relay.RelaySettings`) is checked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

import relay
from relay import RelaySettings
from repowire.cli import main

from .cli_support import one_line

SECRET = b"0123456789abcdef0123456789abcdef-cluster"
PASSWORD = "s3cret-pass"
REDIS = f"redis://:{PASSWORD}@127.0.0.1:6379/0"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[RelaySettings]:
    calls: list[RelaySettings] = []

    async def serve_relay_main(settings: Any) -> None:
        calls.append(settings)
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(relay, "serve_relay_main", serve_relay_main, raising=False)
    monkeypatch.delenv("REPOWIRE_REDIS_URL", raising=False)
    return calls


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


def test_without_cluster_flags_the_relay_runs_alone_on_sqlite(
    home: Path, started: list[RelaySettings]
) -> None:
    assert main(["relay", "start"]) == 0
    (settings,) = started
    assert settings.redis_url is None and settings.cluster_secret is None
    assert settings.advertise_url is None and not settings.clustered
    assert settings.redis_namespace == "repowire:"
    assert settings.store_outage_grace == 60.0
    # Default replica id: the host's name and a random suffix, different each start.
    assert main(["relay", "start"]) == 0
    assert started[0].replica_id != started[1].replica_id


def test_every_cluster_flag_reaches_the_settings(
    home: Path, started: list[RelaySettings], secret_file: Path
) -> None:
    argv = ["relay", "start", "--redis-url", REDIS, "--redis-namespace", "edge:"]
    argv += ["--replica-id", "relay-a", "--advertise-url", "https://10.0.0.5:8443/"]
    argv += ["--cluster-secret-file", str(secret_file), "--store-outage-grace", "30"]
    assert main(argv) == 0
    (settings,) = started
    assert settings.redis_url == REDIS
    assert settings.redis_namespace == "edge:"
    assert settings.replica_id == "relay-a"
    assert settings.advertise_url == "https://10.0.0.5:8443"
    assert settings.cluster_secret == SECRET  # the final newline is not part of it
    assert settings.store_outage_grace == 30.0
    assert settings.clustered
    # Neither the secret nor the Redis password is ever shown.
    for shown in (repr(settings), str(settings)):
        assert PASSWORD not in shown and SECRET.decode() not in shown


def test_one_replica_needs_only_the_redis_url(
    home: Path, started: list[RelaySettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["relay", "start", "--redis-url", "unix:///run/redis.sock"]) == 0
    assert started[0].redis_url == "unix:///run/redis.sock" and not started[0].clustered
    # The environment keeps a password out of the process list.
    monkeypatch.setenv("REPOWIRE_REDIS_URL", REDIS)
    assert main(["relay", "start"]) == 0
    assert started[1].redis_url == REDIS
    # A flag wins over the environment.
    assert main(["relay", "start", "--redis-url", "rediss://cache.example:6380/1"]) == 0
    assert started[2].redis_url == "rediss://cache.example:6380/1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--advertise-url", "http://10.0.0.5:8000"], "go together"),
        (["--redis-url", REDIS, "--advertise-url", "http://10.0.0.5:8000"], "go together"),
        (["--cluster-secret-file", "SECRET"], "go together"),
        (
            ["--advertise-url", "http://10.0.0.5:8000", "--cluster-secret-file", "SECRET"],
            "needs --redis-url",
        ),
        (["--redis-namespace", "edge:"], "--redis-namespace needs --redis-url"),
        (["--redis-url", f"http://:{PASSWORD}@10.0.0.1/"], "redis://, rediss:// or unix://"),
        (["--redis-url", REDIS, "--redis-namespace", "has space"], "--redis-namespace"),
        (["--replica-id", "a/b"], "--replica-id"),
        (["--advertise-url", "ftp://10.0.0.5"], "--advertise-url"),
        (["--advertise-url", "http://u:p@10.0.0.5"], "credentials"),
        (["--store-outage-grace", "-1"], "--store-outage-grace"),
    ],
)
def test_bad_cluster_flags_are_usage_errors_without_secrets(
    home: Path,
    started: list[RelaySettings],
    secret_file: Path,
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [str(secret_file) if word == "SECRET" else word for word in argv]
    assert main(["relay", "start", *argv]) == 64
    line = one_line(capsys.readouterr().err)
    assert message in line
    assert PASSWORD not in line and SECRET.decode() not in line
    assert started == []


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "cannot read the cluster secret file"),
        (b"short\n", 0o600, "fewer than 32"),
        (SECRET, 0o644, "open to group or others"),
        (SECRET, 0o640, "open to group or others"),
        (SECRET, 0o660, "open to group or others"),
    ],
)
def test_an_unusable_secret_file_is_refused_in_one_line(
    home: Path,
    started: list[RelaySettings],
    tmp_path: Path,
    content: bytes | None,
    mode: int,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "cluster.secret"
    if content is not None:
        path.write_bytes(content)
        os.chmod(path, mode)
    argv = ["relay", "start", "--redis-url", REDIS, "--advertise-url", "http://10.0.0.5:8000"]
    assert main([*argv, "--cluster-secret-file", str(path)]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("repowire: error: cannot start the relay:")
    assert message in line
    assert SECRET.decode() not in line and "short" not in line and PASSWORD not in line
    assert started == []


def test_a_directory_is_not_a_secret_file(
    home: Path, started: list[RelaySettings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["relay", "start", "--redis-url", REDIS, "--advertise-url", "http://10.0.0.5:8000"]
    assert main([*argv, "--cluster-secret-file", str(tmp_path)]) == 1
    assert "cluster secret file" in one_line(capsys.readouterr().err)
    assert started == []
