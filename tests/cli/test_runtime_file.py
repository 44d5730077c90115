"""The daemon's runtime file: `status` finds the daemon this home started, whatever its port.

The process tests run `python -m repowire` as real child processes (loopback only, ports that
were free a moment ago, every wait bounded); the rest exercise :mod:`repowire._runtime` and
`status` in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from common import generate_key
from repowire._runtime import (
    LOCK_FILE_NAME,
    RUNTIME_FILE_NAME,
    DaemonAlreadyRunning,
    RuntimeRecord,
    RuntimeState,
    acquire_home,
    claim_home,
    read_runtime,
)
from repowire.cli import DAEMON_REQUEST_TIMEOUT, EXIT_ALREADY_RUNNING, main
from tests.support.fake_http import FakeHttpServer
from tests.support.leaks import assert_no_full_key
from tests.support.processes import LOOPBACK, ChildProcess, Cli, free_port, start_child

from .cli_support import NETWORK_TEST_TIMEOUT, one_line, run_cli, write_config

#: Seconds a whole process test may take (each `python -m repowire` start costs about one).
PROCESS_TEST_TIMEOUT = 60
#: Seconds a command that must not wait may take, interpreter start included.
QUICK_COMMAND_SECONDS = 10


def line_with(text: str, fragment: str) -> str:
    """The one line of ``text`` containing ``fragment``."""
    [line] = [line for line in text.splitlines() if fragment in line]
    return line


@asynccontextmanager
async def serving(cli: Cli, name: str, port: int, *extra: str) -> AsyncIterator[ChildProcess]:
    """``repowire serve --port port`` until the block ends (SIGTERM, then SIGKILL)."""
    child = await start_child(cli, name, "serve", "--port", str(port), *extra)
    try:
        await child.wait_for_line("repowire daemon ")
        yield child
    finally:
        with trio.CancelScope(shield=True):
            await child.terminate()


def make_cli(tmp_path: Path, name: str, config_port: int) -> Cli:
    """A command line in a fresh home ``tmp_path/name`` whose configured port is closed, so
    finding the daemon anywhere else can only come from the runtime file."""
    home = tmp_path / name
    write_config(home, f"daemon:\n  port: {config_port}\n")
    work = tmp_path / f"{name}-work"
    work.mkdir()
    return Cli(home, work)


def status_json(stdout: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(stdout)
    return document


# -- through real processes -------------------------------------------------------------------


async def test_status_finds_the_daemon_started_on_another_port(
    tmp_path: Path, closed_port: int
) -> None:
    cli = make_cli(tmp_path, "home", closed_port)
    key = generate_key()
    # A key in the config: the runtime file must not pick it up.
    (cli.home / "config.yaml").write_text(
        f"daemon:\n  port: {closed_port}\nrelay:\n  enabled: false\n  api_key: {key}\n"
    )
    port = free_port()
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with serving(cli, "serve", port) as serve:
            runtime = cli.home / RUNTIME_FILE_NAME
            assert stat.S_IMODE(runtime.stat().st_mode) == 0o600
            text = runtime.read_text()
            assert_no_full_key(text)
            assert "rw_" not in text
            record = json.loads(text)
            assert record["pid"] == serve.process.pid
            assert (record["host"], record["port"]) == (LOOPBACK, port)
            assert record["url"] == f"http://{LOOPBACK}:{port}"
            assert record["daemon_id"] in serve.stdout()
            assert abs(record["started_at"] - time.time()) < PROCESS_TEST_TIMEOUT
            assert isinstance(record["version"], str) and record["version"]
            # Nothing else left behind by the atomic write.
            assert not [p for p in cli.home.iterdir() if p.name.endswith(".tmp")]

            status = await cli.run("status")
            assert status.returncode == 0, status.stderr
            running = line_with(status.stdout, "Daemon at")
            assert running.startswith(f"Daemon at http://{LOOPBACK}:{port}: running")
            assert f"pid {serve.process.pid}" in running

            document = status_json((await cli.run("status", "--json")).stdout)
            assert document["daemon"]["source"] == "runtime_file"
            assert document["daemon"]["pid"] == serve.process.pid
            assert document["daemon"]["url"] == f"http://{LOOPBACK}:{port}"
            assert document["daemon"]["runtime_file"] == {
                "path": str(runtime),
                "state": "running",
            }

            # --host/--port still override the runtime file.
            flagged = await cli.run("status", "--json", "--port", str(closed_port))
            assert flagged.returncode == 2
            assert status_json(flagged.stdout)["daemon"]["source"] == "flags"

            assert await serve.terminate() == 0
        # A clean exit takes the runtime file away.
        assert not runtime.exists()
        after = await cli.run("status", "--json")
        assert after.returncode == 2
        document = status_json(after.stdout)
        assert document["daemon"]["source"] == "config"
        assert document["daemon"]["runtime_file"]["state"] == "absent"


async def test_a_second_serve_in_the_same_home_is_refused_at_once(
    tmp_path: Path, closed_port: int
) -> None:
    cli = make_cli(tmp_path, "home", closed_port)
    port, other_port = free_port(), free_port()
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with serving(cli, "first", port) as first:
            expected = (
                f"repowire: error: a daemon from this home is already running: "
                f"pid {first.process.pid}, http://{LOOPBACK}:{port}; stop it first"
            )
            for argv in (["--port", str(other_port)], ["--port", str(port)], []):
                with trio.fail_after(QUICK_COMMAND_SECONDS):
                    second = await cli.run("serve", *argv)
                assert second.returncode == EXIT_ALREADY_RUNNING == 4
                assert one_line(second.stderr) == expected
                assert second.stdout == ""
            # The refused one bound nothing, and the first still serves.
            with socket.socket() as probe:
                probe.bind((LOOPBACK, other_port))
            status = await cli.run("status")
            assert status.returncode == 0, status.stderr
            assert first.process.poll() is None


async def test_two_serves_started_at_once_in_one_home_leave_one_running(
    tmp_path: Path, closed_port: int
) -> None:
    cli = make_cli(tmp_path, "home", closed_port)
    children = [
        await start_child(cli, f"racer{index}", "serve", "--port", str(free_port()))
        for index in range(2)
    ]
    try:
        with trio.fail_after(PROCESS_TEST_TIMEOUT):
            exited: list[ChildProcess] = []
            async with trio.open_nursery() as nursery:

                async def watch(child: ChildProcess) -> None:
                    await child.process.wait()
                    exited.append(child)
                    nursery.cancel_scope.cancel()

                for child in children:
                    nursery.start_soon(watch, child)
            [loser] = exited
            [winner] = [child for child in children if child is not loser]
            assert loser.process.returncode == EXIT_ALREADY_RUNNING
            assert "a daemon from this home is already running" in one_line(loser.stderr())
            await winner.wait_for_line("repowire daemon ")
            document = status_json((await cli.run("status", "--json")).stdout)
            assert document["daemon"]["pid"] == winner.process.pid
    finally:
        with trio.CancelScope(shield=True):
            for child in children:
                await child.terminate()


async def test_a_killed_daemons_stale_file_is_ignored(tmp_path: Path, closed_port: int) -> None:
    cli = make_cli(tmp_path, "home", closed_port)
    runtime = cli.home / RUNTIME_FILE_NAME
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        killed = await start_child(cli, "killed", "serve", "--port", str(free_port()))
        try:
            await killed.wait_for_line("repowire daemon ")
        finally:
            killed.process.kill()
            await killed.process.wait()
        assert killed.process.returncode == -signal.SIGKILL
        left_over = runtime.read_bytes()

        status = await cli.run("status")
        assert status.returncode == 2
        line = one_line(status.stderr)
        assert f"not running at http://{LOOPBACK}:{closed_port}" in line
        assert f"stale runtime file {runtime} left by pid {killed.process.pid}" in line
        document = status_json((await cli.run("status", "--json")).stdout)
        assert document["daemon"]["source"] == "config"
        assert document["daemon"]["runtime_file"]["state"] == "stale"
        # Reading does not write: the stale file is left for the next serve to replace.
        assert runtime.read_bytes() == left_over

        port = free_port()
        async with serving(cli, "again", port) as again:
            status = await cli.run("status")
            assert status.returncode == 0, status.stderr
            running = line_with(status.stdout, "Daemon at")
            assert running.startswith(f"Daemon at http://{LOOPBACK}:{port}: running")
            assert f"pid {again.process.pid}" in running


async def test_two_homes_side_by_side_are_independent(tmp_path: Path, closed_port: int) -> None:
    one = make_cli(tmp_path, "one", closed_port)
    two = make_cli(tmp_path, "two", closed_port)
    port_one, port_two = free_port(), free_port()
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with serving(one, "serve", port_one) as serve_one:
            # Another home's daemon does not stop this one from starting.
            async with serving(two, "serve", port_two) as serve_two:
                for cli, port, serve in ((one, port_one, serve_one), (two, port_two, serve_two)):
                    result = await cli.run("status", "--json")
                    assert result.returncode == 0, result.stderr
                    daemon = status_json(result.stdout)["daemon"]
                    assert daemon["url"] == f"http://{LOOPBACK}:{port}"
                    assert daemon["pid"] == serve.process.pid
                    assert daemon["daemon_id"] in serve.stdout()
                assert await serve_two.terminate() == 0
            assert not (two.home / RUNTIME_FILE_NAME).exists()
            assert (await two.run("status")).returncode == 2
            assert (await one.run("status")).returncode == 0


async def test_a_reused_pid_is_not_mistaken_for_the_daemon(
    tmp_path: Path, closed_port: int
) -> None:
    """What a SIGKILLed daemon leaves, with its pid now taken by an unrelated live process."""
    cli = make_cli(tmp_path, "home", closed_port)
    recorded_port = free_port()
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            unrelated: trio.Process = await nursery.start(
                trio.run_process, [sys.executable, "-c", "import time; time.sleep(600)"]
            )
            try:
                (cli.home / LOCK_FILE_NAME).write_text(f"{unrelated.pid}\n")
                record = RuntimeRecord(
                    pid=unrelated.pid,
                    host=LOOPBACK,
                    port=recorded_port,
                    daemon_id="box-000001",
                    started_at=time.time(),
                    version="0.1.0",
                )
                (cli.home / RUNTIME_FILE_NAME).write_text(json.dumps(record.to_json()))

                with trio.fail_after(QUICK_COMMAND_SECONDS):
                    status = await cli.run("status", "--json")
                assert status.returncode == 2
                daemon = status_json(status.stdout)["daemon"]
                assert daemon["source"] == "config"
                assert daemon["runtime_file"]["state"] == "stale"

                port = free_port()
                async with serving(cli, "serve", port) as serve:
                    assert f"listening on http://{LOOPBACK}:{port}" in serve.stdout()
                    document = status_json((await cli.run("status", "--json")).stdout)
                    assert document["daemon"]["pid"] == serve.process.pid
                assert unrelated.poll() is None
            finally:
                nursery.cancel_scope.cancel()


async def test_a_port_held_by_another_program_is_named(tmp_path: Path, closed_port: int) -> None:
    cli = make_cli(tmp_path, "home", closed_port)
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with trio.fail_after(PROCESS_TEST_TIMEOUT):
            result = await cli.run("serve", "--port", str(port))
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("repowire: error: cannot serve: Address already in use")
    assert f"http://{LOOPBACK}:{port} is taken by another program" in line
    assert "--port" in line
    # A daemon that never bound leaves no runtime file behind.
    assert not (cli.home / RUNTIME_FILE_NAME).exists()


# -- in-process -------------------------------------------------------------------------------


def a_record(port: int, daemon_id: str = "box-000001") -> RuntimeRecord:
    return RuntimeRecord(
        pid=os.getpid(),
        host=LOOPBACK,
        port=port,
        daemon_id=daemon_id,
        started_at=time.time(),
        version="0.1.0",
    )


def test_status_in_a_fresh_home_creates_no_runtime_files(
    home: Path,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The configured port has nothing on it (the user's own daemon may hold the default one).
    monkeypatch.setenv("REPOWIRE_DAEMON_PORT", str(closed_port))
    assert main(["status", "--json"]) == 2
    document = status_json(capsys.readouterr().out)
    assert document["daemon"]["runtime_file"]["state"] == "absent"
    assert not (home / RUNTIME_FILE_NAME).exists()
    assert not (home / LOCK_FILE_NAME).exists()


def test_a_claim_publishes_atomically_and_withdraws(home: Path) -> None:
    assert read_runtime(home).state is RuntimeState.ABSENT
    with claim_home(home) as claim:
        assert stat.S_IMODE((home / LOCK_FILE_NAME).stat().st_mode) == 0o600
        info = read_runtime(home)
        assert (info.state, info.pid) == (RuntimeState.STARTING, os.getpid())
        record = a_record(9000)
        claim.publish(record)
        info = read_runtime(home)
        assert (info.state, info.record, info.pid) == (RuntimeState.RUNNING, record, os.getpid())
        assert record.url == f"http://{LOOPBACK}:9000"
        assert sorted(p.name for p in home.iterdir()) == [LOCK_FILE_NAME, RUNTIME_FILE_NAME]
        assert stat.S_IMODE((home / RUNTIME_FILE_NAME).stat().st_mode) == 0o600
    assert not (home / RUNTIME_FILE_NAME).exists()
    assert read_runtime(home).state is RuntimeState.ABSENT


def test_a_second_claim_names_the_running_daemon(home: Path) -> None:
    with claim_home(home) as claim:
        claim.publish(a_record(9000))
        slept: list[float] = []
        with pytest.raises(DaemonAlreadyRunning) as raised:
            acquire_home(home, wait=0.05, sleep=slept.append)
        assert str(raised.value) == (
            f"a daemon from this home is already running: pid {os.getpid()}, "
            f"http://{LOOPBACK}:9000; stop it first"
        )
        assert slept  # it retried before giving up
    # Released: the next claim succeeds.
    with claim_home(home):
        pass


@contextmanager
def fifo_at(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    try:
        yield
    finally:
        path.unlink()


@pytest.mark.parametrize("name", [RUNTIME_FILE_NAME, LOCK_FILE_NAME])
def test_reading_never_waits_on_a_fifo(home: Path, name: str) -> None:
    with fifo_at(home / name):
        started = time.monotonic()
        info = read_runtime(home)
        assert time.monotonic() - started < 1
    assert not info.alive


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"format": 2, "pid": 1}',
        json.dumps(a_record(9000).to_json() | {"port": 0}).encode(),
        json.dumps(a_record(9000).to_json() | {"pid": True}).encode(),
        # Not a daemon id (the words of common.is_daemon_id): a space, or one character too many.
        json.dumps(a_record(9000).to_json() | {"daemon_id": "my box"}).encode(),
        json.dumps(a_record(9000).to_json() | {"daemon_id": "b" * 65}).encode(),
    ],
)
def test_a_malformed_runtime_file_is_not_trusted(home: Path, content: bytes) -> None:
    home.mkdir()
    (home / RUNTIME_FILE_NAME).write_bytes(content)
    assert read_runtime(home).state is RuntimeState.STALE
    with claim_home(home):
        info = read_runtime(home)
        assert info.state is RuntimeState.STARTING
        assert info.record is None


async def test_status_does_not_hang_on_a_daemon_that_does_not_answer(
    home: Path, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    write_config(home, f"daemon:\n  port: {closed_port}\n")
    with socket.socket() as mute:
        # Accepted by the kernel, never answered.
        mute.bind((LOOPBACK, 0))
        mute.listen()
        port = mute.getsockname()[1]
        with claim_home(home) as claim:
            claim.publish(a_record(port))
            started = time.monotonic()
            with trio.fail_after(DAEMON_REQUEST_TIMEOUT + QUICK_COMMAND_SECONDS):
                code = await trio.to_thread.run_sync(main, ["status"])
            elapsed = time.monotonic() - started
    assert code == 2
    assert elapsed < DAEMON_REQUEST_TIMEOUT + 2
    assert f"http://{LOOPBACK}:{port}" in one_line(capsys.readouterr().err)


async def test_status_checks_the_recorded_daemon_id(
    home: Path, http_server: FakeHttpServer, capsys: pytest.CaptureFixture[str], closed_port: int
) -> None:
    write_config(home, f"daemon:\n  port: {closed_port}\n")
    http_server.reply_json(
        "GET", "/health", 200, {"daemon_id": "someone-else", "relay": {"state": "disabled"}}
    )
    with claim_home(home) as claim:
        claim.publish(a_record(http_server.port, daemon_id="box-000001"))
        with trio.fail_after(NETWORK_TEST_TIMEOUT):
            code = await run_cli(["status"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "answered as 'someone-else', not as 'box-000001'" in line
    assert str(home / RUNTIME_FILE_NAME) in line


def test_help_documents_the_already_running_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    assert "4    serve: a daemon from this home is already running" in capsys.readouterr().out
